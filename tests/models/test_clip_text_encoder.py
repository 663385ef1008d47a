"""``text_encoder=clip`` (vqtransformer/modules/clip_text.py): a frozen CLIP text model through ``transformers``,
here a tiny randomly initialised one with a tiny BPE vocabulary, saved with ``save_pretrained`` (no download)."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("transformers", reason="text_encoder=clip needs transformers (pip install -e .)")

from tests.conftest import ROOT, compose, run_train, untrained_vq_checkpoint  # noqa: E402
from vqtransformer.modules.clip_text import NULL_ID, PAD_ID, CLIPTextEncoder  # noqa: E402
from vqtransformer.weights import WeightsUnavailableError  # noqa: E402

WORDS = ("a", "red", "blue", "green", "circle", "square", "ring", "large", "small", "on", "striped", "plain",
         "background", "above", "below", "with", "more", "shape", "shapes")


def _bpe(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """A tiny CLIP-style BPE: every character (alone and word-final "</w>"), merges that build each word
    left to right, and CLIP's two special tokens."""
    vocab: dict[str, int] = {}
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny-clip")
    vocab, merges = _bpe()
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    tok.save_pretrained(d)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    CLIPTextModel(config).save_pretrained(d)
    return d


def _encoder(clip_dir, **kw) -> CLIPTextEncoder:
    return CLIPTextEncoder.from_config(OmegaConf.create({"kind": "clip", "path": str(clip_dir), **kw}))


def _count_clip_rows(enc: CLIPTextEncoder) -> tuple[list[int], object]:
    rows: list[int] = []
    return rows, enc.clip.register_forward_hook(lambda m, a, kw, o: rows.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)


def test_tiny_bpe_tokenises_captions_and_the_encoder_loads_from_path(clip_dir, caplog):
    enc = _encoder(clip_dir, context_length=12)
    hf = enc.tokenizer.hf
    assert hf.convert_ids_to_tokens(hf("a red circle")["input_ids"]) == \
        ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    ids = enc.tokenize(["a red circle", ""])
    bos, eos = hf.bos_token_id, hf.eos_token_id
    assert ids[0, :5].tolist()[::4] == [bos, eos] and (ids[0, 5:] == PAD_ID).all()
    assert ids[1, :2].tolist() == [bos, eos] and (ids[1, 2:] == PAD_ID).all()
    assert enc.n_embd == 32 and enc.tokenizer.context_length == 12 and enc.null_id == NULL_ID < 0
    long = enc.tokenize(["a large red circle above a small blue square on a striped background"] * 2)
    assert long.shape == (2, 12) and long[0, -1].item() == eos and (long != PAD_ID).all()  # EOS kept at the end
    assert caplog.text.count("truncated to text_encoder.context_length=12") == 1
    with pytest.raises(Exception, match="text_encoder.context_length=99"):
        _encoder(clip_dir, context_length=99)


def test_padding_is_masked_and_the_null_caption_is_one_learned_token(clip_dir):
    enc = _encoder(clip_dir, context_length=16, cache_size=0)
    ids = enc.tokenize(["a red circle", "a large blue square on a striped background"])
    x, keep = enc(ids)
    assert x.shape == (2, 16, 32) and keep[0].tolist() == [True] * 5 + [False] * 11
    assert (x[~keep] == 0).all()
    alone, _ = enc(enc.tokenize(["a red circle"]))  # another batch: another padding length for CLIP
    longer = _encoder(clip_dir, context_length=40, cache_size=0)
    wide, _ = longer(longer.tokenize(["a red circle"]))
    torch.testing.assert_close(alone[0, :5], x[0, :5])
    torch.testing.assert_close(wide[0, :5], x[0, :5])
    # whatever CLIP's input holds at the padding, the caption's tokens do not see it
    real = ids.clamp(min=0)
    with torch.no_grad():
        a = enc.clip(input_ids=real, attention_mask=keep.long()).last_hidden_state
        b = enc.clip(input_ids=torch.where(keep, real, torch.randint_like(real, 0, 60)),
                     attention_mask=keep.long()).last_hidden_state
    torch.testing.assert_close(a[keep], b[keep])
    torch.testing.assert_close(x[keep], a[keep])
    torch.testing.assert_close(enc.pooled(ids)[1], x[1, keep[1].sum() - 1])  # the EOS token's
    # the null caption (tokenizer.null, or a row filled with null_id as a dropped caption is)
    for null in (enc.tokenizer.null(2), torch.full((2, 16), enc.null_id)):
        nx, nkeep = enc(null)
        assert nkeep.tolist() == [[True] + [False] * 15] * 2
        torch.testing.assert_close(nx[:, 0], enc.null_emb[0].expand(2, -1))
        assert (nx[:, 1:] == 0).all()
    mixed = torch.cat([ids[:1], enc.tokenizer.null(1)])
    mx, _ = enc(mixed)
    mx.sum().backward()  # only the null token learns; CLIP is frozen and stays in eval mode
    assert enc.null_emb.grad is not None and enc.null_emb.grad.abs().sum() > 0
    enc.train()
    assert not enc.clip.training and not any(p.requires_grad for p in enc.clip.parameters())
    assert [n for n, _ in enc.named_parameters()] == ["null_emb"]


def test_clip_runs_once_per_distinct_caption_across_steps(clip_dir):
    from vqtransformer.models.vqdiffusion import VQDiffusionTransformer

    enc = _encoder(clip_dir, context_length=16, cache_size=100)
    net = VQDiffusionTransformer(10, (2, 2), n_layer=1, n_head=2, n_embd=16, text_encoder=enc)
    rows, hook = _count_clip_rows(enc)
    try:
        caps = ["a red circle", "a blue ring", "a red circle", "a green square"]
        ids = enc.tokenize(caps)
        x_t, t = torch.randint(0, 11, (4, 4)), torch.tensor([1, 3, 5, 7])
        net.train()
        for _ in range(3):  # training steps: grad enabled, the denoiser's own cache is off
            net(x_t, t, ids).sum().backward()
        assert rows == [3]  # one pass, three distinct captions
        net.eval()
        with torch.no_grad():
            for step in range(5):  # denoising steps, with and without the null captions of guidance
                if step % 2:
                    net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([ids, enc.tokenizer.null(4)]))
                else:
                    net(x_t, t, ids)
        net(x_t, t, enc.tokenize(["a blue ring", "a small ring", "a small ring", "a red circle"]))
        assert rows == [3, 1]  # only the new caption
        fresh = _encoder(clip_dir, context_length=16, cache_size=0)
        torch.testing.assert_close(enc(ids)[0], fresh(ids)[0])  # the cached output is CLIP's output
    finally:
        hook.remove()
    small = _encoder(clip_dir, context_length=16, cache_size=2)
    small(small.tokenize(["a", "a red circle", "a blue ring", "a green square"]))
    assert len(small._cache) == 2  # bounded (least recently used out)
    small.to(torch.float64)
    assert not small._cache and small.clip.dtype == torch.float64  # moved with the module, cache dropped


def test_state_dict_has_the_null_token_not_clip_and_round_trips(clip_dir, tmp_path):
    from vqtransformer.models.vqdiffusion import VQDiffusionTransformer

    cfg = compose(["stage=vqdiffusion", "conditioning=text", "text_encoder=clip", f"text_encoder.path={clip_dir}",
                   "transformer.n_layer=1", "transformer.n_head=2", "transformer.n_embd=16"])
    assert cfg.text_encoder.model_id == "openai/clip-vit-base-patch32" and cfg.text_encoder.context_length == 77
    torch.manual_seed(0)
    net = VQDiffusionTransformer.from_config(cfg, 10, (2, 2)).eval()
    assert isinstance(net.text_encoder, CLIPTextEncoder)
    ids = net.text_encoder.tokenize(["a red circle", "a blue square"])
    out = net(torch.randint(0, 11, (2, 4)), torch.tensor([2, 5]), ids)
    assert out.shape == (2, 4, 10)
    sd = net.state_dict()
    text_keys = sorted(k for k in sd if k.startswith("text_encoder."))
    assert text_keys == ["text_encoder._extra_state", "text_encoder.null_emb"]
    assert sd["text_encoder._extra_state"]["path"] == str(clip_dir)
    assert sd["text_encoder._extra_state"]["model_id"] == "openai/clip-vit-base-patch32"
    torch.save(sd, tmp_path / "net.pt")
    torch.manual_seed(1)
    again = VQDiffusionTransformer.from_config(cfg, 10, (2, 2))
    assert not torch.equal(again.text_encoder.null_emb, net.text_encoder.null_emb)
    again.load_state_dict(torch.load(tmp_path / "net.pt", weights_only=True))
    torch.testing.assert_close(again.text_encoder.null_emb, net.text_encoder.null_emb)


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "VQT_OFFLINE"])
def test_missing_clip_weights_name_the_model_the_cache_and_the_key(tmp_path, monkeypatch, flag):
    from vqtransformer.models.conditioning import build_text_encoder

    for k in ("HF_HUB_OFFLINE", "VQT_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(flag, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = OmegaConf.create({"text_encoder": {"kind": "clip", "model_id": "openai/clip-vit-base-patch32",
                                             "path": None, "context_length": 77}})
    with pytest.raises(WeightsUnavailableError) as e:
        build_text_encoder(cfg)
    msg = str(e.value)
    assert "openai/clip-vit-base-patch32" in msg and str(tmp_path / "hf" / "hub") in msg
    assert "text_encoder.path=" in msg and flag in msg
    if flag == "VQT_OFFLINE":  # online, but the hub unreachable: the same error at once, no download retries
        monkeypatch.delenv(flag)
        monkeypatch.setattr("socket.create_connection", _no_network)
        with pytest.raises(WeightsUnavailableError, match="cannot be reached.*text_encoder.path=DIR"):
            build_text_encoder(cfg)
    cfg.text_encoder.path = str(tmp_path / "nowhere")
    with pytest.raises(WeightsUnavailableError, match=r"text_encoder.path=.*nowhere.*text_encoder.path=DIR") as e:
        build_text_encoder(cfg)
    assert "openai/clip-vit-base-patch32" in str(e.value) and str(tmp_path / "hf" / "hub") in str(e.value)


def _no_network(*args, **kwargs):
    raise OSError("no network in this test")


def test_model_id_is_read_from_the_hugging_face_cache_offline(clip_dir, tmp_path, monkeypatch):
    import shutil

    repo = tmp_path / "hf" / "hub" / "models--openai--clip-vit-base-patch32"
    shutil.copytree(clip_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("socket.create_connection", _no_network)
    enc = CLIPTextEncoder.from_config(OmegaConf.create({"kind": "clip", "model_id": "openai/clip-vit-base-patch32",
                                                        "path": None, "context_length": 16}))
    assert enc.n_embd == 32 and enc.get_extra_state()["model_id"] == "openai/clip-vit-base-patch32"
    assert enc(enc.tokenize(["a red circle"]))[1].sum() == 5


def test_train_py_text_encoder_clip_then_sample_py_prompt(clip_dir, tmp_path):
    import shutil

    clip_dir = Path(shutil.copytree(clip_dir, tmp_path / "clip"))  # this test moves it
    vq_path = untrained_vq_checkpoint(tmp_path / "vq.ckpt")
    offline = {"HF_HUB_OFFLINE": "1", "VQT_OFFLINE": "1"}
    args = ["stage=vqdiffusion", f"first_stage.ckpt={vq_path}", "conditioning=text", "text_encoder=clip",
            f"text_encoder.path={clip_dir}", "text_encoder.context_length=24", "data.resolution=16",
            "data.batch_size=4", "data.val_size=8", "data.num_workers=0", "transformer.n_layer=1",
            "transformer.n_head=2", "transformer.n_embd=32", "diffusion.num_timesteps=10", "stage.sample_steps=2",
            "stage.val_samples=4", "trainer.max_steps=2", "trainer.val_every=2", "trainer.ckpt_every=2",
            "trainer.val_batches=1", "trainer.log_every=1", "logger=none"]
    r = run_train(args + [f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=offline)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    keys = [k for k in _keys(state["model"]) if "text_encoder" in k]
    assert keys and all(k.endswith(("null_emb", "_extra_state")) for k in keys), keys
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={ckpt}", "n=2", "steps=2", "cfg_scale=2",
                        "prompt=a red circle", f"out_dir={out}"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**_env(), **offline})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "grid.png").is_file() and (out / "prompts.txt").read_text() == "a red circle\n"
    # the CLIP files moved: a clear error naming the key, then sample.py text_encoder_path= finds them
    moved = tmp_path / "moved-clip"
    clip_dir.rename(moved)
    sample = [sys.executable, str(ROOT / "sample.py"), f"ckpt={ckpt}", "n=2", "steps=2", "prompt=a red circle"]
    r = subprocess.run(sample + [f"out_dir={tmp_path / 's2'}"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**_env(), **offline})
    assert r.returncode == 2 and "text_encoder.path" in r.stderr, r.stderr[-3000:]
    r = subprocess.run(sample + [f"out_dir={tmp_path / 's3'}", f"text_encoder_path={moved}"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env={**_env(), **offline})
    assert r.returncode == 0 and (tmp_path / "s3" / "grid.png").is_file(), r.stderr[-3000:]
    # without the files: a one-line error before any training step, naming the key
    r = run_train(args[:4] + ["text_encoder.path=/nonexistent/clip"] + args[5:] +
                  [f"hydra.run.dir={tmp_path / 'bad'}"], cwd=tmp_path, env=offline)
    assert r.returncode == 2 and "text_encoder.path=/nonexistent/clip" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "bad" / "checkpoints").exists()


def _keys(tree, prefix=""):
    """Every state-dict key of a checkpoint's nested ``model`` entry."""
    for k, v in tree.items():
        if isinstance(v, dict) and not k.endswith("_extra_state"):
            yield from _keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
