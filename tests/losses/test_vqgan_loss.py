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


def test_fast_adaptive_gan_loss_has_the_naive_value_and_gradients():
    """The generator loss reuses decoder-output gradients; it must equal taming's formulation."""
    from tests.conftest import TINY, compose
    from vqtransformer.stages.vqgan import VQGANStage

    torch.manual_seed(0)
    stage = VQGANStage(compose(TINY + ["first_stage.loss.disc_start=0", "codebook.init=normal",
                                       "codebook.restart_dead=false"]))
    model, disc, lc = stage.vqgan, stage.discriminator, stage.lc
    x = torch.rand(2, 3, 16, 16) * 2 - 1

    def naive():
        xrec, qloss, _ = model(x)
        nll = (x - xrec).abs().mean()
        g = generator_loss(disc(xrec), lc.disc_loss)
        w = adaptive_weight(nll, g, model.get_last_layer()) * lc.disc_weight
        return nll + w * lc.disc_factor * g + lc.codebook_weight * qloss

    def fast():
        xrec, qloss, _ = model(x)
        return stage.generator_gan_loss((x - xrec).abs().mean(), qloss, xrec)[0]

    grads = []
    for fn in (naive, fast):
        model.zero_grad(), disc.zero_grad()
        model.quantize.eval()  # identical lookups in both passes
        loss = fn()
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l1, g1), (l2, g2) = grads
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert len(g1) == len(g2) > 10
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in disc.parameters())
