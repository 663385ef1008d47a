"""FSQ and LFQ (vector-quantize-pytorch) behind our quantizer interface: shapes, straight-through
gradients, indices in range and decodable, usage / perplexity / dead codes as for VQ, the presets."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose
from vqtransformer.config import ConfigError
from vqtransformer.modules.scalar_quantize import FSQuantizer, LFQuantizer, build_quantizer, describe

PRESETS = {"fsq_1k": 1000, "fsq_4k": 4375, "fsq_16k": 15360, "fsq_64k": 64000, "lfq_1k": 1024, "lfq_16k": 16384}


def cb(**kw):
    base = {"kind": "vq", "n_embed": 16, "embed_dim": 8, "levels": None, "beta": 0.25, "entropy_weight": 0.1,
            "diversity_gamma": 1.0, "usage_window": 100, "dead_after": 100}
    return OmegaConf.create({**base, **kw})


QUANTIZERS = [pytest.param(lambda: FSQuantizer([5, 4, 3], 8), id="fsq"),
              pytest.param(lambda: LFQuantizer(64, 8), id="lfq")]


@pytest.mark.parametrize("make", QUANTIZERS)
def test_forward_backward_shapes_straight_through_and_decodable_indices(make):
    torch.manual_seed(0)
    q = make().train()
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    z_q, loss, info = q(z)
    assert z_q.shape == z.shape and loss.dim() == 0 and torch.isfinite(loss)
    idx = info["indices"]
    assert idx.shape == (2, 4, 4) and idx.dtype == torch.long and 0 <= idx.min() and idx.max() < q.n_embed
    assert info["counts"].shape == (q.n_embed,) and info["counts"].sum() == 32
    assert 1 <= float(info["perplexity"]) <= 32
    (z_q.sum() + loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # gradients reach the encoder through the rounding
    q.eval()
    with torch.no_grad():
        z_q, _, info = q(z)
        torch.testing.assert_close(q.get_codebook_entry(info["indices"]), z_q, atol=1e-5, rtol=1e-5)
        flat = q.get_codebook_entry(info["indices"].flatten(), shape=(2, 4, 4))
        torch.testing.assert_close(flat, z_q, atol=1e-5, rtol=1e-5)


def test_fsq_rounding_is_straight_through_on_the_code_channels():
    """Without projections (embed_dim == len(levels)) d z_q / d z is the tanh bound's derivative, not 0."""
    q = FSQuantizer([7, 5, 5], 3).train()
    z = torch.randn(1, 3, 2, 2, requires_grad=True)
    z_q, _, _ = q(z)
    (g,) = torch.autograd.grad(z_q.sum(), z)
    assert (g > 0).all()
    # every value on a level grid: (2 * level index / (L - 1)) - 1 scaled as the library does, finitely many
    assert len(torch.unique(z_q[:, 0])) <= 7


def test_every_code_index_decodes_to_a_distinct_code():
    for q in (FSQuantizer([4, 3, 3], 6), LFQuantizer(32, 6)):
        q.eval()
        all_idx = torch.arange(q.n_embed).view(1, 1, -1)
        codes = q.get_codebook_entry(all_idx)  # [1, D, 1, K]
        assert codes.shape == (1, 6, 1, q.n_embed)
        assert len(torch.unique(codes[0, :, 0].t(), dim=0)) == q.n_embed
    # without a projection (embed_dim = log2 K) an LFQ code encodes back to its own index
    q = LFQuantizer(32, 5).eval()
    all_idx = torch.arange(32).view(1, 1, -1)
    _, _, info = q(q.get_codebook_entry(all_idx))
    assert torch.equal(info["indices"], all_idx)


def test_usage_and_dead_codes_are_counted_like_vq():
    q = FSQuantizer([3, 3], 4, usage_window=2, dead_after=2).train()
    z = torch.randn(4, 4, 4, 4)
    for _ in range(3):
        q(z)
    usage, dead = q.usage()
    _, _, info = q(z)
    used = int((info["counts"] > 0).sum())
    assert 0 < usage <= 1 and math.isclose(q.usage()[0], used / 9, rel_tol=1e-6)
    assert dead == 9 - used and dead >= 0


def test_build_quantizer_kinds_and_errors():
    assert build_quantizer(cb()).kind == "vq"
    f = build_quantizer(cb(kind="fsq", n_embed=60, levels=[5, 4, 3]))
    assert describe(f) == {"kind": "fsq", "size": 60, "dim": 3, "embed_dim": 8}
    assert describe(build_quantizer(cb(kind="lfq", n_embed=256))) == {"kind": "lfq", "size": 256, "dim": 8,
                                                                      "embed_dim": 8}
    with pytest.raises(ConfigError, match=r"codebook.n_embed=16 but codebook.levels=\[5, 4, 3\] give 60"):
        build_quantizer(cb(kind="fsq", levels=[5, 4, 3]))
    with pytest.raises(ConfigError, match="power of 2"):
        build_quantizer(cb(kind="lfq", n_embed=1000))
    with pytest.raises(ConfigError, match="codebook.kind='rvq'"):
        build_quantizer(cb(kind="rvq"))
    with pytest.raises(ConfigError, match="needs codebook.levels"):
        build_quantizer(cb(kind="fsq"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_compose_and_build(name):
    c = compose(["stage=vqgan", f"codebook={name}"]).codebook
    q = build_quantizer(c)
    assert q.n_embed == PRESETS[name] == c.n_embed and q.kind == name.split("_")[0]
    assert c.embed_dim == compose(["stage=vqgan", "codebook=k1024"]).codebook.embed_dim  # one dim for all presets


def test_vq_presets_differ_only_in_size():
    from vqtransformer.tracking.mlflow_tracker import flatten

    flat = {k: flatten(OmegaConf.to_container(compose(["stage=vqgan", f"codebook={k}"]).codebook))
            for k in ("k256", "k1024", "k4096", "k16384")}
    varying = {key for key in flat["k256"] if len({str(f[key]) for f in flat.values()}) > 1}
    assert varying == {"n_embed"}


def test_decorrelation_and_marginal_entropy_gap_are_zero_exactly_when_the_codes_spread():
    from vqtransformer.modules.scalar_quantize import decorrelation, marginal_entropy_gap

    g = torch.Generator().manual_seed(0)
    u = torch.randn(50_000, 3, generator=g)
    assert float(decorrelation(u)) < 1e-3
    assert float(decorrelation(torch.cat([u[:, :1], -2 * u[:, :1]], 1))) == pytest.approx(1.0, abs=1e-4)
    mixed = torch.stack([u[:, 0], u[:, 0] + u[:, 1]], 1)  # corr 1/sqrt(2)
    assert float(decorrelation(mixed)) == pytest.approx(0.5, abs=0.02)
    levels = [8, 5, 3]
    uniform = torch.stack([torch.randint(-(L // 2), (L - 1) // 2 + 1, (50_000,), generator=g).float() for L in levels], 1)
    assert float(marginal_entropy_gap(uniform, levels)) < 1e-3
    assert float(marginal_entropy_gap(torch.zeros(1000, 3), levels)) > 0.5  # every token on the middle level


def test_spread_penalty_is_off_at_zero_weights_and_spreads_the_codes_it_trains():
    """Weights 0 = the papers' FSQ (loss exactly 0); with the penalty alone as the objective on correlated
    channels (4 factors mixed into 8), FSQ's project_in learns decorrelated, spread channels that use many more
    of the 1000 codes, and LFQ's bits decorrelate while the entropy term keeps every code in use."""
    assert float(FSQuantizer([8, 5, 5, 5], 8)(torch.randn(2, 8, 4, 4))[1]) == 0.0
    torch.manual_seed(0)
    z = (torch.randn(4096, 4) @ torch.randn(4, 8)).T.reshape(8, 64, 64).unsqueeze(0)
    for q, more in ((FSQuantizer([8, 5, 5, 5], 8, decorrelation_weight=1.0, marginal_entropy_weight=1.0), 2.0),
                    (LFQuantizer(16, 8, decorrelation_weight=1.0, entropy_weight=0.1), 1.0)):
        q.train()
        with torch.no_grad():
            _, _, before = q(z)
        opt = torch.optim.Adam(q.parameters(), lr=1e-2)
        for _ in range(200):
            opt.zero_grad()
            q(z)[1].backward()
            opt.step()
        with torch.no_grad():
            _, _, after = q(z)
        assert float(after["spread"]) < 0.1 * float(before["spread"]), q.kind
        used_before, used_after = int((before["counts"] > 0).sum()), int((after["counts"] > 0).sum())
        assert used_after >= min(more * used_before, q.n_embed), (q.kind, used_before, used_after)


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [8, 8, 8, 6, 5], [2, 4, 3]], ids=["fsq_1k", "fsq_16k", "levels-of-2"])
def test_bounded_rounds_to_the_library_codes(levels):
    """The penalty acts on what FSQ rounds: round(bounded(z)) + L // 2 is the level index of every channel of the
    library's own code (its ``bound`` / ``symmetry_preserving_bound``), so a library change that moves the bound
    fails here instead of silently penalising the wrong quantity."""
    torch.manual_seed(0)
    q = FSQuantizer(levels, 8).eval()
    z = 2 * torch.randn(4, 8, 16, 16)
    with torch.no_grad():
        _, _, info = q(z)
        u = q.bounded(z)
    library = q.fsq.indices_to_level_indices(info["indices"].reshape(-1))  # [N, d]
    ours = u.round() + torch.tensor(levels) // 2
    clear = ((u - u.floor()) - 0.5).abs() > 1e-4  # away from a rounding boundary (float op order may differ)
    assert float(clear.float().mean()) > 0.999
    assert torch.equal(ours[clear].long(), library[clear].long())
    assert len({int(v) for v in ours[:, 0].unique()}) == levels[0]  # every level of the first channel occurs
