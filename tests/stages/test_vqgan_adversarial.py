"""Stage 1's adversarial phase: discriminator pre-training and the ramp of the adversarial factor,
GroupNorm groups of small models, the upscaled grids, and a short run across disc_start in which
the adversarial phase does not hurt validation PSNR."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import TINY, compose, run_train
from vqtransformer.grids import MIN_TILE, image_grid, square_grid
from vqtransformer.modules.autoencoder import Encoder, Normalize
from vqtransformer.stages.vqgan import VQGANStage


def test_discriminator_starts_before_the_generator_sees_it_and_the_factor_ramps():
    stage = VQGANStage(compose(TINY + ["first_stage.loss.disc_start=100", "first_stage.loss.disc_pretrain_steps=30",
                                       "first_stage.loss.disc_ramp_steps=10", "first_stage.loss.disc_factor=0.5"]))
    assert stage.d_start == 70
    assert stage.adversarial_factor(99) == 0.0
    assert stage.adversarial_factor(100) == pytest.approx(0.05)
    assert stage.adversarial_factor(104) == pytest.approx(0.25)
    assert stage.adversarial_factor(109) == stage.adversarial_factor(500) == pytest.approx(0.5)
    taming = VQGANStage(compose(TINY + ["first_stage=vqgan_f4", "first_stage.ch=32", "first_stage.loss.disc_start=100",
                                        "first_stage.loss.perceptual=none"]))
    assert taming.d_start == 100 and taming.adversarial_factor(100) == 1.0  # the paper's presets: a step


def test_pretraining_discriminator_step_reuses_the_generator_reconstruction():
    """Between d_start and disc_start the D step trains on the G step's reconstruction (no GAN term in G)."""
    stage = VQGANStage(compose(TINY + ["first_stage.loss.disc_start=10", "first_stage.loss.disc_pretrain_steps=5",
                                       "first_stage.loss.disc_ramp_steps=0"]))
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1}
    loss, logs = stage.training_step(batch, 6, 0)
    assert "loss/g" not in logs and id(batch) in stage._recs
    d_loss, d_logs = stage.training_step(batch, 6, 1)
    assert "loss/disc" in d_logs and id(batch) not in stage._recs
    _, logs = stage.training_step(batch, 10, 0)
    assert logs["loss/adv_factor"] == 1.0 and "loss/d_weight" in logs


def test_groupnorm_keeps_taming_groups_from_128_channels_and_splits_small_models_less():
    for c in (128, 256, 512):
        assert Normalize(c, 4).num_groups == Normalize(c).num_groups == 32
    assert Normalize(32).num_groups == 32  # taming's rule: one channel a group (an InstanceNorm)
    assert Normalize(32, 4).num_groups == 8 and Normalize(64, 4).num_groups == 16
    enc = Encoder(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], in_channels=3, resolution=16,
                  z_channels=32, norm_min_group_channels=4)
    assert {m.num_groups for m in enc.modules() if isinstance(m, torch.nn.GroupNorm)} == {8, 16}
    with pytest.raises(Exception, match="norm_min_group_channels=3"):
        from vqtransformer.config import validate_config

        validate_config(compose(["first_stage.norm_min_group_channels=3"]))


def test_grids_are_upscaled_to_at_least_128_px_per_image():
    rows = [torch.rand(8, 3, 32, 32) * 2 - 1, torch.rand(8, 1, 32, 32) * 2 - 1]
    g = image_grid(rows)
    assert g.shape[0] == 3 and g.shape[1] >= 2 * MIN_TILE and g.shape[2] >= 8 * MIN_TILE
    assert float(g.min()) >= 0 and float(g.max()) <= 1
    # nearest upscaling: each source pixel is a constant 4x4 block
    tile = g[:, 2:2 + 128, 2:2 + 128]
    assert torch.equal(tile, tile[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2))
    assert square_grid(torch.zeros(10, 3, 32, 32)).shape[1:] == (3 * 128 + 4 * 2, 4 * 128 + 5 * 2)  # 4+4+2, padded
    stage = VQGANStage(compose(TINY))
    grid = stage.validation_images({"image": torch.rand(4, 3, 16, 16) * 2 - 1})["reconstructions"]
    assert grid.shape[1] >= 2 * MIN_TILE  # inputs above reconstructions, 16-px images shown at 128 px


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known defect (issue 11), measured: D wins early (hinge loss 0.03-0.1), then "
                   "collapses to chance (loss 1.0) ~80 steps after disc_start while the adaptive weight rises 0.02->0.55; "
                   "val PSNR 15.49 at disc_start -> 14.35 at the end")
def test_adversarial_phase_does_not_hurt_validation_psnr(tmp_path, mlflow_uri):
    """Plain shapes at 32 px, 500 steps, disc_start 300 (D from 200, ramp 100): val PSNR at the end is
    no more than 0.5 dB below its value just before disc_start. (About 4 minutes on 2 cores.)"""
    r = run_train(["data.background=plain", "data.val_size=64", "trainer.max_steps=500", "trainer.val_every=100",
                   "trainer.ckpt_every=1000", "logger.log_checkpoint=false", "first_stage.loss.disc_start=300",
                   "first_stage.loss.disc_pretrain_steps=100", "first_stage.loss.disc_ramp_steps=100",
                   f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("vqgan").experiment_id])[0]
    psnr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/psnr")}
    before, end = psnr[300], psnr[500]
    assert end >= before - 0.5, psnr
    assert max(m.value for m in client.get_metric_history(run.info.run_id, "loss/adv_factor")) == 1.0
