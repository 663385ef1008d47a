"""End-to-end runs of stage 1 through train.py, as a user runs them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import TINY, compose, run_train
from vqtransformer.training import checkpoint as ckpt_io

# the discriminator starts at step 3 so that the adaptive GAN weight and the D step run too
FAST = TINY + ["first_stage.loss.disc_start=3", "first_stage.loss.disc_ndf=16"]


def only_run(uri: str, experiment: str = "vqgan"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_train_writes_a_complete_mlflow_run(tmp_path, mlflow_uri):
    run_dir = tmp_path / "run"
    r = run_train(FAST + ["trainer.max_steps=6", "trainer.val_every=3", "trainer.ckpt_every=3",
                          f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val/psnr" in r.stdout and "checkpoint:" in r.stdout
    client, run = only_run(mlflow_uri)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["codebook.n_embed"] == "32" and p["first_stage.ch"] == "32" and p["trainer.max_steps"] == "6"
    assert p["first_stage.loss.perceptual"] == "none" and p["stage.name"] == "vqgan"
    assert "trainer.max_steps=6" in run.data.tags["vqt.overrides"]
    assert steps(client, run.info.run_id, "loss/rec") == [1, 2, 3, 4, 5, 6]
    assert steps(client, run.info.run_id, "val/psnr") == [3, 6]
    for key in ("codebook/usage", "codebook/perplexity", "codebook/dead", "loss/g", "loss/d_weight", "loss/disc",
                "val/codebook_usage", "val/perplexity", "speed/images_per_s"):
        assert key in run.data.metrics, key
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert [p for p in images if "+step+" not in p] == ["images/reconstructions_step0000003.png",
                                                        "images/reconstructions_step0000006.png"]
    # and as MLflow's time-stepped images (mlflow.log_image(key=, step=)): the UI's image grid compares them
    keyed = sorted(p for p in images if p.startswith("images/reconstructions+step+") and p.endswith(".png"))
    assert [int(p.split("+step+")[1].split("+")[0]) for p in keyed] == [3, 6]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/last.ckpt"]
    ckpt = Path(run.data.tags["vqt.checkpoint"])
    assert ckpt == run_dir / "checkpoints" / "last.ckpt" and ckpt.is_file()
    state = ckpt_io.load(ckpt)
    assert state["step"] == 6 and state["mlflow_run_id"] == run.info.run_id
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_resume_continues_step_loss_and_run(tmp_path, mlflow_uri):
    common = FAST + ["trainer.val_every=100", "trainer.ckpt_every=4", "stage.learning_rate=1e-3"]
    straight = tmp_path / "straight"
    r = run_train(common + ["trainer.max_steps=8", "logger.experiment_name=straight", f"hydra.run.dir={straight}"],
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = tmp_path / "resumed"
    tracked = common
    r = run_train(tracked + ["trainer.max_steps=4", f"hydra.run.dir={resumed}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(tracked + ["trainer.max_steps=8", "trainer.resume=true", f"hydra.run.dir={resumed}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = ckpt_io.load(straight / "checkpoints/last.ckpt"), ckpt_io.load(resumed / "checkpoints/last.ckpt")
    assert a["step"] == b["step"] == 8 and a["data"] == b["data"]
    for module in ("vqgan", "discriminator"):
        for k, v in a["model"][module].items():
            assert torch.allclose(v.float(), b["model"][module][k].float(), atol=1e-6), f"{module}.{k} diverged"
    client, run = only_run(mlflow_uri)  # the resumed job continued the same MLflow run
    assert steps(client, run.info.run_id, "loss/rec") == list(range(1, 9))
    assert run.info.status == "FINISHED"


def test_two_process_cpu_run_with_torchrun(tmp_path, mlflow_uri):
    run_dir = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613"]
    r = run_train(TINY + ["trainer.max_steps=4", "trainer.val_every=4", "trainer.ckpt_every=4",
                          "first_stage.learning_rate=null", f"hydra.run.dir={run_dir}"], cwd=tmp_path, launcher=torchrun)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2" in r.stderr and "rank 1/2" in r.stderr
    client, run = only_run(mlflow_uri)
    assert run.data.tags["vqt.world_size"] == "2"
    # lr scaled by batch size x processes (taming's rule) shows both ranks counted
    assert float(run.data.metrics["lr/generator"]) == pytest.approx(4.5e-6 * 4 * 2)
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "checkpoints", "train.log"]
    assert ckpt_io.load(run_dir / "checkpoints/last.ckpt")["step"] == 4
    assert not (tmp_path / "outputs").exists()  # rank 1 wrote no Hydra outputs of its own


def test_checkpoint_of_another_codebook_size_is_refused_with_both_shapes(tmp_path, mlflow_uri):
    first = tmp_path / "k32"
    r = run_train(TINY + ["trainer.max_steps=2", "logger=none", f"hydra.run.dir={first}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train([o for o in TINY if not o.startswith("codebook.n_embed")] +
                  ["codebook.n_embed=64", "trainer.max_steps=4", f"trainer.resume={first}",
                   f"hydra.run.dir={tmp_path / 'k64'}"], cwd=tmp_path)
    assert r.returncode == 2
    assert "quantize.embedding.weight: checkpoint (32, 8) vs model (64, 8)" in r.stderr
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(mlflow_uri).search_runs(
        [e.experiment_id for e in MlflowClient(mlflow_uri).search_experiments()])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, mlflow_uri, monkeypatch):
    from vqtransformer.stages.vqgan import VQGANStage
    from vqtransformer.training.loop import TrainingDiverged, run_training

    original = VQGANStage.training_step

    def poisoned(self, batch, step, opt_idx):
        loss, logs = original(self, batch, step, opt_idx)
        return (loss * float("nan"), logs) if step == 3 else (loss, logs)

    monkeypatch.setattr(VQGANStage, "training_step", poisoned)
    out = tmp_path / "nan"
    cfg = compose(TINY + ["trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.val_every=100",
                          f"trainer.output_dir={out}"])
    with pytest.raises(TrainingDiverged, match="non-finite generator loss at step 3"):
        run_training(cfg)
    state = ckpt_io.load(out / "checkpoints" / "last.ckpt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"]["vqgan"].values() if v.is_floating_point())
    client, run = only_run(mlflow_uri)
    assert run.info.status == "FAILED"


def test_atomic_save_leaves_the_old_checkpoint_when_writing_fails(tmp_path):
    path = ckpt_io.atomic_save({"step": 1, "w": torch.ones(2)}, tmp_path / "last.ckpt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt_io.atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert ckpt_io.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_missing_data_directory_fails_before_any_run(tmp_path, mlflow_uri):
    r = run_train(["data=folder", f"data.root={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'r'}"],
                  cwd=tmp_path)
    assert r.returncode == 2 and "data.root" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "mlflow.db").exists()
    shutil.rmtree(tmp_path / "r", ignore_errors=True)


@pytest.mark.parametrize("target,metric", [("segmentation", "val/pixel_acc"), ("depth", "val/psnr")])
def test_vqgan_on_label_and_depth_maps(tmp_path, target, metric):
    """The VQ models that encode spatial conditions: one-hot + cross-entropy for labels, L1 for depth."""
    from vqtransformer.training.loop import run_training

    cfg = compose(TINY + [f"data.target={target}", "trainer.max_steps=3", "trainer.val_every=3", "logger=none",
                          f"trainer.output_dir={tmp_path}"])
    metrics = run_training(cfg)
    assert metric in metrics and metrics[metric] == metrics[metric]  # finite, not NaN
    state = ckpt_io.load(tmp_path / "checkpoints" / "last.ckpt")
    channels = 7 if target == "segmentation" else 1  # shapes: 6 classes + background
    assert state["model"]["vqgan"]["encoder.conv_in.weight"].shape[1] == channels
