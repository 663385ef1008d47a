"""VQ-Diffusion samplers: strided grid, truncation, guidance, oracle recovery, determinism,
purity sampler timestep / warning / purity prior."""

import warnings

import pytest
import torch
import torch.nn as nn

from vqtransformer.models.vqdiffusion import VQDiffusionTransformer
from vqtransformer.modules.diffusion import MaskAndReplace, log_onehot, sample_categorical
from vqtransformer.sampling.diffusion import (
    predict_x0,
    purity_prior,
    sample_tokens,
    time_grid,
    timestep_for_mask_fraction,
    truncate,
)

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


# ------------------------------------------------------------------- purity sampler: timestep, warning, prior
class Fixed(nn.Module):
    """Ignores x_t and t: the same p(x0 | x_t) = ``probs`` at every position; records every (x_t, t) it is shown."""

    def __init__(self, probs, grid=GRID):
        super().__init__()
        self.log_p, self.grid, self.null_class, self.calls = torch.as_tensor(probs).log(), grid, 0, []

    def forward(self, x_t, t, y=None):
        self.calls.append((x_t.clone(), t.clone()))
        return self.log_p.expand(*x_t.shape, -1)


def test_purity_feeds_the_t_of_the_current_mask_fraction():
    d = MaskAndReplace(K, 100, 0.9, 0.1)  # diffusion=paper: gbar_t = 0.009 t
    gbar = 1 - d.keep_bar
    model = Fixed(torch.full((K,), 1.0 / K))
    with pytest.warns(UserWarning, match="outside the training distribution"):
        sample_tokens(model, d, 3, steps=25, sampler="purity", generator=torch.Generator().manual_seed(0))
    ts = []
    for x_t, t in model.calls:
        f = (x_t == K).float().mean(1)
        assert (f == f[0]).all() and (t == t[0]).all()  # every sample unmasks equally many tokens
        expected = min(range(1, 101), key=lambda s: (abs(float(gbar[s]) - float(f[0])), s))
        assert int(t[0]) == expected
        ts.append(int(t[0]))
    # the all-[MASK] start (fraction 1 > gbar_T = 0.9) is shown t = T; then t stays at T while the fraction
    # exceeds 0.9 + 0.0045 (the grid time would be 96, 92, ...), and half-masked states get t ~ 56, not 50
    assert ts[0] == 100 and ts[1] == 100 and ts[2] == 100 and ts[1:] != time_grid(100, 25)[1:-1]
    x_half, t_half = next((x, t) for x, t in model.calls if (x[0] == K).sum() == 8)
    assert int(t_half[0]) == 56  # |gbar_56 - 0.5| = 0.004 < |gbar_55 - 0.5| = 0.005
    # a schedule with gbar_T ~ 1 (diffusion=released) keeps t ~ the grid time
    assert timestep_for_mask_fraction(1 - MaskAndReplace(K, 100, 0.99999, 1e-6).keep_bar, 0.5) == 50
    assert timestep_for_mask_fraction(gbar, 1.0) == 100 and timestep_for_mask_fraction(gbar, 0.0) == 1


def test_purity_warns_only_when_the_all_mask_start_is_outside_training():
    model = Fixed(torch.full((K,), 1.0 / K))
    paper = MaskAndReplace(K, 100, 0.9, 0.1)
    with pytest.warns(UserWarning, match=r"gbar_T = 0.9 < 1"):
        sample_tokens(model, paper, 2, steps=5, sampler="purity")
    full = MaskAndReplace(K, 100, 0.9, 0.1)  # gbar_T = 1 exactly (no constructor argument gives it: patch it)
    full.keep_bar[-1], full.alpha_bar[-1] = 0.0, 0.0
    released = MaskAndReplace(K, 100, 0.99999, 1e-6)  # N (1 - gbar_T) = 1.6e-4 unmasked tokens at t = T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for d in (full, released):
            sample_tokens(model, d, 2, steps=5, sampler="purity")
        sample_tokens(model, paper, 2, steps=5, sampler="standard")  # the standard sampler starts from p(x_T)


def _old_purity(denoiser, d, n, steps, generator):
    """The purity loop before the prior weight (with a t-independent denoiser the t rule does not matter)."""
    gbar, N = 1 - d.keep_bar, GRID[0] * GRID[1]
    x = torch.full((n, N), K)
    times = time_grid(d.T, steps)
    for t_now, s_now in zip(times[:-1], times[1:]):
        log_x0 = denoiser(x, torch.full((n,), t_now), None)
        masked = x == K
        n_unmask = int(masked[0].sum()) - int(round(N * float(gbar[s_now] / gbar[d.T])))
        if n_unmask <= 0:
            continue
        purity = log_x0.max(-1).values.exp().masked_fill(~masked, 0.0)
        pos = torch.multinomial(purity, n_unmask, replacement=False, generator=generator)
        x = x.scatter(1, pos, sample_categorical(log_x0, generator).gather(1, pos))
    return x.view(n, *GRID)


class Varied(nn.Module):
    """A fixed, position-dependent p(x0 | x_t) (purity differs between positions)."""

    def __init__(self):
        super().__init__()
        self.grid, self.null_class = GRID, 0
        self.logits = 3 * torch.randn(GRID[0] * GRID[1], K, generator=torch.Generator().manual_seed(5))

    def forward(self, x_t, t, y=None):
        return self.logits.log_softmax(-1).expand(x_t.shape[0], -1, -1)


def test_prior_weight_zero_is_the_old_sampler():
    d = MaskAndReplace(K, 100, 0.99999, 1e-6)
    model = Varied()
    old = _old_purity(model, d, 6, 10, torch.Generator().manual_seed(4))
    for kw in ({}, {"prior_weight": 0.0}):
        new = sample_tokens(model, d, 6, steps=10, sampler="purity", generator=torch.Generator().manual_seed(4), **kw)
        assert torch.equal(new, old)
    assert not torch.equal(old, sample_tokens(model, d, 6, steps=10, sampler="purity", prior_weight=3.0,
                                              generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="prior_weight"):
        sample_tokens(model, d, 2, steps=5, sampler="purity", prior_weight=-1.0)
    with pytest.raises(ValueError, match="prior_weight"):
        sample_tokens(model, d, 2, steps=5, sampler="standard", prior_weight=1.0)


def test_purity_prior_formula():
    log_p = torch.tensor([[[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.4, 0.4, 0.2]]]).log()  # purities .5, .9, .4
    assert torch.equal(purity_prior(log_p, 0.0), log_p)
    r, s = 2.0, torch.tensor([0.5, 0.9, 0.4]) / 0.9
    expected = log_p.exp() ** (1 + r * s).view(1, 3, 1)
    torch.testing.assert_close(purity_prior(log_p, r).exp(), expected / expected.sum(-1, keepdim=True))
    out = purity_prior(log_p, r).exp()
    assert (out[..., 0] > log_p.exp()[..., 0]).all()  # mass moves to the most likely class
    assert torch.isclose(out[0, 2, 0], out[0, 2, 1])  # ties stay ties
    # truncated classes (-inf) stay impossible
    assert purity_prior(truncate(log_p, 0.7), r).exp()[0, 0, 2] == 0


def test_prior_weight_sharpens_the_sampled_tokens():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (K - 4)).clamp_min(1e-12)
    p = p / p.sum()
    d = MaskAndReplace(K, 100, 0.99999, 1e-6)

    def freq(r):
        out = sample_tokens(Fixed(p), d, 256, steps=10, sampler="purity", prior_weight=r,
                            generator=torch.Generator().manual_seed(0))
        return torch.bincount(out.flatten(), minlength=K).float() / out.numel()

    f0, f2 = freq(0.0), freq(2.0)
    # equal purity everywhere: s_n = 1 and p' = p^3 / sum p^3 (0.804, 0.174, 0.022, 0.0008)
    target = p ** 3 / (p ** 3).sum()
    assert abs(f0[0] - 0.5) < 0.03 and abs(f2[0] - target[0]) < 0.03 and abs(f2[1] - target[1]) < 0.03
    assert f2[0] > f0[0] + 0.2 and f2[2] < f0[2]
