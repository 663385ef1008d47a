"""sample.py on every generator stage, through the CLI as a user runs it."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY, compose
from vqtransformer.training.loop import run_training


def sample(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def vqgan_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqgan")
    run_training(compose(TINY + ["trainer.max_steps=2", "trainer.val_every=2", "logger=none",
                                 f"trainer.output_dir={out}"]))
    return out / "checkpoints" / "last.ckpt"


def test_vqdiffusion_samples_with_stride_and_guidance(tmp_path, vqgan_ckpt):
    out = tmp_path / "diff"
    run_training(compose(["stage=vqdiffusion", f"first_stage.ckpt={vqgan_ckpt}", "conditioning=class",
                          "data.resolution=16", "data.batch_size=4", "data.val_size=8", "trainer.max_steps=2",
                          "trainer.val_every=2", "trainer.val_batches=1", "stage.val_samples=2", "logger=none",
                          f"trainer.output_dir={out}"]))
    r = sample([f"ckpt={out / 'checkpoints/last.ckpt'}", "n=4", "batch_size=2", "steps=5", "cfg_scale=2.0",
                "class_label=1", "sampler=purity", f"out_dir={tmp_path / 's'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["grid.png"] + [f"sample_{i:05d}.png" for i in range(4)]


def test_vitgan_samples_and_vqgan_is_refused(tmp_path, vqgan_ckpt):
    out = tmp_path / "vitgan"
    run_training(compose(["stage=vitgan", "data.resolution=16", "data.batch_size=4", "data.val_size=8",
                          "trainer.max_steps=2", "trainer.val_every=2", "trainer.val_batches=1", "stage.sample_grid=2",
                          "vitgan.generator.patch_size=4", "vitgan.discriminator.patch_size=4", "logger=none",
                          f"trainer.output_dir={out}"]))
    r = sample([f"ckpt={out / 'checkpoints/last.ckpt'}", "n=3", f"out_dir={tmp_path / 's'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "s" / "grid.png").is_file() and (tmp_path / "s" / "sample_00002.png").is_file()
    r = sample([f"ckpt={vqgan_ckpt}", "n=2"], tmp_path)
    assert r.returncode == 2 and "not a generator" in r.stderr
    r = sample([f"ckpt={out / 'checkpoints/last.ckpt'}", "n=2", "grid=[8,8]"], tmp_path)
    assert r.returncode == 2 and "grid= and half= are for models with sliding-window sampling" in r.stderr
