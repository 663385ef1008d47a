"""DiffAugment: identity at strength 0, differentiable, each op does what it says."""

import pytest
import torch
import torch.nn as nn

from vqtransformer.losses.diffaugment import DiffAugment, cutout, translation

POLICY = "color,translation,cutout"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_identity_at_strength_zero_or_empty_policy():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    for policy in (POLICY, "color", "translation", "cutout"):
        assert torch.equal(DiffAugment(x, policy, strength=0.0), x)
    assert torch.equal(DiffAugment(x, "", strength=1.0), x)
    assert not torch.equal(DiffAugment(x, POLICY, strength=1.0), x)


def test_gradients_reach_the_generator():
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(8, 3 * 16 * 16), nn.Tanh(), nn.Unflatten(1, (3, 16, 16)))
    D = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 1))
    D(DiffAugment(G(torch.randn(6, 8)), POLICY, 1.0)).mean().backward()
    for p in G.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # and they are the true gradients of the augmented output (no detached path inside)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: (torch.manual_seed(1), DiffAugment(t, POLICY, 1.0))[1], (x,))


def test_translation_is_a_zero_filled_shift_within_range():
    torch.manual_seed(0)
    x = torch.rand(32, 3, 16, 16) + 1  # strictly positive so zeros mark the fill
    y = translation(x, 1.0)  # up to 1/8 of 16 = 2 px
    for xi, yi in zip(x, y):
        ok = False
        for ty in range(-2, 3):
            for tx in range(-2, 3):
                ref = torch.zeros_like(xi)
                ys, yd = (slice(ty, None), slice(0, 16 - ty)) if ty >= 0 else (slice(0, 16 + ty), slice(-ty, None))
                xs, xd = (slice(tx, None), slice(0, 16 - tx)) if tx >= 0 else (slice(0, 16 + tx), slice(-tx, None))
                ref[:, yd, xd] = xi[:, ys, xs]
                ok = ok or torch.equal(yi, ref)
        assert ok


def test_cutout_zeroes_one_square():
    torch.manual_seed(0)
    y = cutout(torch.ones(64, 3, 16, 16), 1.0)  # half the side: 8 x 8, clipped at borders
    holes = (y[:, 0] == 0)
    area = holes.flatten(1).sum(1)
    assert (area > 0).all() and (area <= 64).all()
    assert (area == 64).any()
    assert torch.equal(y[:, 0], y[:, 1])  # same hole in every channel
    rows, cols = holes.any(2).sum(1), holes.any(1).sum(1)
    assert torch.equal(rows * cols, area)  # a rectangle


def test_color_strength_scales_the_change():
    torch.manual_seed(0)
    x = torch.rand(256, 3, 8, 8) * 2 - 1
    d_half = (DiffAugment(x, "color", 0.5) - x).abs().mean()
    d_full = (DiffAugment(x, "color", 1.0) - x).abs().mean()
    assert 0 < d_half < d_full
    y = DiffAugment(x, "color", 1.0)
    assert not torch.allclose(y[0] - x[0], y[1] - x[1])  # parameters drawn per image


def test_unknown_policy_names_the_config_key():
    with pytest.raises(ValueError, match="vitgan.augment.policy"):
        DiffAugment(torch.zeros(1, 3, 4, 4), "colour", 1.0)
