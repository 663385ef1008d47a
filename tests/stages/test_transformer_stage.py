"""The transformer stage on tiny frozen VQ models (built here, no checkpoint): training step, NLL,
sampling (plain, sliding, half completion, guidance), every conditioning type, bad inputs,
the code cache and checkpoint metadata."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose, optimizer_steps
from vqtransformer.config import ConfigError
from vqtransformer.models.conditioning import ConditionError
from vqtransformer.models.vqgan import VQModel
from vqtransformer.stages.transformer import TransformerStage

RES, K = 16, 32  # 16 px images, f4 -> 4x4 codes, 32 codes


def tiny_vq(in_channels: int = 3, n_embed: int = K, seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    fs = OmegaConf.create({"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                           "resolution": RES, "z_channels": 32})
    vq = VQModel.from_config(fs, OmegaConf.create({"n_embed": n_embed, "embed_dim": 8}), in_channels=in_channels)
    with torch.no_grad():  # spread codes so that encodings use many of them
        vq.quantize.embedding.weight.normal_()
    return vq.eval()


def make_cfg(*overrides: str):
    return compose(["stage=transformer", "first_stage.ckpt=unused", f"data.resolution={RES}", "data.batch_size=4",
                    "transformer.n_layer=2", "transformer.n_embd=32", "transformer.n_head=2",
                    "transformer.block_size=32", "trainer.max_steps=10", "stage.val_samples=3", *overrides])


def make_stage(*overrides: str, cond_vq=None, first_stage=None) -> TransformerStage:
    cfg = make_cfg(*overrides)
    return TransformerStage(cfg, first_stage=first_stage or tiny_vq(), cond_stage=cond_vq)


def shapes_batch(n: int = 4, start: int = 0) -> dict:
    from torch.utils.data import default_collate

    from vqtransformer.data.shapes import ShapesDataset

    ds = ShapesDataset("validation", RES, 64)
    return default_collate([ds[i] for i in range(start, start + n)])


class FakeAccelerator:
    device = torch.device("cpu")

    def prepare(self, *objs):
        return objs

    def unwrap_model(self, m):
        return m


def test_training_step_learns_and_validates():
    stage = make_stage("transformer.lr=3e-3", "transformer.warmup_steps=0")
    (spec,) = stage.setup(FakeAccelerator())
    batch = shapes_batch()
    steps = optimizer_steps(stage, spec, batch, 8)
    assert all(set(logs) == {"loss/train"} and math.isfinite(logs["loss/train"]) for _, logs in steps)
    assert steps[-1][0].item() < steps[0][0].item()
    stage.train(False)
    metrics = stage.validate(batch)
    assert metrics["val/bpd"] == pytest.approx(metrics["val/nll"] / math.log(2))
    assert stage.nll(batch).shape == (4, 16)
    grid = stage.validation_images(batch)["samples"]
    assert grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1


def test_pkeep_corrupts_inputs_not_targets():
    stage = make_stage("stage.pkeep=0.5")
    batch = shapes_batch()
    z, _ = stage.tokens(batch)
    seen = {}
    orig = stage.logits

    def spy(gpt, x, c):
        seen["x"] = x
        return orig(gpt, x, c)

    stage.logits = spy
    torch.manual_seed(0)
    loss, _ = stage.training_step(batch, 0, 0)
    assert 0 < (seen["x"] != z).float().mean() < 0.9
    logits = orig(stage.gpt, seen["x"], stage.tokens(batch)[1])
    target_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, K), z.reshape(-1))
    assert loss.item() == pytest.approx(target_loss.item(), rel=1e-5)


def test_sampling_shapes_determinism_sliding_and_half_completion():
    stage = make_stage("transformer.block_size=16")
    a = stage.sample(3, seed=1)
    assert a.shape == (3, 3, RES, RES) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, stage.sample(3, seed=1))
    big = stage.sample_codes(2, grid=(8, 8), seed=0, top_k=5)  # 2x the trained grid: sliding window
    assert big.shape == (2, 8, 8) and torch.equal(big, stage.sample_codes(2, grid=(8, 8), seed=0, top_k=5))
    assert stage.sample(2, grid=(8, 8)).shape == (2, 3, 2 * RES, 2 * RES)
    z = stage.tokens(shapes_batch(2))[0].view(2, 4, 4)
    half = stage.sample_codes(2, z=z, start=8, seed=3)
    assert torch.equal(half.flatten(1)[:, :8], z.flatten(1)[:, :8])


def test_class_conditioning_guidance_and_bad_labels():
    stage = make_stage("conditioning=class", "conditioning.p_uncond=0.5")
    assert stage.cond.num_classes == 6 and stage.gpt.cond_vocab_size == 7
    c = torch.arange(6)[:, None]
    dropped = torch.stack([stage.cond.drop(c) for _ in range(50)])
    assert set(dropped.unique().tolist()) == set(range(7))  # the null token appears
    plain = stage.sample_codes(4, [1, 2, 3, 4], seed=0)
    assert torch.equal(plain, stage.sample_codes(4, [1, 2, 3, 4], seed=0, cfg_scale=1.0))
    assert stage.sample_codes(4, 2, seed=0, cfg_scale=3.0).shape == (4, 4, 4)
    with pytest.raises(ConditionError, match="out of range"):
        stage.sample(2, [0, 6])
    with pytest.raises(ConditionError, match="out of range"):
        stage.training_step({**shapes_batch(), "class_label": torch.tensor([0, 1, 2, 9])}, 0, 0)
    with pytest.raises(ConditionError, match="conditioning.type=class"):
        stage.sample(2, {"segmentation": torch.zeros(2, RES, RES, dtype=torch.long)})
    none = make_stage("conditioning=none")
    with pytest.raises(ConditionError, match="conditioning.type=none"):
        none.sample(2, [1, 2])
    no_guidance = make_stage("conditioning=class", "conditioning.p_uncond=0")
    with pytest.raises(ConditionError, match="p_uncond"):
        no_guidance.sample(2, [1, 2], cfg_scale=2.0)


def test_segmentation_conditioning_and_bad_maps():
    seg_vq = tiny_vq(in_channels=7, n_embed=24, seed=1)  # shapes: ids 0..6 (data.num_classes=6)
    stage = make_stage("conditioning=segmentation", "conditioning.ckpt=seg.ckpt", cond_vq=seg_vq)
    assert stage.cond_len == 16 and stage.gpt.cond_vocab_size == 24
    batch = shapes_batch()
    loss, _ = stage.training_step(batch, 0, 0)
    assert math.isfinite(loss.item())
    seg = batch["segmentation"][:2]
    out = stage.sample_codes(2, {"segmentation": seg}, seed=0)
    assert out.shape == (2, 4, 4)
    assert stage.sample_codes(2, seed=0).shape == (2, 4, 4)  # maps of the validation split
    with pytest.raises(ConditionError, match="px"):
        stage.sample(2, {"segmentation": seg[:, :8, :8]})
    with pytest.raises(ConditionError, match="class id 9"):
        stage.sample(2, {"segmentation": seg.clamp_max(0) + 9})
    with pytest.raises(ConditionError, match="segmentation"):
        stage.sample(2, [1, 2])
    with pytest.raises(ConfigError, match="data.num_classes"):
        make_stage("conditioning=segmentation", "conditioning.ckpt=seg.ckpt", "data.num_classes=3", cond_vq=seg_vq)
    with pytest.raises(ConfigError, match="conditioning.ckpt"):
        make_stage("conditioning=segmentation")  # no VQ model of the maps given


def test_depth_coord_and_lowres_conditioning():
    depth = make_stage("conditioning=depth", "conditioning.ckpt=d.ckpt", cond_vq=tiny_vq(in_channels=1, seed=2))
    batch = shapes_batch()
    assert math.isfinite(depth.training_step(batch, 0, 0)[0].item())
    assert depth.sample_codes(2, {"depth": batch["depth"][:2]}).shape == (2, 4, 4)
    coord = make_stage("conditioning=coord", "conditioning.n_embed=16")
    c = coord.cond.encode({"batch_size": 1}, (RES, RES))
    assert c.shape == (1, 4, 4) and torch.equal(c.flatten(), c.flatten().sort().values)  # raster order
    assert math.isfinite(coord.training_step(batch, 0, 0)[0].item())
    assert coord.sample_codes(2, grid=(8, 8)).shape == (2, 8, 8)  # a larger canvas: positions stay distinct
    lowres = make_stage("conditioning=lowres", "conditioning.factor=2")  # 8 px -> 2x2 codes of the first stage
    assert lowres.cond_len == 4
    assert math.isfinite(lowres.training_step(batch, 0, 0)[0].item())
    assert lowres.sample_codes(2, {"lowres": batch["image"][:2]}).shape == (2, 4, 4)


def test_bad_configs_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="transformer.vocab_size=64"):
        make_stage("transformer.vocab_size=64")
    with pytest.raises(ConfigError, match="transformer.block_size"):
        make_stage("transformer.block_size=8")
    with pytest.raises(ConfigError, match="transformer.schedule"):
        make_stage("transformer.schedule=linear")
    from vqtransformer.loading import build_stage
    from vqtransformer.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="first_stage.ckpt"):
        build_stage(compose(["stage=transformer"]))
    with pytest.raises(CheckpointError, match="does not exist"):
        build_stage(compose(["stage=transformer", f"first_stage.ckpt={tmp_path / 'missing.ckpt'}"]))
    with pytest.raises(ConfigError, match="needs its frozen first stage"):
        TransformerStage(compose(["stage=transformer"]))  # the loader gives it; the stage loads nothing
    stage = make_stage("transformer.block_size=16")
    with pytest.raises(ValueError, match="block_size"):  # a larger grid needs the window; 4x4 fits, 5x5 does not
        from vqtransformer.sampling.autoregressive import sample_cached

        sample_cached(stage.gpt, torch.zeros(1, 1, dtype=torch.long), 25)


def test_checkpoint_meta_refuses_another_conditioning():
    stage = make_stage("conditioning=class", "conditioning.p_uncond=0.1", "conditioning.num_classes=1")
    state = stage.state_dict()
    assert state["meta"]["conditioning"] == "class"
    other = make_stage("conditioning=none")
    with pytest.raises(ConfigError, match="conditioning.type=class"):
        other.load_state_dict(state)
    same = make_stage("conditioning=class", "conditioning.p_uncond=0.1", "conditioning.num_classes=1")
    same.load_state_dict(state)
    assert torch.equal(same.gpt.head.weight, stage.gpt.head.weight)


def test_code_cache_reuses_codes_and_detects_changed_images(tmp_path):
    stage = make_stage(f"stage.code_cache={tmp_path}", "conditioning=segmentation", "conditioning.ckpt=s.ckpt",
                       cond_vq=tiny_vq(in_channels=7, n_embed=24, seed=1))
    batch = shapes_batch()
    z, c = stage.tokens(batch)
    calls = []
    enc = stage.first_stage.encode_to_indices
    stage.first_stage.encode_to_indices = lambda x: calls.append(1) or enc(x)
    z2, c2 = stage.tokens(batch)
    assert not calls and torch.equal(z, z2) and torch.equal(c, c2)
    flipped = {**batch, "image": batch["image"].flip(-1)}  # same indices, other pixels: re-encoded
    z3, _ = stage.tokens(flipped)
    assert calls and torch.equal(z3, enc(flipped["image"]).flatten(1))
    stage.validation_end()
    files = list(tmp_path.glob("codes-train-*.pt"))
    assert len(files) == 1
    fresh = make_stage(f"stage.code_cache={tmp_path}", "conditioning=segmentation", "conditioning.ckpt=s.ckpt",
                       cond_vq=tiny_vq(in_channels=7, n_embed=24, seed=1))
    assert len(fresh._cache("train")) == 4
    other = make_stage(f"stage.code_cache={tmp_path}", "conditioning=segmentation", "conditioning.ckpt=s.ckpt",
                       cond_vq=tiny_vq(in_channels=7, n_embed=24, seed=5))  # another condition VQ: another key
    assert len(other._cache("train")) == 0


def first_stage_checkpoint(path, *overrides: str):
    """A vqgan checkpoint in the loop's format (untrained weights: training it is not the point here)."""
    from tests.conftest import TINY
    from vqtransformer.stages.vqgan import VQGANStage
    from vqtransformer.training import checkpoint as ckpt_io

    cfg = compose(TINY + list(overrides))
    torch.manual_seed(0)
    stage = VQGANStage(cfg)
    with torch.no_grad():
        stage.vqgan.quantize.embedding.weight.normal_()
    ckpt_io.atomic_save({"format": ckpt_io.FORMAT, "stage": "vqgan", "config": OmegaConf.to_container(cfg, resolve=True),
                         "model": stage.state_dict(), "step": 0}, path)
    return path


def test_train_then_sample_end_to_end(tmp_path, mlflow_uri):
    import subprocess
    import sys

    from mlflow import MlflowClient

    from tests.conftest import ROOT, run_train

    vq = first_stage_checkpoint(tmp_path / "vq.ckpt")
    run_dir = tmp_path / "run"
    common = ["stage=transformer", "data.resolution=16", "data.batch_size=4", "data.val_size=8", "data.num_workers=0",
              "transformer.n_layer=2", "transformer.n_embd=32", "transformer.n_head=2", "transformer.block_size=16",
              "trainer.val_batches=1", "trainer.log_every=1", "stage.val_samples=2", "conditioning=class"]
    r = run_train(common + ["transformer.vocab_size=64", f"first_stage.ckpt={vq}"], cwd=tmp_path)
    assert r.returncode == 2 and "transformer.vocab_size=64" in r.stderr  # vocabulary checked before training
    r = run_train(common + [f"first_stage.ckpt={vq}", "trainer.max_steps=4", "trainer.val_every=2",
                            "trainer.ckpt_every=4", f"hydra.run.dir={run_dir}", f"stage.code_cache={tmp_path / 'cache'}"],
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("transformer").experiment_id])
    for key in ("loss/train", "val/nll", "val/bpd", "lr/transformer"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/nll")] == [2, 4]
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert {"images/samples_step0000002.png", "images/samples_step0000004.png"} <= set(arts)
    # class-conditional: a second grid with one row per class
    assert {"images/class_samples_step0000002.png", "images/class_samples_step0000004.png"} <= set(arts)
    assert list((tmp_path / "cache").glob("codes-validation-*.pt"))

    out = tmp_path / "samples"
    cmd = [sys.executable, str(ROOT / "sample.py"), f"run_id={run.info.run_id}", "n=3", "batch_size=2", "top_k=8",
           "cfg_scale=2.0", "class_label=1", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    s = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert s.returncode == 0, s.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "sample_00000.png", "sample_00001.png",
                                                      "sample_00002.png"]
    logged = client.list_artifacts(run.info.run_id, "samples")
    assert len(logged) == 1 and len(client.list_artifacts(run.info.run_id, logged[0].path)) == 4
