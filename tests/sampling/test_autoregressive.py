"""Autoregressive samplers: cached == naive, sliding window, filtering, guidance, bad inputs."""

import pytest
import torch

from vqtransformer.models.gpt import GPT, SplitLinear, for_cpu_inference
from vqtransformer.sampling.autoregressive import (
    SamplingParams,
    guide,
    make_generator,
    pick,
    sample,
    sample_cached,
    sample_naive,
    sample_sliding,
    top_k_filter,
    top_p_filter,
    window_origin,
)

V, C = 16, 6


def make_gpt(block_size: int = 20, seed: int = 0, sharpness: float = 40.0) -> GPT:
    torch.manual_seed(seed)
    gpt = GPT(V, block_size, C, n_layer=2, n_head=2, n_embd=32).eval()
    with torch.no_grad():
        gpt.pos_emb.normal_(0, 0.5)
        gpt.head.weight.mul_(sharpness)  # peaked distributions, so a wrong context shows up in the tokens
    return gpt


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(top_k=4, temperature=0.8),
                                    SamplingParams(top_p=0.7), SamplingParams(temperature=0)])
def test_cached_equals_naive(params):
    gpt = make_gpt()
    c = torch.tensor([[0], [1], [2], [3]])
    a = sample_cached(gpt, c, 16, params=params, generator=make_generator(7))
    b = sample_naive(gpt, c, 16, params=params, generator=make_generator(7))
    assert a.shape == (4, 16) and torch.equal(a, b)
    assert torch.equal(a, sample_cached(gpt, c, 16, params=params, generator=make_generator(7)))  # deterministic
    if params.temperature:
        assert not torch.equal(a, sample_cached(gpt, c, 16, params=params, generator=make_generator(8)))


def test_half_image_completion_keeps_the_given_half():
    gpt = make_gpt()
    c = torch.tensor([[0], [5]])
    z = torch.randint(0, V, (2, 4, 4))
    out = sample(gpt, c, (4, 4), z=z, start=8, generator=make_generator(0))
    assert out.shape == (2, 4, 4) and torch.equal(out.flatten(1)[:, :8], z.flatten(1)[:, :8])
    naive = sample_naive(gpt, c, 8, z.flatten(1)[:, :8], generator=make_generator(0))
    assert torch.equal(out.flatten(1), naive)


def test_window_origin_is_centred_except_at_borders():
    # taming: local_i = i if i <= 8, 16 - (H - i) if H - i < 8, else 8 (window 16)
    H = 40
    for i in range(H):
        local = i if i <= 8 else (16 - (H - i) if H - i < 8 else 8)
        assert window_origin(i, H, 16) == i - local


def sliding_reference(gpt, c, grid, window, params, gen):
    """Taming's sliding sampler: the whole window recomputed for every position."""
    (H, W), (h, w) = grid, window
    z = torch.zeros(c.shape[0], H, W, dtype=torch.long)
    for i in range(H):
        for j in range(W):
            i0, j0 = window_origin(i, H, h), window_origin(j, W, w)
            cw = c[:, i0:i0 + h, j0:j0 + w].flatten(1) if c.dim() == 3 else c
            x = gpt.sequence(cw, z[:, i0:i0 + h, j0:j0 + w].flatten(1))[:, :-1]
            k = cw.shape[1] - 1 + (i - i0) * w + (j - j0)
            z[:, i, j] = pick(gpt(x)[:, k], params, gen)
    return z


@pytest.mark.parametrize("spatial", [False, True])
def test_sliding_window_on_a_grid_twice_the_training_size(spatial):
    params = SamplingParams(top_k=6)
    if spatial:  # a spatial condition: one token per image position, cropped with the window
        gpt = make_gpt(block_size=2 * 9 - 1)
        c = torch.randint(0, C, (2, 6, 6))
    else:
        gpt = make_gpt(block_size=1 + 9 - 1)
        c = torch.tensor([[1], [4]])
    out = sample_sliding(gpt, c, (6, 6), (3, 3), params=params, generator=make_generator(3))
    assert out.shape == (2, 6, 6) and out.dtype == torch.long and 0 <= out.min() and out.max() < V
    assert torch.equal(out, sample_sliding(gpt, c, (6, 6), (3, 3), params=params, generator=make_generator(3)))
    assert not torch.equal(out, sample_sliding(gpt, c, (6, 6), (3, 3), params=params, generator=make_generator(4)))
    ref = sliding_reference(gpt, c, (6, 6), (3, 3), params, make_generator(3))
    assert torch.equal(out, ref)  # KV reuse while the window rests changes nothing


def test_sliding_window_equals_plain_sampling_when_the_grid_fits():
    gpt = make_gpt(block_size=1 + 16 - 1)
    c = torch.tensor([[0], [2], [3]])
    plain = sample_cached(gpt, c, 16, params=SamplingParams(top_p=0.9), generator=make_generator(5))
    slid = sample_sliding(gpt, c, (4, 4), (4, 4), params=SamplingParams(top_p=0.9), generator=make_generator(5))
    assert torch.equal(slid.flatten(1), plain)


def test_top_k_filter():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 1.0, 3.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).sum(1).tolist() == [2, 2]
    assert torch.isfinite(out[0, [1, 3]]).all() and torch.isfinite(out[1, [2, 4]]).all()
    torch.testing.assert_close(top_k_filter(logits, 5), logits)
    gen = make_generator(0)
    draws = torch.stack([pick(logits, SamplingParams(top_k=2), gen) for _ in range(200)])
    assert set(draws[:, 0].tolist()) <= {1, 3} and set(draws[:, 1].tolist()) <= {2, 4}


def test_top_p_filter():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.4) == [0]          # the top token alone reaches 0.4
    assert kept(0.8) == [0, 2]       # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [0, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3]
    gen = make_generator(1)
    draws = {pick(logits, SamplingParams(top_p=0.8), gen).item() for _ in range(200)}
    assert draws == {0, 2}


def test_guidance_formula():
    cond, uncond = torch.randn(3, V), torch.randn(3, V)
    for s in (0.0, 1.0, 3.0):
        torch.testing.assert_close(guide(torch.cat((cond, uncond)), s), uncond + s * (cond - uncond))
    assert torch.equal(guide(torch.cat((cond, uncond)), 1.0), cond)


def test_classifier_free_guidance_scale_one_equals_plain_conditional_sampling():
    gpt = make_gpt(sharpness=5.0)
    with torch.no_grad():
        gpt.tok_emb.weight[V:].mul_(50)  # a condition that matters
    c, uc = torch.tensor([[1], [2]]), torch.tensor([[5], [5]])
    plain = sample_cached(gpt, c, 16, params=SamplingParams(top_k=5), generator=make_generator(2))
    guided = sample_cached(gpt, c, 16, uc=uc, params=SamplingParams(top_k=5, cfg_scale=1.0),
                           generator=make_generator(2))
    assert torch.equal(plain, guided)
    # the guided path proper (stacked cond/uncond batch) at scale 1 gives the conditional tokens too
    params = SamplingParams(top_k=5, cfg_scale=1.0 + 1e-12)
    assert params.cfg_scale != 1.0
    assert torch.equal(plain, sample_cached(gpt, c, 16, uc=uc, params=params, generator=make_generator(2)))
    # a real guidance scale changes samples, identically in all samplers
    strong = SamplingParams(top_k=5, cfg_scale=3.0)
    a = sample_cached(gpt, c, 16, uc=uc, params=strong, generator=make_generator(2))
    assert torch.equal(a, sample_naive(gpt, c, 16, uc=uc, params=strong, generator=make_generator(2)))
    assert not torch.equal(a, plain)


def test_bad_inputs():
    gpt = make_gpt(block_size=16)
    c = torch.tensor([[0]])
    with pytest.raises(ValueError, match="block_size"):  # 1 + 25 - 1 > 16, before any work
        sample(gpt, c, (5, 5))
    with pytest.raises(ValueError, match="block_size"):  # window itself too large
        sample(gpt, c, (8, 8), window=(5, 5))
    with pytest.raises(ValueError, match="cfg_scale"):
        sample(gpt, c, (3, 3), params=SamplingParams(cfg_scale=2.0))
    with pytest.raises(ValueError, match="grid"):
        sample_sliding(gpt, torch.zeros(1, 4, 4, dtype=torch.long), (6, 6), (3, 3))
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


@pytest.mark.parametrize("batch_hint", [1, 8])  # x W^T blocks for single rows, W x^T blocks for batches
def test_cpu_inference_copy_samples_like_the_model(batch_hint):
    gpt = make_gpt()
    fast = for_cpu_inference(gpt, batch_hint=batch_hint)
    assert fast is not gpt
    assert all(b.attn.fused_qkv is not None and b.attn.query is None for b in fast.blocks)
    assert any(isinstance(m, SplitLinear) for m in fast.modules())
    assert not any(isinstance(m, SplitLinear) for m in gpt.modules())  # the model itself is untouched
    x = gpt.sequence(torch.randint(0, C, (3, 1)), torch.randint(0, V, (3, 12)))
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), gpt(x), rtol=1e-4, atol=1e-4)
    c = torch.tensor([[0], [1], [2]])
    a = sample_cached(fast, c, 16, params=SamplingParams(top_k=8), generator=make_generator(4))
    assert torch.equal(a, sample_naive(fast, c, 16, params=SamplingParams(top_k=8), generator=make_generator(4)))
    assert torch.equal(a, sample_cached(gpt, c, 16, params=SamplingParams(top_k=8), generator=make_generator(4)))
