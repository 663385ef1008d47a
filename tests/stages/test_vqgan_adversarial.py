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
def test_adversarial_phase_does_not_hurt_validation_psnr(tmp_path, mlflow_uri):
    """Plain shapes at 32 px, 500 steps, disc_start 300 (D from 200, ramp 100): val PSNR at the end is
    no more than 0.5 dB below its value just before disc_start with the tiny preset's D phase (feature
    matching; with taming's adversarial term it fell from 15.49 to 14.35 dB). (About 3 minutes on 2 cores.)"""
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


def test_fixed_and_capped_adversarial_weight_and_discriminator_regularisers():
    base = TINY + ["first_stage.loss.disc_start=0", "first_stage.loss.disc_ramp_steps=0"]
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1}
    torch.manual_seed(0)
    fixed = VQGANStage(compose(base + ["first_stage.loss.disc_adaptive_weight=false", "first_stage.loss.disc_weight=0.05"]))
    _, logs = fixed.training_step(batch, 0, 0)
    assert logs["loss/d_weight"] == pytest.approx(0.05)
    torch.manual_seed(0)
    capped = VQGANStage(compose(base + ["first_stage.loss.disc_weight_max=1e-6", "first_stage.loss.disc_weight=1.0"]))
    _, logs = capped.training_step(batch, 0, 0)
    assert 0 < logs["loss/d_weight"] <= 1e-6
    # R1 adds gamma/2 E||grad_x D(x)||^2 on reals: same D, same batch, larger loss
    torch.manual_seed(0)
    plain = VQGANStage(compose(base))
    torch.manual_seed(0)
    r1 = VQGANStage(compose(base + ["first_stage.loss.disc_r1_gamma=10.0"]))
    plain.discriminator.load_state_dict(r1.discriminator.state_dict())
    plain.vqgan.load_state_dict(r1.vqgan.state_dict())
    d0, l0 = plain.training_step(batch, 0, 1)
    d1, l1 = r1.training_step(batch, 0, 1)
    assert "disc/r1" in l1 and l1["disc/r1"] > 0 and "disc/r1" not in l0
    assert d1.item() == pytest.approx(d0.item() + 5.0 * l1["disc/r1"], rel=1e-4)
    d1.backward()  # the penalty is differentiable in D's parameters (double backward)
    assert all(p.grad is not None for p in r1.discriminator.parameters())
    # D's view: the images themselves by default, DiffAugment of them with disc_augment
    x = batch["image"]
    assert plain.d_view(x) is x
    aug = VQGANStage(compose(base + ["first_stage.loss.disc_augment='translation,cutout'"]))
    assert aug.d_view(x).shape == x.shape and not torch.equal(aug.d_view(x), x)


def test_feature_matching_is_a_paired_distance_in_the_discriminator_features_that_does_not_train_it():
    """disc_fm_weight: L_FM = mean_l |D_l(x) - D_l(x_rec)| over D's activations (pix2pixHD), added to
    the generator's loss after disc_start; zero for a perfect reconstruction; no gradient into D."""
    base = TINY + ["first_stage.loss.disc_start=0", "first_stage.loss.disc_ramp_steps=0",
                   "first_stage.loss.disc_weight=0.0"]
    torch.manual_seed(0)
    stage = VQGANStage(compose(base + ["first_stage.loss.disc_fm_weight=2.0"]))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert stage.feature_matching(x, x.clone())[0].item() == 0.0
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    fm, logits = stage.feature_matching(x, y)
    assert logits.shape[:2] == (2, 1)
    fm.backward()
    assert fm.item() > 0 and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in stage.discriminator.parameters())
    assert all(p.requires_grad for p in stage.discriminator.parameters())
    # in the generator step: logged, and the loss is nll + codebook + 2 * L_FM (adversarial weight 0)
    batch = {"image": x}
    loss, logs = stage.training_step(batch, 0, 0)
    expected = logs["loss/rec"] + logs["loss/codebook"] + 2.0 * logs["loss/fm"]
    assert logs["loss/fm"] > 0 and loss.item() == pytest.approx(expected, rel=1e-4)
    assert logs["loss/d_weight"] == 0.0 and "loss/g" in logs  # D's rating of the reconstructions, recorded
    torch.manual_seed(0)
    off = VQGANStage(compose(base + ["first_stage.loss.disc_fm_weight=0.0"]))
    assert "loss/fm" not in off.training_step(batch, 0, 0)[1]


def test_generator_learning_rate_warms_up_and_decays_by_cosine_to_its_floor_while_the_discriminators_stays():
    class Acc:
        device, num_processes = torch.device("cpu"), 1

        def prepare(self, *objs):
            return objs

    stage = VQGANStage(compose(TINY + ["trainer.max_steps=1050", "first_stage.learning_rate=4e-4",
                                       "first_stage.lr_schedule=cosine", "first_stage.warmup_steps=50",
                                       "first_stage.min_lr_ratio=0.1"]))
    gen, disc = stage.setup(Acc())
    lrs = {}
    for step in range(1050):
        lrs[step] = gen.optimizer.param_groups[0]["lr"]
        gen.optimizer.step()
        gen.scheduler.step()
    assert lrs[0] == pytest.approx(4e-4 / 50) and lrs[49] == pytest.approx(4e-4)
    assert lrs[550] == pytest.approx(4e-4 * (0.1 + 0.9 * 0.5)) and lrs[1049] == pytest.approx(4e-5, rel=1e-3)
    assert disc.scheduler is None and disc.optimizer.param_groups[0]["lr"] == pytest.approx(4e-4)
    taming = VQGANStage(compose(TINY + ["first_stage=vqgan_f4", "first_stage.ch=32", "first_stage.loss.perceptual=none"]))
    gen, _ = taming.setup(Acc())
    lr0 = gen.optimizer.param_groups[0]["lr"]
    for _ in range(5):
        gen.optimizer.step()
        gen.scheduler.step()
    assert gen.optimizer.param_groups[0]["lr"] == lr0  # the paper's presets: constant


def test_autoencoder_betas_and_squared_pixel_loss_leave_the_discriminator_and_taming_as_they_were():
    """first_stage.betas sets the autoencoder's Adam betas only; pixel_loss=mse is the mean squared error."""
    class Acc:
        device, num_processes = torch.device("cpu"), 1

        def prepare(self, *objs):
            return objs

    stage = VQGANStage(compose(TINY + ["first_stage.betas=[0.9,0.99]", "first_stage.loss.pixel_loss=mse"]))
    gen, disc = stage.setup(Acc())
    assert gen.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert disc.optimizer.param_groups[0]["betas"] == (0.5, 0.9)
    x, xrec = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    xrec[..., 0, 0] = 2.0
    assert stage.reconstruction_loss(x, xrec, {}).item() == pytest.approx((15 * 0.25 + 4.0) / 16)
    taming = VQGANStage(compose(TINY + ["first_stage=vqgan_f4", "first_stage.ch=32", "first_stage.loss.perceptual=none"]))
    gen, disc = taming.setup(Acc())
    assert gen.optimizer.param_groups[0]["betas"] == disc.optimizer.param_groups[0]["betas"] == (0.5, 0.9)
    assert taming.reconstruction_loss(x, xrec, {}).item() == pytest.approx((15 * 0.5 + 2.0) / 16)  # L1
    from vqtransformer.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="first_stage.loss.pixel_loss"):
        validate_config(compose(["first_stage.loss.pixel_loss=l2"]))
    with pytest.raises(ConfigError, match=r"first_stage.betas=\[0.9\] must be two numbers"):
        validate_config(compose(["first_stage.betas=[0.9]"]))
