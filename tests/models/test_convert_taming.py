"""A taming-transformers Net2NetTransformer, against the ORIGINAL code (``tests/taming_original.py``: PyPI
``taming-transformers-rom1504``): taming's Net2NetTransformer (mingpt GPT, its VQModel first stage, and a
Labelator or a VQModel cond stage) at random init, saved in the released layout, loaded the way
``python sample.py ckpt=... taming_config=...`` loads it (:func:`vqtransformer.loading.load_stage`) and compared in
float64 (1e-10) and float32 (1e-5): GPT logits, greedy tokens, half-image completion, sliding-window sampling on a
grid larger than the window, and sample.py's PNGs; n_head and the sos token come from the YAML."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from tests import taming_original as to
from tests.conftest import compose
from tests.taming_original import DTYPES, RES, SMALL, close, images, run_sample
from vqtransformer.config import ConfigError, validate_config
from vqtransformer.data import build_dataset
from vqtransformer.loading import build_stage, load_stage
from vqtransformer.models import taming as taming_format

pytestmark = pytest.mark.usefixtures("one_thread_module")


N_CLASSES, SEG_IDS = 5, 7  # shapes: 6 classes -> label ids 0..6


# -- Net2NetTransformer -----------------------------------------------------------------------------------
KINDS = ("none", "class", "segmentation", "depth")


@pytest.fixture(scope="module")
def net2net(T, tmp_path_factory):
    """One released Net2Net per condition: unconditional (sos token 3), Labelator classes, and segmentation /
    depth maps with their own VQ (cond stage). Shared vocabulary of 32 = the image codebook."""
    out = {}
    for kind in KINDS:
        vq = to.vqgan_params(disc=False)
        cond = {"segmentation": to.vqgan_params(n_embed=24, in_channels=SEG_IDS, disc=False),
                "depth": to.vqgan_params(n_embed=24, in_channels=1, disc=False)}.get(kind)
        if cond:  # taming's encode_to_c needs [B, h, w] indices from a spatial cond stage
            cond["sane_index_shape"] = True
        block = 32 if kind in ("segmentation", "depth") else 16
        params = to.net2net_params(vq, kind, vocab=32, block_size=block, n_head=4, sos_token=3 if kind == "none" else 0,
                                   cond_vq=cond, n_classes=N_CLASSES)
        model = to.build_net2net(T, params, seed=KINDS.index(kind))
        ckpt, yaml = to.save_released(model, "taming.models.cond_transformer.Net2NetTransformer", params,
                                      tmp_path_factory.mktemp(kind), f"{kind}_transformer")
        out[kind] = {"model": model, "ckpt": ckpt, "yaml": yaml}
    return out


def conditions(kind: str, n: int, res: int = RES, dtype=torch.float32):
    """(our batch, our condition for sample(), taming's cond_stage input)."""
    g = torch.Generator().manual_seed(1)
    x = images(n, res, dtype)
    batch = {"image": x}
    if kind == "none":
        return batch, None, x
    if kind == "class":
        y = torch.arange(n) % N_CLASSES
        return {**batch, "class_label": y}, y, y
    if kind == "segmentation":
        seg = torch.randint(0, SEG_IDS, (n, res, res), generator=g)
        onehot = torch.nn.functional.one_hot(seg, SEG_IDS).permute(0, 3, 1, 2).to(dtype)  # taming: {0, 1}
        return {**batch, "segmentation": seg}, {"segmentation": seg}, onehot
    depth = (torch.rand(n, 1, res, res, generator=g) * 2 - 1).to(dtype)
    return {**batch, "depth": depth}, {"depth": depth}, depth


def as_dtype(stage, dtype):
    for m in (stage.first_stage, stage.gpt, stage.cond):
        m.to(dtype)
    return stage


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_gpt_logits_greedy_tokens_and_half_completion_match_taming(net2net, kind, dtype, tol):
    files = net2net[kind]
    ref = copy.deepcopy(files["model"]).to(dtype).eval()
    stage = as_dtype(load_stage(files["ckpt"], taming_yaml=str(files["yaml"])).stage, dtype)  # what sample.py does
    n = 2
    batch, cond, c_in = conditions(kind, n, dtype=dtype)
    with torch.no_grad():
        _, z_ref = ref.encode_to_z(batch["image"])
        _, c_ref = ref.encode_to_c(c_in)
        logits_ref = ref.transformer(torch.cat((c_ref, z_ref), 1)[:, :-1])[0][:, c_ref.shape[1] - 1:]
        z, c = stage.tokens(batch)
        assert torch.equal(z, z_ref)
        close(stage.logits(stage.gpt, z, c), logits_ref[..., :stage.vocab_size], tol)
        L = z.shape[1]
        greedy_ref = ref.sample(z_ref[:, :0], c_ref, steps=L, sample=False)
        assert torch.equal(stage.sample_codes(n, cond, temperature=0).flatten(1), greedy_ref)
        half_ref = ref.sample(z_ref[:, :L // 2], c_ref, steps=L - L // 2, sample=False)
        zshape = (n, ref.first_stage_model.quantize.e_dim, 4, 4)
        close(stage.sample(n, cond, complete=batch, temperature=0), ref.decode_to_img(half_ref, zshape).clamp(-1, 1), tol)


def taming_sliding_window(ref, c: torch.Tensor, H: int, W: int, h: int, w: int) -> torch.Tensor:
    """The sliding-window loop of taming's ``scripts/sample_conditional.py`` (not in the PyPI package;
    transcribed for a (h, w) window instead of its fixed 16 x 16, greedy instead of ``torch.multinomial``)
    around the original ``ref.transformer``. ``c``: condition ids, spatial [B, H*W] or the sos token [B, 1]."""
    B = c.shape[0]
    idx = torch.zeros(B, H, W, dtype=torch.long)
    cidx = c.view(B, H, W) if c.shape[1] == H * W else None
    for i in range(H):
        li = i if i <= h // 2 else (h - (H - i) if H - i < h // 2 else h // 2)
        for j in range(W):
            lj = j if j <= w // 2 else (w - (W - j) if W - j < w // 2 else w // 2)
            i0, j0 = i - li, j - lj
            patch = idx[:, i0:i0 + h, j0:j0 + w].reshape(B, -1)
            cpatch = cidx[:, i0:i0 + h, j0:j0 + w].reshape(B, -1) if cidx is not None else c
            logits, _ = ref.transformer(torch.cat((cpatch, patch), 1)[:, :-1])
            logits = logits[:, -h * w:, :].reshape(B, h, w, -1)[:, li, lj, :]
            idx[:, i, j] = logits.argmax(-1)
    return idx


@pytest.mark.parametrize("kind", ["none", "segmentation"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_sliding_window_on_a_larger_grid_matches_taming(net2net, kind, dtype, tol):
    files = net2net[kind]
    ref = copy.deepcopy(files["model"]).to(dtype).eval()
    stage = as_dtype(load_stage(files["ckpt"], taming_yaml=str(files["yaml"])).stage, dtype)
    _, cond, c_in = conditions(kind, 2, res=24, dtype=dtype)  # 24 px: a 6 x 6 code grid, the window is 4 x 4
    with torch.no_grad():
        c_ref = ref.encode_to_c(c_in)[1] if kind != "none" else torch.full((2, 1), 3)
        expected = taming_sliding_window(ref, c_ref, 6, 6, 4, 4)
        assert torch.equal(stage.sample_codes(2, cond, grid=(6, 6), temperature=0), expected)


@pytest.mark.parametrize("kind", ["none", "class", "segmentation"])
def test_sample_py_samples_a_taming_net2net_with_taming_greedy_tokens(net2net, kind, tmp_path):
    files = net2net[kind]
    ref = files["model"]
    n = 3
    args = [f"ckpt={files['ckpt']}", f"taming_config={files['yaml']}", f"n={n}", "batch_size=3", "temperature=0",
            f"out_dir={tmp_path}"]
    if kind == "segmentation":  # condition maps from data (here: the shapes validation split at 16 px)
        args += ["data=shapes", f"data.resolution={RES}"]
    out = run_sample(args)
    with torch.no_grad():
        if kind == "none":
            c = torch.full((n, 1), 3)
        elif kind == "class":
            c = (torch.arange(n) % N_CLASSES)[:, None]  # sample.py: class-balanced labels
        else:
            val = build_dataset(compose([f"data.resolution={RES}"]).data, False)  # what sample.py reads
            seg = torch.stack([val[i]["segmentation"] for i in range(n)]).long()
            c = ref.encode_to_c(torch.nn.functional.one_hot(seg, SEG_IDS).permute(0, 3, 1, 2).float())[1]
        tokens = ref.sample(torch.zeros(n, 0, dtype=torch.long), c, steps=16, sample=False)
        expected = ref.decode_to_img(tokens, (n, 8, 4, 4)).clamp(-1, 1).add(1).div(2)
    for i in range(n):
        png = torch.from_numpy(np.array(Image.open(out / f"sample_{i:05d}.png"))).permute(2, 0, 1).float() / 255
        assert (png - expected[i]).abs().max() <= 1 / 255 + 1e-6  # the PNG of taming's greedy sample
    assert (out / "grid.png").is_file()


def test_n_head_and_sos_token_come_from_the_yaml_and_overrides_may_not_contradict_it(net2net, tmp_path):
    from tests.conftest import run_train

    files = net2net["none"]
    taming = [f"first_stage.ckpt={files['ckpt']}", f"first_stage.taming_config={files['yaml']}",
              f"transformer.pretrained={files['ckpt']}", f"transformer.taming_config={files['yaml']}"]
    cfg = compose(["stage=transformer", *SMALL, *taming])
    stage = build_stage(cfg)  # the tiny preset says n_head=4 and sos_token=0; the YAML says 4 and 3
    assert cfg.transformer.sos_token == 3 and cfg.transformer.n_head == 4 and cfg.transformer.n_layer == 2
    assert stage.state_dict()["arch"]["transformer.n_head"] == 4
    with pytest.raises(ConfigError, match="transformer.sos_token=0 contradicts transformer.taming_config"):
        validate_config(compose(["stage=transformer", *SMALL, *taming, "transformer.sos_token=0"]),
                        ["transformer.sos_token=0"])
    r = run_train(["stage=transformer", *SMALL, *taming, "transformer.n_head=8"], cwd=tmp_path)
    assert r.returncode == 2 and "transformer.n_head=8 contradicts transformer.taming_config" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()  # refused before the run directory exists
    with pytest.raises(ConfigError, match="transformer.taming_config=PATH"):  # no YAML: n_head is unknown
        build_stage(compose(["stage=transformer", *SMALL, *taming[:2], f"transformer.pretrained={files['ckpt']}"]))


def test_vocabulary_conversion_and_bad_files():
    """Taming's shared table: image codes keep rows [0, n_embed); condition rows follow (a null row for classes)."""
    tok = torch.randn(40, 8)
    state = {"transformer.tok_emb.weight": tok, "transformer.pos_emb": torch.zeros(1, 4, 8),
             "transformer.ln_f.weight": torch.ones(8), "transformer.ln_f.bias": torch.zeros(8),
             "transformer.head.weight": torch.randn(40, 8), "transformer.blocks.0.attn.mask": torch.ones(1, 1, 4, 4)}
    out = taming_format.convert_transformer(state, 32, "class", 5)
    assert torch.equal(out["tok_emb.weight"][:37], torch.cat((tok[:32], tok[:5])))
    assert torch.allclose(out["tok_emb.weight"][37], tok[:5].mean(0)) and out["head.weight"].shape == (32, 8)
    assert not any(k.endswith("attn.mask") for k in out)
    assert torch.equal(taming_format.convert_transformer(state, 32, "none", sos_token=33)["tok_emb.weight"][32], tok[33])
    with pytest.raises(ConfigError, match="Net2NetTransformer"):
        taming_format.convert_transformer({"model.weight": torch.zeros(1)}, 16)
    with pytest.raises(ConfigError, match="another first stage"):
        taming_format.convert_transformer(state, 64)
