"""Shared fixtures: an isolated MLflow store per test, config composition, train.py runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_TAR = SHARED / "data" / "cifar10" / "cifar10_jpg.tar"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# small, fast overrides for end-to-end runs of the tiny VQGAN
TINY = ["data.resolution=16", "data.batch_size=4", "data.val_size=8", "data.num_workers=0",
        "first_stage.ch=32", "first_stage.z_channels=32", "codebook.n_embed=32", "codebook.embed_dim=8",
        "trainer.val_batches=1", "trainer.log_every=1"]


def optimizer_steps(stage, spec, batch: dict, n: int) -> list[tuple[torch.Tensor, dict]]:
    """``n`` plain steps of one optimizer spec (``stage.training_step`` -> backward -> step) on one batch,
    the training loop without Accelerate; returns each step's (loss, logs)."""
    out = []
    for step in range(n):
        loss, logs = stage.training_step(batch, step, 0)
        spec.optimizer.zero_grad()
        loss.backward()
        spec.optimizer.step()
        out.append((loss.detach(), logs))
    return out


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """The composed config, as train.py would see it (without Hydra's runtime)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import vqtransformer.config  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def untrained_vq_checkpoint(path: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny VQGAN (``TINY``) saved as our checkpoint: a first stage for stage-2 tests."""
    from omegaconf import OmegaConf

    from vqtransformer.stages.vqgan import VQGANStage
    from vqtransformer.training import checkpoint as ckpt_io

    torch.manual_seed(seed)
    cfg = compose(TINY)
    return ckpt_io.atomic_save({"format": ckpt_io.FORMAT, "stage": "vqgan", "step": 0,
                                "model": VQGANStage(cfg).state_dict(),
                                "config": OmegaConf.to_container(cfg, resolve=True)}, path)


def run_train(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
              launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny ops on a shared CPU run much slower with more (spin-waiting) threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def compose_cfg():
    return compose
