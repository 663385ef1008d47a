"""VQ-Diffusion inpainting: known tokens fixed at every step of every sampler, the region sampled, a full region
equal to ordinary sampling, the purity sampler's t on the partially known sequence, pixel masks to code cells
(any overlap), sample.py init_image= mask= (box and PNG, errors, the grid it writes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import ROOT, compose, untrained_vq_checkpoint
from vqtransformer.config import ConfigError
from vqtransformer.models.vqdiffusion import VQDiffusionTransformer
from vqtransformer.modules.diffusion import MaskAndReplace, log_onehot
from vqtransformer.sampling.diffusion import SAMPLERS, sample_tokens, time_grid, timestep_for_mask_fraction

pytestmark = pytest.mark.filterwarnings("ignore:sampler=purity starts from all-.MASK. tokens")  # diffusion=paper

K, GRID, N = 16, (4, 4), 16
REGION = torch.zeros(GRID, dtype=torch.bool)
REGION[1:3, 1:4] = True  # 6 of 16 tokens


class Recorder(nn.Module):
    """Wraps a denoiser (or, without one, predicts ``target`` exactly); records every (x_t, t) it is shown."""

    def __init__(self, net: nn.Module | None = None, target: torch.Tensor | None = None):
        super().__init__()
        self.net, self.target, self.seen = net, target, []
        self.grid, self.null_class = GRID, getattr(net, "null_class", 0)

    def forward(self, x_t, t, y=None):
        self.seen.append((x_t.clone(), t.clone()))
        return self.net(x_t, t, y) if self.net is not None else log_onehot(self.target, K)


def random_denoiser(seed: int = 0, num_classes: int = 0) -> VQDiffusionTransformer:
    torch.manual_seed(seed)
    net = VQDiffusionTransformer(K, GRID, n_layer=1, n_head=2, n_embd=32, num_classes=num_classes).eval()
    for p in net.parameters():  # AdaLN and the head start at zero: give the untrained net varied predictions
        nn.init.normal_(p, std=0.3)
    return net


def known_codes(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, K, (n, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("preset", [(0.9, 0.1), (0.99999, 1e-6)])
def test_known_tokens_stay_at_every_step_and_the_region_is_sampled(sampler, preset):
    d = MaskAndReplace(K, 20, *preset)
    known = known_codes(8)
    net = Recorder(random_denoiser())
    out = sample_tokens(net, d, 8, steps=5, sampler=sampler, generator=torch.Generator().manual_seed(0),
                        known=known, region=REGION).view(8, N)
    region = REGION.flatten()
    assert torch.equal(out[:, ~region], known[:, ~region])  # exactly the image's codes
    assert (out[:, region] < K).all()  # no [MASK] left
    assert (out[:, region] != known[:, region]).any()  # sampled, not copied
    assert len(net.seen) == 5
    for x_t, _ in net.seen:  # the denoiser sees the known codes at every step
        assert torch.equal(x_t[:, ~region], known[:, ~region])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_oracle_fills_the_region_with_its_prediction(sampler):
    d = MaskAndReplace(K, 20, 0.99999, 1e-6)
    known, target = known_codes(4, 1), known_codes(4, 2)
    out = sample_tokens(Recorder(target=target), d, 4, steps=4, sampler=sampler,
                        generator=torch.Generator().manual_seed(3), known=known, region=REGION).view(4, N)
    region = REGION.flatten()
    assert torch.equal(out, torch.where(region, target, known))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_full_region_is_ordinary_sampling_draw_for_draw(sampler):
    d = MaskAndReplace(K, 20)
    net = random_denoiser(num_classes=3)
    y = torch.tensor([0, 1, 2, 1])
    kw = {"steps": 5, "sampler": sampler, "cfg_scale": 2.0, "truncation_rate": 0.9}
    plain = sample_tokens(net, d, 4, y, generator=torch.Generator().manual_seed(5), **kw)
    full = sample_tokens(net, d, 4, y, generator=torch.Generator().manual_seed(5), known=known_codes(4),
                         region=torch.ones(GRID, dtype=torch.bool), **kw)
    assert torch.equal(plain, full)


def test_the_denoiser_times_on_a_partially_known_sequence():
    d = MaskAndReplace(K, 20, 0.99999, 1e-6)
    gbar, M = 1 - d.keep_bar, int(REGION.sum())
    # purity: the t of the whole sequence's [MASK] fraction, the known tokens unmasked; the region unmasked
    # on the schedule rescaled to its M tokens
    net = Recorder(random_denoiser())
    sample_tokens(net, d, 2, steps=4, sampler="purity", generator=torch.Generator().manual_seed(0),
                  known=known_codes(2), region=REGION)
    times = time_grid(20, 4)
    n_mask = [int((x_t[0] == K).sum()) for x_t, _ in net.seen]
    assert n_mask[0] == M and n_mask == [M] + [round(M * float(gbar[s] / gbar[20])) for s in times[1:-1]]
    assert [int(t[0]) for _, t in net.seen] == [timestep_for_mask_fraction(gbar, m / N) for m in n_mask]
    assert int(net.seen[0][1][0]) < 20  # 6 of 16 masked: far from the all-[MASK] t = T
    # standard: the grid times (the region is the chain's state at t)
    net = Recorder(random_denoiser())
    sample_tokens(net, d, 2, steps=4, generator=torch.Generator().manual_seed(0), known=known_codes(2), region=REGION)
    assert [int(t[0]) for _, t in net.seen] == times[:-1]


def test_sampler_refuses_bad_inpainting_arguments():
    d, net = MaskAndReplace(K, 10), random_denoiser()
    with pytest.raises(ConfigError, match="both"):
        sample_tokens(net, d, 2, steps=2, known=known_codes(2))
    with pytest.raises(ConfigError, match="empty"):
        sample_tokens(net, d, 2, steps=2, known=known_codes(2), region=torch.zeros(GRID, dtype=torch.bool))
    with pytest.raises(ConfigError, match="one entry per code token"):
        sample_tokens(net, d, 2, steps=2, known=known_codes(2), region=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ConfigError, match=r"\[0, 16\)"):
        sample_tokens(net, d, 2, steps=2, known=known_codes(2) + K, region=REGION)


# -- the stage ------------------------------------------------------------------------------------------------
STAGE = ["stage=vqdiffusion", "data.resolution=16", "transformer.n_layer=1", "transformer.n_head=2",
         "transformer.n_embd=32", "diffusion.num_timesteps=10"]


@pytest.fixture(scope="module")
def vq_ckpt(tmp_path_factory) -> Path:
    return untrained_vq_checkpoint(tmp_path_factory.mktemp("vq") / "vq.ckpt")


def build(vq_ckpt: Path, *overrides: str):
    from vqtransformer.loading import build_stage

    torch.manual_seed(0)
    cfg = compose(STAGE + [f"first_stage.ckpt={vq_ckpt}", *overrides])
    return build_stage(cfg).eval(), cfg


def test_pixel_masks_become_the_code_cells_they_touch(vq_ckpt):
    stage, _ = build(vq_ckpt)
    assert stage.factor == 4 and stage.denoiser_module.grid == (4, 4)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[5, 9] = True  # one pixel: its cell (1, 2)
    region = stage.inpaint_region(mask)
    assert region.shape == (4, 4) and region.nonzero().tolist() == [[1, 2]]
    mask[7:9, 3] = True  # straddles the cells (1, 0) and (2, 0)
    assert stage.inpaint_region(mask).nonzero().tolist() == [[1, 0], [1, 2], [2, 0]]
    with pytest.raises(ConfigError, match="16x16"):
        stage.inpaint_region(torch.ones(8, 8, dtype=torch.bool))


@pytest.mark.parametrize("conditioning", ["none", "class", "text"])
def test_stage_inpaints_for_every_condition(vq_ckpt, conditioning, monkeypatch):
    extra = ["text_encoder.n_layer=1", "text_encoder.n_head=2", "text_encoder.vocab_captions=40"] \
        if conditioning == "text" else []
    stage, _ = build(vq_ckpt, f"conditioning={conditioning}", *extra)
    decoded = []
    decode = stage.first_stage.decode_indices
    monkeypatch.setattr(stage.first_stage, "decode_indices", lambda idx: decoded.append(idx.clone()) or decode(idx))
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:12, 2:10] = True
    region = stage.inpaint_region(mask).flatten()
    codes = stage.encode(image[None])[0]
    conditions = {"none": [None], "class": [[0, 1, 2]], "text": [None, "a large red circle on a striped background"]}
    for condition in conditions[conditioning]:
        for sampler in SAMPLERS:
            x = stage.sample(3, condition, steps=3, sampler=sampler, seed=1, inpaint=(image, mask), cfg_scale=2.0)
            assert x.shape == (3, 3, 16, 16)
            idx = decoded[-1].view(3, -1)
            assert torch.equal(idx[:, ~region], codes[~region].expand(3, -1))
    with pytest.raises(ConfigError, match="empty"):
        stage.sample(1, None, steps=2, inpaint=(image, torch.zeros(16, 16, dtype=torch.bool)))
    with pytest.raises(ConfigError, match=r"\[3, 16, 16\]"):
        stage.sample(1, None, steps=2, inpaint=(torch.zeros(3, 32, 32), mask))


def test_the_inpaint_capability_is_declared_and_documented():
    from vqtransformer.stages import stage_class
    from vqtransformer.stages.base import CAPABILITIES

    assert "inpaint" in CAPABILITIES and "inpaint" in stage_class("vqdiffusion").capabilities
    assert "inpaint" not in stage_class("transformer").capabilities


# -- sample.py ----------------------------------------------------------------------------------------------------
def sample_cfg(*overrides: str):
    return compose(list(overrides), config_name="sample")


def sample_module():
    """sample.py, imported (its functions called in-process)."""
    sys.path.insert(0, str(ROOT))
    try:
        import sample
    finally:
        sys.path.remove(str(ROOT))
    return sample


def read_inpainting(*overrides: str):
    return sample_module()._read_inpainting(sample_cfg("run_id=x", *overrides))


@pytest.fixture
def pictures(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((16, 20), dtype=np.uint8)
    mask[3:9, 5:14] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((16, 20), dtype=np.uint8)).save(tmp_path / "black.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "not_an_image.png").write_text("hello")
    return tmp_path


def test_box_and_png_masks_are_the_same_mask(pictures, vq_ckpt):
    image, box = read_inpainting(f"init_image={pictures / 'in.png'}", "mask=[5,3,14,9]")
    _, png = read_inpainting(f"init_image={pictures / 'in.png'}", f"mask={pictures / 'mask.png'}")
    assert image.size == (20, 16) and box.shape == (16, 20) and box.sum() == 6 * 9
    assert np.array_equal(box, png)
    stage, _ = build(vq_ckpt)
    assert stage.inpaint_region(torch.from_numpy(box[:, 2:18])).equal(stage.inpaint_region(torch.from_numpy(png[:, 2:18])))


@pytest.mark.parametrize("overrides,message", [
    (["mask=[0,0,4,4]"], "mask= needs init_image="),
    (["init_image={p}/in.png"], "init_image=.* needs mask="),
    (["init_image={p}/missing.png", "mask=[0,0,4,4]"], "init_image=.*missing.png: cannot read"),
    (["init_image={p}/not_an_image.png", "mask=[0,0,4,4]"], "init_image=.*cannot read"),
    (["init_image={p}/in.png", "mask={p}/missing.png"], "mask=.*missing.png: cannot read"),
    (["init_image={p}/in.png", "mask={p}/small.png"], "mask=.*is 8x8 pixels but init_image=.* is 20x16"),
    (["init_image={p}/in.png", "mask={p}/black.png"], "mask=.*is empty"),
    (["init_image={p}/in.png", "mask=[3,3,3,9]"], "mask=.*is empty"),
    (["init_image={p}/in.png", "mask=[0,0,21,4]"], r"mask=\[0, 0, 21, 4\] must lie in init_image"),
    (["init_image={p}/in.png", "mask=[0,0,4]"], "must be a box"),
    (["init_image={p}/in.png", "mask=[0,0,4,4]", "half=true"], "drop half= and grid="),
])
def test_sample_py_refuses_bad_inpainting_keys(pictures, overrides, message):
    with pytest.raises(ConfigError, match=message):
        read_inpainting(*[o.format(p=pictures) for o in overrides])


def test_sample_py_refuses_a_model_without_the_capability(pictures, monkeypatch):
    import vqtransformer.loading

    class NoInpaint:
        name, capabilities = "fake", frozenset({"sample"})

    loaded = type("Loaded", (), {"stage": NoInpaint(), "path": Path("fake.ckpt"), "config": None,
                                 "mlflow_run_id": None})()
    monkeypatch.setattr(vqtransformer.loading, "load_stage", lambda *a, **k: loaded)
    sample = sample_module()
    cfg = sample_cfg("ckpt=fake.ckpt", f"init_image={pictures / 'in.png'}", "mask=[0,0,4,4]")
    with pytest.raises(ConfigError, match="'inpaint' capability; this stage=fake"):
        sample.run(cfg)


@pytest.fixture(scope="module")
def diffusion_ckpt(vq_ckpt, tmp_path_factory) -> Path:
    """A randomly initialised tiny class-conditional VQ-Diffusion saved as our checkpoint."""
    from vqtransformer.training import checkpoint as ckpt_io

    stage, cfg = build(vq_ckpt, "conditioning=class")
    for p in stage.denoiser.parameters():  # varied predictions from an untrained net
        nn.init.normal_(p, std=0.3)
    return ckpt_io.atomic_save({"format": ckpt_io.FORMAT, "stage": "vqdiffusion", "step": 0,
                                "model": stage.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)},
                               tmp_path_factory.mktemp("diff") / "diff.ckpt")


def test_sample_py_inpaints_end_to_end(tmp_path, pictures, diffusion_ckpt):
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={diffusion_ckpt}", "n=3", "batch_size=2",
                        "steps=3", "cfg_scale=2", "class_label=1", f"init_image={pictures / 'in.png'}",
                        "mask=[7,3,13,9]", f"out_dir={out}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 inpaintings" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "input.png", "mask.png", "sample_00000.png",
                                                     "sample_00001.png", "sample_00002.png"]
    # 20x16 -> 16x16: the shorter side stays, a centre crop of x 2..17; the box [7, 13) x [3, 9) becomes
    # x 5..10, y 3..8, which touches the 4x4 cells of rows 0..2 and columns 1..2
    cells = np.asarray(Image.open(out / "mask.png").convert("L")) > 127
    expect = np.zeros((16, 16), dtype=bool)
    expect[0:12, 4:12] = True
    assert np.array_equal(cells, expect)
    # rows: the input, the masked input, the samples in rows of 2 (round(sqrt 3)); 128-px tiles, 2-px padding,
    # a 14-px label strip under each row
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 130 + 2, 4 * 130 + 2 + 4 * 14)
    masked = np.asarray(grid.convert("RGB"))[130 + 14 + 2:130 + 14 + 130, 2:130]  # the second row's first tile
    assert masked.shape == (128, 128, 3)
    assert (masked[:8 * 12, 8 * 4:8 * 12] == 128).all()  # grey (0.5) where regenerated, upscaled 8x
    assert not (masked[:, :8 * 4] == 128).all()


def test_sample_py_inpaints_with_prompts_and_without(tmp_path, pictures, vq_ckpt):
    """A text model: a grid row per prompt (the prompt under it); no prompt: the null caption."""
    from vqtransformer.training import checkpoint as ckpt_io

    stage, cfg = build(vq_ckpt, "conditioning=text", "text_encoder.n_layer=1", "text_encoder.n_head=2",
                       "text_encoder.vocab_captions=40")
    path = ckpt_io.atomic_save({"format": ckpt_io.FORMAT, "stage": "vqdiffusion", "step": 0,
                                "model": stage.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)},
                               tmp_path / "text.ckpt")
    sample = sample_module()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle on a striped background\na small blue square on a plain background\n")
    common = [f"ckpt={path}", "n=2", "steps=2", "cfg_scale=2", f"init_image={pictures / 'in.png'}",
              f"mask={pictures / 'mask.png'}", "device=cpu"]
    out = sample.run(sample_cfg(*common, f"prompts_file={prompts}", "sampler=purity", f"out_dir={tmp_path / 'p'}"))
    assert (out / "prompts.txt").read_text() == prompts.read_text()
    assert {p.name for p in out.glob("sample_*.png")} == {f"sample_p{i:03d}_{j:05d}.png" for i in range(2) for j in range(2)}
    assert Image.open(out / "grid.png").size == (2 * 130 + 2, 4 * 130 + 2 + 4 * 14)  # input, masked, 2 prompts
    out = sample.run(sample_cfg(*common, f"out_dir={tmp_path / 'u'}"))  # the null caption, rows of round(sqrt 2)
    assert {p.name for p in out.glob("sample_*.png")} == {"sample_00000.png", "sample_00001.png"}
    assert Image.open(out / "grid.png").size == (130 + 2, 4 * 130 + 2 + 4 * 14)
