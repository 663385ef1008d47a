"""Text conditioning of the GPT prior (``stage=transformer conditioning=text``): cross-attention to the
text encoder's tokens in every block, padding masked, the null caption of classifier-free guidance,
the KV cache (caption keys/values once per sampling call), the stage's refusals, and a tiny model
trained through ``train.py`` and sampled through ``sample.py prompt=``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import compose, run_train, untrained_vq_checkpoint
from vqtransformer.models.conditioning import ConditionError
from vqtransformer.models.gpt import GPT, SplitLinear, for_cpu_inference
from vqtransformer.modules.text import NULL, PAD, LearnedTextEncoder, WordTokenizer
from vqtransformer.modules.transformer import CrossAttention
from vqtransformer.sampling.autoregressive import (
    SamplingParams,
    make_generator,
    pick,
    sample,
    sample_cached,
    sample_naive,
    sample_sliding,
    window_origin,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops on a shared CPU

V = 16
WORDS = ["a", "red", "blue", "circle", "square", "large", "small"]
PROMPTS = ["a red circle", "a blue square", "a large red square"]


def text_gpt(block_size: int = 20, seed: int = 0, sharpness: float = 40.0) -> GPT:
    """A text GPT whose encoder (16 wide) is narrower than the GPT (32), with a caption that matters."""
    torch.manual_seed(seed)
    enc = LearnedTextEncoder(WordTokenizer(WORDS, context_length=6), max_words=8, n_layer=1, n_head=2, n_embd=16)
    gpt = GPT(V, block_size, 1, n_layer=2, n_head=2, n_embd=32, text_encoder=enc).eval()
    with torch.no_grad():
        gpt.pos_emb.normal_(0, 0.5)
        gpt.head.weight.mul_(sharpness)  # peaked distributions: a wrong context shows up in the tokens
        for b in gpt.blocks:
            b.cross.proj.weight.mul_(10)
    return gpt


def ids(gpt: GPT, prompts: list[str]) -> torch.Tensor:
    return gpt.text_encoder.tokenize(prompts)


class Counter:
    """Counts calls of the text encoder's forward and of the cross-attention key/value projections."""

    def __init__(self, monkeypatch):
        self.encoder, self.kv = [], 0
        enc_fwd, kv = LearnedTextEncoder.forward, CrossAttention.kv

        def count_enc(m, x):
            self.encoder.append(x.shape[0])
            return enc_fwd(m, x)

        def count_kv(m, context):
            self.kv += 1
            return kv(m, context)

        monkeypatch.setattr(LearnedTextEncoder, "forward", count_enc)
        monkeypatch.setattr(CrossAttention, "kv", count_kv)


def test_text_blocks_cross_attend_and_other_gpts_keep_their_parameter_names():
    plain = GPT(V, 20, 5, n_layer=2, n_head=2, n_embd=32)
    keys = set(plain.state_dict())
    assert not any(("cross" in k or "ln_c" in k or "text_encoder" in k) for k in keys)
    assert {"blocks.0.ln1.weight", "blocks.0.attn.query.weight", "blocks.1.mlp.2.weight", "tok_emb.weight"} <= keys
    gpt = text_gpt()
    extra = set(gpt.state_dict()) - keys
    assert {"blocks.0.ln_c.weight", "blocks.1.cross.query.weight", "blocks.1.cross.proj.bias",
            "text_encoder.null_emb", "text_encoder._extra_state"} <= extra
    assert gpt.blocks[0].cross.key.weight.shape == (32, 16)  # keys from the encoder's 16-wide tokens
    assert keys <= set(gpt.state_dict())
    assert gpt.tok_emb.num_embeddings == V + 1  # the image sequence layout: one start token, then the codes


def test_padding_changes_nothing_and_the_caption_matters():
    gpt = text_gpt()
    x = gpt.sequence(torch.zeros(2, 1, dtype=torch.long), torch.randint(0, V, (2, 12)))
    padded = ids(gpt, PROMPTS[:2])  # 3 words + 3 pads
    assert (padded[:, 3:] == PAD).all()
    with torch.no_grad():
        out = gpt(x, context=padded)
        torch.testing.assert_close(gpt(x, context=padded[:, :3]), out)  # no padding at all: the same
        gpt.text_encoder.tok_emb.weight[PAD].normal_(0, 5.0)  # whatever the padded positions hold
        gpt.text_encoder.pos_emb[:, 3:].normal_(0, 5.0)
        torch.testing.assert_close(gpt(x, context=padded), out)
        other = gpt(x, context=ids(gpt, PROMPTS[1:3]))
        null = gpt(x, context=gpt.null_text(2))
    assert not torch.allclose(other[0], out[0]) and not torch.allclose(null, out)
    assert gpt.null_text(2)[:, 0].tolist() == [NULL, NULL]


def test_cached_forward_equals_full_forward_and_caption_keys_are_computed_once(monkeypatch):
    gpt = text_gpt()
    x = gpt.sequence(torch.zeros(2, 1, dtype=torch.long), torch.randint(0, V, (2, 12)))
    t = ids(gpt, PROMPTS[:2])
    with torch.no_grad():
        full = gpt(x, context=t)
        count = Counter(monkeypatch)
        cache = gpt.new_cache(2, x.shape[1], context=t)
        parts = [gpt(x[:, :4], cache)] + [gpt(x[:, i:i + 1], cache) for i in range(4, x.shape[1])]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        assert count.encoder == [2] and count.kv == gpt.n_layer  # once, not once per token
        cache.reset()  # keeps the caption's keys/values
        torch.testing.assert_close(gpt(x[:, :7], cache, last_only=True), full[:, 6], rtol=1e-5, atol=1e-5)
        late = gpt.new_cache(2, x.shape[1])  # or the first call brings the context
        torch.testing.assert_close(torch.cat([gpt(x[:, :5], late, context=t), gpt(x[:, 5:], late)], 1), full,
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="text-conditional"):
            gpt(x)
        with pytest.raises(ValueError, match="twice"):
            gpt(x[:, :1], late, context=t)
        with pytest.raises(ValueError, match="1 captions for 2 sequences"):
            gpt(x, context=t[:1])
        with pytest.raises(ValueError, match="not text-conditional"):
            GPT(V, 20, 1, n_layer=1, n_head=2, n_embd=32)(x, context=t)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(top_k=4, temperature=0.8),
                                    SamplingParams(temperature=0), SamplingParams(top_k=5, cfg_scale=3.0)])
def test_cached_sampling_equals_naive_and_encodes_captions_once(params, monkeypatch):
    gpt = text_gpt()
    c = torch.zeros(3, 1, dtype=torch.long)
    t, u = ids(gpt, PROMPTS), gpt.null_text(3)
    uc = c if params.cfg_scale != 1.0 else None
    count = Counter(monkeypatch)
    a = sample_cached(gpt, c, 16, uc=uc, params=params, generator=make_generator(7), text=t, utext=u)
    rows = 6 if params.cfg_scale != 1.0 else 3  # [captions; null captions] in one pass
    assert count.encoder == [rows] and count.kv == gpt.n_layer
    b = sample_naive(gpt, c, 16, uc=uc, params=params, generator=make_generator(7), text=t, utext=u)
    assert a.shape == (3, 16) and torch.equal(a, b)
    assert count.encoder == [rows, rows]  # the naive sampler too encodes once (its cross-attention per step)
    other = sample_cached(gpt, c, 16, uc=uc, params=params, generator=make_generator(7),
                          text=ids(gpt, ["a small blue circle"] * 3), utext=u)
    assert not torch.equal(a, other)  # the caption matters


def test_guidance_scale_one_equals_plain_conditional_sampling():
    gpt = text_gpt(sharpness=5.0)
    c, t, u = torch.zeros(2, 1, dtype=torch.long), ids(gpt, PROMPTS[:2]), gpt.null_text(2)
    plain = sample_cached(gpt, c, 16, params=SamplingParams(top_k=5), generator=make_generator(2), text=t)
    guided = sample_cached(gpt, c, 16, uc=c, params=SamplingParams(top_k=5, cfg_scale=1.0),
                           generator=make_generator(2), text=t, utext=u)
    assert torch.equal(plain, guided)
    # the guided path proper (stacked [captions; null captions]) at scale 1 gives the conditional tokens too
    params = SamplingParams(top_k=5, cfg_scale=1.0 + 1e-12)
    assert torch.equal(plain, sample_cached(gpt, c, 16, uc=c, params=params, generator=make_generator(2),
                                            text=t, utext=u))
    strong = SamplingParams(top_k=5, cfg_scale=3.0)
    a = sample_cached(gpt, c, 16, uc=c, params=strong, generator=make_generator(2), text=t, utext=u)
    assert not torch.equal(a, plain)
    with pytest.raises(ValueError, match="null caption"):
        sample_cached(gpt, c, 16, uc=c, params=strong, text=t)


def test_sliding_window_and_half_completion_take_the_captions(monkeypatch):
    params = SamplingParams(top_k=6)
    gpt = text_gpt(block_size=9)
    c, t = torch.zeros(2, 1, dtype=torch.long), ids(gpt, PROMPTS[:2])
    count = Counter(monkeypatch)
    out = sample_sliding(gpt, c, (6, 6), (3, 3), params=params, generator=make_generator(3), text=t)
    assert count.encoder == [2] and count.kv == gpt.n_layer  # kept by the cache across all windows
    ref = torch.zeros(2, 6, 6, dtype=torch.long)  # taming's sliding sampler: every window recomputed
    gen = make_generator(3)
    for i in range(6):
        for j in range(6):
            i0, j0 = window_origin(i, 6, 3), window_origin(j, 6, 3)
            x = gpt.sequence(c, ref[:, i0:i0 + 3, j0:j0 + 3].flatten(1))[:, :-1]
            ref[:, i, j] = pick(gpt(x, context=t)[:, (i - i0) * 3 + (j - j0)], params, gen)
    assert torch.equal(out, ref)
    gpt = text_gpt()
    z = torch.randint(0, V, (2, 4, 4))
    half = sample(gpt, c, (4, 4), z=z, start=8, generator=make_generator(0), text=t)
    assert torch.equal(half.flatten(1)[:, :8], z.flatten(1)[:, :8])
    assert torch.equal(half.flatten(1), sample_naive(gpt, c, 8, z.flatten(1)[:, :8], generator=make_generator(0),
                                                     text=t))
    slid = sample_sliding(gpt, c, (4, 4), (4, 4), params=params, generator=make_generator(5), text=t)
    assert torch.equal(slid, sample(gpt, c, (4, 4), params=params, generator=make_generator(5), text=t))


def test_cpu_inference_copy_of_a_text_gpt():
    gpt = text_gpt()
    fast = for_cpu_inference(gpt, batch_hint=1)
    assert fast is not gpt and any(isinstance(m, SplitLinear) for m in fast.blocks.modules())
    assert fast.text_encoder is gpt.text_encoder  # runs once per call: shared as it is, not copied
    assert not any(isinstance(m, SplitLinear) for m in gpt.modules())
    assert all(p.requires_grad for p in gpt.parameters())  # the model (and its encoder) untouched
    c, t = torch.zeros(3, 1, dtype=torch.long), ids(gpt, PROMPTS)
    p = SamplingParams(top_k=8)
    a = sample_cached(fast, c, 16, params=p, generator=make_generator(4), text=t)
    assert torch.equal(a, sample_cached(gpt, c, 16, params=p, generator=make_generator(4), text=t))


class NegativeIdEncoder(torch.nn.Module):
    """A stand-in with the CLIP encoder's id convention (null -1, padding -2) and a frozen part
    outside the registered submodules: the GPT relies on the interface only, not on the learned encoder."""

    class Tokenizer:
        context_length = 5

        def encode(self, captions):
            ids = torch.full((len(captions), 5), -2, dtype=torch.long)
            for b, text in enumerate(captions):
                toks = [len(w) % 7 for w in text.split()][:5]
                ids[b, :len(toks)] = torch.tensor(toks)
            return ids

        def null(self, n):
            ids = torch.full((n, 5), -2, dtype=torch.long)
            ids[:, 0] = -1
            return ids

    n_embd, null_id = 8, -1

    def __init__(self):
        super().__init__()
        self.tokenizer = self.Tokenizer()
        self.__dict__["frozen"] = torch.nn.Embedding(7, 8).requires_grad_(False)
        self.null_emb = torch.nn.Parameter(torch.randn(1, 1, 8))

    def tokenize(self, captions):
        return self.tokenizer.encode(captions)

    def forward(self, ids):
        keep, null = ids != -2, ids[:, 0] == -1
        keep[:, 0] = True
        x = self.frozen(ids.clamp(min=0))
        x = torch.where(null[:, None, None], self.null_emb.expand_as(x), x)
        return x, torch.where(null[:, None], torch.arange(ids.shape[1]) == 0, keep)


def test_any_encoder_of_the_interface_serves_a_clip_like_one():
    torch.manual_seed(0)
    enc = NegativeIdEncoder()
    gpt = GPT(V, 20, 1, n_layer=2, n_head=2, n_embd=32, text_encoder=enc).eval()
    with torch.no_grad():
        gpt.head.weight.mul_(40)
        for b in gpt.blocks:
            b.cross.proj.weight.mul_(10)
    c, t, u = torch.zeros(2, 1, dtype=torch.long), enc.tokenize(["a red circle", "a blue square"]), gpt.null_text(2)
    p = SamplingParams(top_k=5, cfg_scale=2.0)
    a = sample_cached(gpt, c, 16, uc=c, params=p, generator=make_generator(1), text=t, utext=u)
    assert torch.equal(a, sample_naive(gpt, c, 16, uc=c, params=p, generator=make_generator(1), text=t, utext=u))
    fast = for_cpu_inference(gpt)
    assert fast is not gpt and fast.text_encoder is enc
    assert torch.equal(a, sample_cached(fast, c, 16, uc=c, params=p, generator=make_generator(1), text=t, utext=u))


# -- the stage -----------------------------------------------------------------------------------
def tiny_vq():
    from tests.stages.test_transformer_stage import tiny_vq as make

    return make()


def text_stage(conditioning: str = "text", *overrides: str):
    from vqtransformer.stages.transformer import TransformerStage

    text = ["text_encoder.vocab_captions=100", "text_encoder.n_layer=1", "text_encoder.n_head=2"]
    cfg = compose(["stage=transformer", "first_stage.ckpt=unused", "data.resolution=16", "data.batch_size=4",
                   "transformer.n_layer=2", "transformer.n_embd=32", "transformer.n_head=2",
                   "transformer.block_size=16", "trainer.max_steps=10", "stage.val_samples=2",
                   f"conditioning={conditioning}", *(text if conditioning == "text" else []), *overrides])
    return TransformerStage(cfg, first_stage=tiny_vq())


@pytest.fixture(scope="module")
def stage():
    return text_stage()


def shapes_batch(n: int = 4) -> dict:
    from tests.stages.test_transformer_stage import shapes_batch as make

    return make(n)


def test_the_null_caption_replaces_captions_with_probability_p_uncond_in_training(stage):
    assert stage.condition_type == "text" and stage.gpt.cond_vocab_size == 1 and stage.cond_len == 1
    assert {"red", "circle", "striped", "background"} <= set(stage.gpt.text_encoder.tokenizer.words)
    stage.cond.p_uncond = 0.3
    try:
        torch.manual_seed(0)
        y = stage.caption_ids({"caption": ["a small blue ring on a striped background"] * 4000}, drop=True)
        null = y[:, 0] == NULL
        assert abs(null.float().mean().item() - 0.3) < 0.03
        assert torch.equal(y[null], stage.gpt.null_text(int(null.sum()))) and not (y[~null] == NULL).any()
        seen = []  # and training_step feeds the dropped captions to the GPT
        orig = stage.logits
        stage.logits = lambda gpt, x, c, context=None: seen.append(context) or orig(gpt, x, c, context)
        batch = shapes_batch(4)
        for _ in range(10):
            loss, logs = stage.training_step(batch, 0, 0)
        rows = torch.cat(seen)
        n_null = int((rows[:, 0] == NULL).sum())
        assert 3 <= n_null <= 25 and rows.shape[0] == 40  # ~12 of 40
        assert torch.isfinite(loss) and set(logs) == {"loss/train"}
    finally:
        stage.cond.p_uncond = 0.1
        del stage.logits


def test_stage_samples_prompts_refuses_class_labels_and_class_models_refuse_prompts(stage):
    prompt = "a large red circle on a striped background"
    a = stage.sample_codes(2, prompt, seed=1)
    assert torch.equal(a, stage.sample_codes(2, [prompt, prompt], seed=1, cfg_scale=1.0))
    assert stage.sample_codes(2, {"caption": [prompt] * 2}, seed=1, cfg_scale=3.0).shape == (2, 4, 4)
    assert stage.sample(2, None, seed=0).shape == (2, 3, 16, 16)  # the null caption
    assert stage.sample(1, prompt, grid=(4, 8), seed=0).shape == (1, 3, 16, 32)  # sliding window
    assert stage.sample(2, prompt, complete=shapes_batch(2), seed=0).shape == (2, 3, 16, 16)
    for bad in ([0, 1], 3, torch.tensor([1, 2]), {"class_label": torch.tensor([0, 1])}):
        with pytest.raises(ConditionError, match="text-conditional|conditioning.type=text"):
            stage.sample(2, bad)
    with pytest.raises(ConditionError, match="3 prompts for 2 samples"):
        stage.sample(2, ["a", "b", "c"])
    cls = text_stage("class", "conditioning.p_uncond=0.1")
    for bad in ("a red circle", ["a red circle", "a blue ring"]):
        with pytest.raises(ConditionError, match="prompts are for text-conditional models"):
            cls.sample(2, bad)
    with pytest.raises(ConditionError, match="conditioning.type=class"):
        cls.sample(2, {"caption": ["a red circle"] * 2})
    no_guidance = text_stage("text", "conditioning.p_uncond=0")
    with pytest.raises(ConditionError, match="p_uncond"):
        no_guidance.sample(2, prompt, cfg_scale=2.0)


def test_stage_validation_nll_and_caption_grid(stage):
    batch = shapes_batch(4)
    stage.train(False)
    nll = stage.nll(batch)
    assert nll.shape == (4, 16) and torch.isfinite(nll).all()
    other = stage.nll({**batch, "caption": ["a small blue ring on a plain background"] * 4})
    assert not torch.allclose(nll, other)  # the captions condition the likelihood
    grids = stage.validation_images(batch)
    assert set(grids) == {"samples", "caption_samples"}
    g = grids["caption_samples"]
    assert g.shape[0] == 3 and g.shape[1] > 4 * 128  # four labelled rows of upscaled tiles
    with pytest.raises(ConditionError, match="caption"):
        stage.training_step({k: v for k, v in batch.items() if k != "caption"}, 0, 0)


# -- end to end: train.py, then sample.py prompt= -------------------------------------------------
def test_train_py_then_sample_py_prompt(tmp_path):
    vq = untrained_vq_checkpoint(tmp_path / "vq.ckpt")
    r = run_train(["stage=transformer", f"first_stage.ckpt={vq}", "conditioning=text", "data=shapes",
                   "data.resolution=16", "data.batch_size=4", "data.val_size=8", "data.num_workers=0",
                   "transformer.n_layer=1", "transformer.n_head=2", "transformer.n_embd=32",
                   "transformer.block_size=16", "text_encoder.n_layer=1", "text_encoder.n_head=2",
                   "text_encoder.vocab_captions=200", "stage.val_samples=2", "trainer.max_steps=3",
                   "trainer.val_every=3", "trainer.ckpt_every=3", "trainer.val_batches=1", "trainer.log_every=1",
                   "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    base = [sys.executable, "sample.py", f"ckpt={ckpt}", "n=2", "cfg_scale=2", "top_k=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "s"
    r = subprocess.run(base + ["prompt=a red circle", f"out_dir={out}"], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "grid.png").is_file() and (out / "prompts.txt").read_text() == "a red circle\n"
    assert sorted(p.name for p in out.glob("sample_*.png")) == ["sample_p000_00000.png", "sample_p000_00001.png"]
    r = subprocess.run(base + ["half=true", f"out_dir={tmp_path / 'v'}"], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]  # no prompt: the validation captions (and their images' halves)
    assert (tmp_path / "v" / "inputs_and_completions.png").is_file()
    r = subprocess.run(base + ["class_label=1"], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 2 and "class_label=1, but this model was trained with conditioning.type=text" in r.stderr
