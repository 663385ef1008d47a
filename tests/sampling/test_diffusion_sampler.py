"""VQ-Diffusion samplers: strided grid, truncation, guidance, oracle recovery, determinism."""

import pytest
import torch
import torch.nn as nn

from vqtransformer.models.vqdiffusion import VQDiffusionTransformer
from vqtransformer.modules.diffusion import MaskAndReplace, log_onehot
from vqtransformer.sampling.diffusion import predict_x0, sample_tokens, time_grid, truncate

K, GRID = 16, (4, 4)
PRESETS = {"paper": (0.9, 0.1), "released": (0.99999, 1e-6)}


class Oracle(nn.Module):
    """Predicts the true x_0 (log one-hot) and records every x_t it is shown."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0, self.grid, self.null_class, self.seen = x0, GRID, 0, []

    def forward(self, x_t, t, y=None):
        self.seen.append(x_t.clone())
        return log_onehot(self.x0, K)


def test_time_grid_is_strided_from_T_to_0():
    assert time_grid(100, 25) == list(range(100, -1, -4))
    assert time_grid(100, 100) == list(range(100, -1, -1))
    g = time_grid(100, 7)
    assert g[0] == 100 and g[-1] == 0 and len(g) == 8 and all(a > b for a, b in zip(g, g[1:]))
    with pytest.raises(ValueError, match="num_timesteps"):
        time_grid(100, 101)


def test_truncation_keeps_smallest_set_reaching_rate():
    p = torch.tensor([[0.05, 0.5, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01]])
    out = truncate(p.log(), 0.75).exp()
    torch.testing.assert_close(out[0], torch.tensor([0.0, 0.5, 0.3, 0.0]) / 0.8)
    torch.testing.assert_close(out[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # at least one, even if it alone passes r
    torch.testing.assert_close(truncate(p.log(), 0.8).exp()[0], torch.tensor([0.0, 0.5, 0.3, 0.0]) / 0.8)
    torch.testing.assert_close(truncate(p.log(), 0.81).exp()[0], torch.tensor([0.0, 0.5, 0.3, 0.15]) / 0.95)
    assert torch.equal(truncate(p.log(), 1.0), p.log())


def test_classifier_free_guidance_formula():
    torch.manual_seed(0)
    model = VQDiffusionTransformer(K, GRID, n_layer=1, n_head=2, n_embd=32, num_classes=3).eval()
    for p in model.parameters():  # make the class matter (AdaLN starts at zero)
        nn.init.normal_(p, std=0.2)
    x_t = torch.randint(0, K + 1, (2, 16))
    t, y = torch.tensor([10, 50]), torch.tensor([1, 2])
    log_c, log_u = model(x_t, t, y), model(x_t, t, torch.full_like(y, 3))
    assert not torch.allclose(log_c, log_u)
    got = predict_x0(model, x_t, t, y, cfg_scale=3.0)
    torch.testing.assert_close(got, (log_u + 3.0 * (log_c - log_u)).log_softmax(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(predict_x0(model, x_t, t, y, cfg_scale=1.0), log_c)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("sampler", ["standard", "purity"])
@pytest.mark.parametrize("steps", [100, 25, 7])
def test_oracle_prediction_recovers_x0_and_mask_never_returns(preset, sampler, steps):
    d = MaskAndReplace(K, 100, *PRESETS[preset])
    x0 = torch.randint(0, K, (8, 16), generator=torch.Generator().manual_seed(2))
    oracle = Oracle(x0)
    out = sample_tokens(oracle, d, 8, steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.view(8, 16), x0)
    trajectory = [*oracle.seen, out.view(8, 16)]
    assert len(oracle.seen) == len(time_grid(100, steps)) - 1
    for before, after in zip(trajectory, trajectory[1:]):
        assert not (after == K)[before != K].any(), "a [MASK] reappeared after it was removed"


@pytest.mark.parametrize("sampler", ["standard", "purity"])
def test_mask_never_returns_with_a_random_model(sampler):
    torch.manual_seed(0)
    model = VQDiffusionTransformer(K, GRID, n_layer=1, n_head=2, n_embd=32).eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    d = MaskAndReplace(K, 100, 0.9, 0.1)
    out = sample_tokens(model, d, 4, steps=20, sampler=sampler, truncation_rate=0.9,
                        generator=torch.Generator().manual_seed(0)).view(4, 16)
    assert (out < K).all()
    for before, after in zip(seen + [out], seen[1:] + [out]):
        assert not (after == K)[before != K].any()
    if sampler == "purity":  # the purity sampler never changes an unmasked token
        for before, after in zip(seen, seen[1:] + [out]):
            assert torch.equal(after[before != K], before[before != K])


@pytest.mark.parametrize("sampler", ["standard", "purity"])
def test_deterministic_by_seed(sampler):
    torch.manual_seed(0)
    model = VQDiffusionTransformer(K, GRID, n_layer=1, n_head=2, n_embd=32, num_classes=3).eval()
    d = MaskAndReplace(K, 100, 0.9, 0.1)
    y = torch.tensor([0, 1, 2, 0])

    def run(seed):
        return sample_tokens(model, d, 4, y, steps=10, truncation_rate=0.9, cfg_scale=2.0, sampler=sampler,
                             generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
