"""Text-to-image (issue 13): captions of ``shapes``, the learned text encoder, text-conditional
VQ-Diffusion trained through ``train.py`` and sampled through ``sample.py prompt=``."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

from tests.conftest import run_train, untrained_vq_checkpoint
from vqtransformer.data.captions import COLOUR_NAMES, SceneObject, caption, colour_bin
from vqtransformer.data.shapes import SHAPE_CLASSES, ShapesDataset
from vqtransformer.modules.text import NULL, PAD, UNK, LearnedTextEncoder, WordTokenizer


def _render_hash(ds: ShapesDataset, n: int) -> str:
    h = hashlib.sha256()
    for i in range(n):
        img, label, seg, depth = ds.render(i)
        for part in (img.tobytes(), bytes([label]), seg.tobytes(), depth.tobytes()):
            h.update(part)
    return h.hexdigest()


def test_captions_leave_the_images_bit_identical():
    # the hashes of the images, labels, maps and depths rendered before captions existed
    assert _render_hash(ShapesDataset("train", 32, 100), 100) == \
        "6c9a72e53e78913a1b3750ba13be9157755e8ccdf7d5b7923f6dca5ff4fa7aff"
    assert _render_hash(ShapesDataset("train", 64, 100, background="plain"), 100) == \
        "bb2cb5b6d29bdb23a88a5c4a859c7b37dde858ad12a80ebddacea358eddc181d"


def test_captions_are_deterministic_and_name_the_dominant_object_first():
    ds = ShapesDataset("validation", 32, 300)
    for i in range(300):
        item = ds[i]
        text = item["caption"]
        assert text == ds.caption(i) == ShapesDataset("validation", 32, 300).caption(i)
        objects = ds.render_scene(i)[4]
        top = max(objects, key=lambda o: o.visible)  # ties: the first drawn, as class_label
        words = text.split()
        assert words[0] == "a" and words[1] in ("large", "small")
        assert words[2] == COLOUR_NAMES[colour_bin(top.colour)]
        assert words[3] == SHAPE_CLASSES[int(item["class_label"])] == top.kind
        assert "on a striped background" in text
        shown = sum(o.visible > 0 for o in objects)
        assert text.endswith(f"with {shown - 2} more shape{'s' if shown > 3 else ''}") == (shown > 2)


def test_caption_relation_size_colour_and_flip():
    a = SceneObject("circle", 0.3, (0.5, 0.2), (250, 10, 10), 300)
    b = SceneObject("square", 0.15, (0.5, 0.8), (10, 10, 250), 100)
    assert caption([b, a], "plain", (0.14, 0.34)) == "a large red circle above a small blue square on a plain background"
    assert caption([a], "textured", (0.14, 0.34)) == "a large red circle on a striped background"
    assert colour_bin((200, 200, 200)) == COLOUR_NAMES.index("white") and colour_bin((0, 0, 0)) == 0
    # a flipped item's caption mirrors left and right, as its image
    flipped = ShapesDataset("train", 32, 64, flip=True)
    plain = ShapesDataset("train", 32, 64)
    swap = {"left": "right", "right": "left"}
    for i in range(64):
        if flipped._flipped(i):
            assert flipped[i]["caption"] == " ".join(swap.get(w, w) for w in plain.caption(i).split())


def test_tokenizer_vocabulary_unknown_words_truncation_and_null(caplog):
    tok = WordTokenizer.from_captions(["a red circle", "a blue circle", "a red ring"], context_length=4, max_words=3)
    assert tok.words == ["a", "red", "circle"]  # most frequent first, ties by first appearance
    ids = tok.encode(["a blue circle", "a red circle on a plain background"])
    assert ids[0].tolist() == [3, UNK, 5, PAD] and ids.shape == (2, 4)
    assert "truncated to text_encoder.context_length=4" in caplog.text
    assert tok.null(2)[:, 0].tolist() == [NULL, NULL]


def test_padding_is_masked_and_the_null_caption_is_one_learned_token():
    torch.manual_seed(0)
    tok = WordTokenizer(["a", "red", "circle"], context_length=6)
    enc = LearnedTextEncoder(tok, max_words=8, n_layer=2, n_head=2, n_embd=16).eval()
    ids = tok.encode(["a red circle", "a circle"])
    x, keep = enc(ids)
    assert keep.tolist() == [[True] * 3 + [False] * 3, [True] * 2 + [False] * 4]
    with torch.no_grad():  # whatever the padding positions hold, the caption's tokens do not see it
        enc.tok_emb.weight[PAD].normal_(0, 5.0)
        enc.pos_emb[:, 3:].normal_(0, 5.0)
    y, _ = enc(ids)
    torch.testing.assert_close(x[keep], y[keep])
    assert not torch.allclose(x[~keep], y[~keep])
    null_x, null_keep = enc(tok.null(1))
    assert null_keep[0].tolist() == [True] + [False] * 5
    torch.testing.assert_close(null_x[0, 0], enc.null_emb[0, 0])
    # the vocabulary travels in the state dict
    fresh = LearnedTextEncoder(WordTokenizer([], 6), max_words=8, n_layer=2, n_head=2, n_embd=16)
    fresh.load_state_dict(enc.state_dict())
    assert fresh.tokenizer.words == ["a", "red", "circle"]


def test_pad_ids_beyond_the_caption_do_not_change_the_denoiser_output():
    from vqtransformer.models.vqdiffusion import VQDiffusionTransformer

    torch.manual_seed(0)
    tok = WordTokenizer(["a", "red", "circle", "blue"], context_length=6)
    enc = LearnedTextEncoder(tok, max_words=8, n_layer=1, n_head=2, n_embd=16)
    net = VQDiffusionTransformer(10, (2, 2), n_layer=2, n_head=2, n_embd=16, text_encoder=enc).eval()
    x_t, t = torch.randint(0, 11, (2, 4)), torch.tensor([3, 7])
    ids = tok.encode(["a red circle", "a blue circle"])
    for m in net.modules():  # AdaLN starts at zero; give it something to modulate
        if hasattr(m, "linear") and m.__class__.__name__ == "AdaLayerNorm":
            torch.nn.init.normal_(m.linear.weight, std=0.1)
    out = net(x_t, t, ids)
    assert out.shape == (2, 4, 10)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 4))
    assert not torch.allclose(out[0], net(x_t, t, tok.encode(["a blue circle", "a blue circle"]))[0])
    torch.testing.assert_close(net(x_t, t, None), net(x_t, t, torch.full_like(ids, net.null_class)))
    with torch.no_grad():  # padded caption positions are masked in the cross-attention too
        enc.tok_emb.weight[PAD].normal_(0, 5.0)
    torch.testing.assert_close(net(x_t, t, ids), out)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny first stage, then train.py stage=vqdiffusion conditioning=text for a few steps."""
    tmp = tmp_path_factory.mktemp("text")
    vq_path = untrained_vq_checkpoint(tmp / "vq.ckpt")
    r = run_train(["stage=vqdiffusion", f"first_stage.ckpt={vq_path}", "conditioning=text", "data.resolution=16",
                   "data.batch_size=4", "data.val_size=8", "data.num_workers=0", "transformer.n_layer=1",
                   "transformer.n_head=2", "transformer.n_embd=32", "text_encoder.n_layer=1", "text_encoder.n_head=2",
                   "text_encoder.vocab_captions=200", "diffusion.num_timesteps=10", "stage.sample_steps=3",
                   "stage.val_samples=4", "trainer.max_steps=3", "trainer.val_every=3", "trainer.ckpt_every=3",
                   "trainer.val_batches=1", "trainer.log_every=1", "logger=none", f"hydra.run.dir={tmp / 'run'}"],
                  cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def test_text_conditional_vqdiffusion_trains_guides_and_refuses_class_labels(text_run):
    from vqtransformer.loading import load_stage

    stage = load_stage(text_run / "run").stage
    assert stage.condition_type == "text"
    enc = stage.denoiser_module.text_encoder
    assert {"large", "red", "circle", "striped", "background"} <= set(enc.tokenizer.words)  # from the captions
    prompt = "a large red circle on a striped background"
    a = stage.sample(2, prompt, steps=3, cfg_scale=1.0, seed=1)
    b = stage.sample(2, [prompt, prompt], steps=3, cfg_scale=1.0, seed=1)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    from vqtransformer.config import ConfigError

    with pytest.raises(ConfigError, match="text-conditional"):
        stage.sample(2, [0, 1], steps=3)


def test_sampling_encodes_each_caption_batch_once_not_per_step(text_run):
    from vqtransformer.loading import load_stage

    stage = load_stage(text_run / "run").stage
    enc = stage.denoiser_module.text_encoder
    calls = []
    hook = enc.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    try:
        a = stage.sample(2, "a large red circle on a striped background", steps=5, cfg_scale=2.0, seed=3)
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0][0] == 4  # one pass over [captions, null captions], 5 steps
    assert a.shape == (2, 3, 16, 16)
    net = stage.denoiser_module.eval()  # the reused encoding is the encoding: same output as a fresh one
    ids = enc.tokenize(["a small blue ring on a striped background"] * 2)
    x_t, t = torch.randint(0, net.num_codes + 1, (2, 16)), torch.tensor([2, 9])
    with torch.no_grad():
        first, again = net(x_t, t, ids), net(x_t, t, ids.clone())
        other = net(x_t, t, enc.tokenize(["a large red circle on a striped background"] * 2))
    with torch.enable_grad():  # (not cached)
        fresh = net(x_t, t, ids).detach()
    torch.testing.assert_close(first, fresh)
    torch.testing.assert_close(again, fresh)
    assert not torch.allclose(other, fresh)  # another caption is encoded again, not served from the cache


def test_the_null_caption_replaces_captions_with_probability_p_uncond(text_run):
    from vqtransformer.loading import load_stage

    stage = load_stage(text_run / "run").stage
    stage.p_uncond = 0.3
    torch.manual_seed(0)
    y = stage._labels({"caption": ["a small blue ring on a striped background"] * 4000}, drop=True)
    null = (y[:, 0] == NULL)
    assert abs(null.float().mean().item() - 0.3) < 0.03
    assert (y[null][:, 1:] == NULL).all() and not (y[~null] == NULL).any()


def test_sample_py_prompts(text_run):
    ckpt = text_run / "run" / "checkpoints" / "last.ckpt"
    base = [sys.executable, "sample.py", f"ckpt={ckpt}", "n=2", "steps=3", "cfg_scale=2"]
    out = text_run / "s"
    r = subprocess.run(base + ["prompt=a small green square on a striped background", f"out_dir={out}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "grid.png").is_file() and (out / "prompts.txt").read_text() == \
        "a small green square on a striped background\n"
    assert sorted(p.name for p in out.glob("sample_*.png")) == ["sample_p000_00000.png", "sample_p000_00001.png"]
    f = text_run / "prompts.txt"
    f.write_text("a red triangle above a blue ring\n\na large white cross on a striped background\n")
    r = subprocess.run(base + [f"prompts_file={f}", f"out_dir={text_run / 's2'}"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image

    w, h = Image.open(text_run / "s2" / "grid.png").size
    assert h > 2 * 128 and w >= 2 * 128  # two labelled rows of two upscaled tiles
    r = subprocess.run(base + ["class_label=1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "class_label=1, but this model was trained with conditioning.type=text" in r.stderr


def test_caption_accuracy_counts_shape_and_colour_of_the_first_named_object():
    from vqtransformer.data.captions import main_object
    from vqtransformer.evaluation import judge_captions

    assert main_object("a large red circle above a small blue square on a plain background") == ("red", "circle")
    assert main_object("a red triangle above a blue ring") == ("red", "triangle")
    assert main_object("two dogs") is None

    class Judge:  # features are (shape class, colour bin) pairs
        def classify(self, f):
            return f[:, 0].long()

        def classify_colour(self, f):
            return f[:, 1].long()

    prompts = ["a large red circle on a striped background", "a small blue ring on a striped background",
               "a cat on a mat"]
    red, blue = COLOUR_NAMES.index("red"), COLOUR_NAMES.index("blue")
    circle, ring = SHAPE_CLASSES.index("circle"), SHAPE_CLASSES.index("ring")
    feats = torch.tensor([[circle, blue], [ring, blue], [0, 0]])  # right shape twice, right colour once
    out = judge_captions(Judge(), feats, prompts)
    assert out == {"caption_shape_accuracy": 1.0, "caption_colour_accuracy": 0.5, "caption_accuracy": 0.5}
    assert red != blue
