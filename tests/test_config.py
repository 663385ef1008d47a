"""Config composition and validation: errors name the key, before any model is built."""

import pytest

from tests.conftest import compose, run_train
from vqtransformer.config import ConfigError, validate_config


@pytest.mark.parametrize("fs", ["vqgan_tiny", "vqgan_f4", "vqgan_f8", "vqgan_f16"])
@pytest.mark.parametrize("cb", ["k256", "k1024", "k4096", "k16384"])
def test_every_architecture_and_codebook_composes(fs, cb):
    cfg = compose([f"first_stage={fs}", f"codebook={cb}", "data.resolution=64"])
    validate_config(cfg)
    assert cfg.codebook.n_embed == int(cb[1:])


def test_experiment_preset_overrides_several_groups():
    cfg = compose(["experiment=faceshq_vqgan", "data.celebahq_root=/x", "data.ffhq_root=/y"])
    assert cfg.first_stage.name == "vqgan_f16" and cfg.codebook.n_embed == 1024 and cfg.codebook.embed_dim == 256
    assert list(cfg.first_stage.ch_mult) == [1, 1, 2, 2, 4] and list(cfg.first_stage.attn_resolutions) == [16]
    assert cfg.first_stage.loss.disc_start == 30001 and cfg.first_stage.loss.disc_weight == 0.8
    validate_config(cfg)


@pytest.mark.parametrize("overrides,key", [
    (["data.resolution=30"], "data.resolution=30 is not divisible by the downsampling factor f=4"),
    (["first_stage.attn_resolutions=[5]"], "first_stage.attn_resolutions"),
    (["data=cifar10"], "missing required value for data.root"),
    (["trainer.mixed_precision=fp8"], "trainer.mixed_precision"),
    (["first_stage.ch=48"], "first_stage.ch=48 must be a multiple of 32"),
    (["codebook.n_embed=1"], "codebook.n_embed=1"),
])
def test_impossible_values_fail_with_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        validate_config(compose(overrides))
    assert key in str(e.value)


def test_cli_errors_name_the_key_and_build_nothing(tmp_path, mlflow_uri):
    r = run_train(["trainer.nonexistent=1"], cwd=tmp_path)
    assert r.returncode != 0 and "trainer.nonexistent" in r.stderr + r.stdout
    r = run_train(["data.resolution=30", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2
    assert "data.resolution=30" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was opened
