import pytest
import torch

from vqtransformer.losses.gan import generator_loss, hinge_d_loss, vanilla_d_loss
from vqtransformer.stages.vqgan import adaptive_weight


def test_adaptive_weight_is_ratio_of_gradient_norms_at_last_layer():
    torch.manual_seed(0)
    last = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 3)
    out = x @ last.t()
    nll = out.abs().mean()
    g = -(out ** 3).mean()
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    w = adaptive_weight(nll, g, last)
    assert w.item() == pytest.approx((gn / (gg + 1e-4)).item(), rel=1e-5)
    assert not w.requires_grad
    # clamped
    tiny_g = 1e-9 * out.sum()
    assert adaptive_weight(nll, tiny_g, last, max_weight=10.0).item() == pytest.approx(10.0)


def test_gan_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert vanilla_d_loss(torch.tensor([50.0]), torch.tensor([-50.0])).item() == pytest.approx(0.0, abs=1e-6)
    assert generator_loss(fake, "hinge").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="disc_loss"):
        generator_loss(fake, "wgan")
