"""A taming-transformers VQGAN, against the ORIGINAL code (``tests/taming_original.py``: PyPI
``taming-transformers-rom1504``): taming's VQModel and NLayerDiscriminator at random init, saved in the released
layout (Lightning 1.x ``.ckpt`` with callbacks, optimizer states and OmegaConf hyper-parameters + a
``*-project.yaml``), loaded through ``first_stage.pretrained`` / ``first_stage.ckpt`` with
``first_stage.taming_config``: encoder, code indices, decoder and discriminator in float64 (1e-10) and float32
(1e-5); fine-tuning keeps the loaded codebook; weights the model lacks are an error; stage 2 trains on it."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from tests import taming_original as to
from tests.conftest import compose
from tests.taming_original import DTYPES, RES, SMALL, close, images, run_sample
from vqtransformer.config import ConfigError, validate_config
from vqtransformer.loading import build_stage, load_frozen_vq, load_stage
from vqtransformer.training import checkpoint as ckpt_io
from vqtransformer.training.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def vqgan_files(T, tmp_path_factory):
    """taming's VQModel (+ its NLayerDiscriminator as loss.discriminator, + LPIPS keys) in the released layout."""
    params = to.vqgan_params()
    model = to.build_vqgan(T, params)
    ckpt, yaml = to.save_released(model, "taming.models.vqgan.VQModel", params, tmp_path_factory.mktemp("vqgan"),
                                  "vqgan", to.LPIPS_KEYS)
    return model, params, ckpt, yaml


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_vqgan_encoder_indices_decoder_and_discriminator_match_taming(vqgan_files, dtype, tol):
    taming, _, ckpt, yaml = vqgan_files
    ref = copy.deepcopy(taming).to(dtype)
    # stage=vqgan first_stage.pretrained=... first_stage.taming_config=... (the architecture from the YAML)
    stage = build_stage(compose(SMALL + [f"first_stage.pretrained={ckpt}", f"first_stage.taming_config={yaml}"]))
    ours, disc = stage.vqgan.eval().to(dtype), stage.discriminator.eval().to(dtype)
    x = images(dtype=dtype)
    with torch.no_grad():
        close(ours.quant_conv(ours.encoder(x)), ref.quant_conv(ref.encoder(x)), tol)
        quant_ref, _, (_, _, idx_ref) = ref.encode(x)
        idx = ours.encode_to_indices(x)
        assert torch.equal(idx.flatten(), idx_ref.flatten())
        close(ours.decode_indices(idx), ref.decode(quant_ref), tol)
        close(disc(x), ref.loss.discriminator(x), tol)
        # the same file as a frozen first stage (first_stage.ckpt + first_stage.taming_config)
        frozen = load_frozen_vq(OmegaConf.create({"ckpt": str(ckpt), "taming_config": str(yaml)}), "first_stage")
        assert torch.equal(frozen.to(dtype).encode_to_indices(x), idx)


def test_fine_tuning_a_taming_vqgan_changes_its_codebook_only_by_gradient_steps(vqgan_files, tmp_path):
    """codebook.init=data (the default) must not replace the loaded codes at the first training step."""
    from vqtransformer.training.loop import run_training

    taming, _, ckpt, yaml = vqgan_files
    cfg = compose(SMALL + [f"first_stage.pretrained={ckpt}", f"first_stage.taming_config={yaml}", "trainer.max_steps=1",
                           "trainer.val_every=1", f"trainer.output_dir={tmp_path}"])
    assert cfg.codebook.init == "data"
    run_training(cfg)
    state = ckpt_io.load(tmp_path / "checkpoints" / "last.ckpt")["model"]
    w, w0 = state["vqgan"]["quantize.embedding.weight"], taming.quantize.embedding.weight.detach()
    lr = float(cfg.first_stage.learning_rate)  # one Adam step moves a weight by at most lr
    assert (w - w0).abs().max() <= lr * (1 + 1e-4) and not torch.equal(w, w0)
    assert bool(state["vqgan"]["quantize.initted"])
    assert state["arch"]["first_stage.num_res_blocks"] == 1 and state["arch"]["codebook.n_embed"] == 32


def test_weights_the_model_does_not_have_are_an_error_naming_them(vqgan_files, tmp_path):
    _, params, ckpt, yaml = vqgan_files
    wrong = copy.deepcopy(params)
    wrong["ddconfig"]["attn_resolutions"] = []  # a YAML that does not describe the file: no attention layers
    bad_yaml = tmp_path / "wrong-project.yaml"
    OmegaConf.save(OmegaConf.create({"model": {"target": "taming.models.vqgan.VQModel", "params": wrong}}), bad_yaml)
    with pytest.raises(CheckpointError) as e:
        load_frozen_vq(OmegaConf.create({"ckpt": str(ckpt), "taming_config": str(bad_yaml)}), "first_stage")
    msg = str(e.value)
    assert "unexpected in checkpoint (30, weights this model does not have)" in msg and ".attn." in msg
    assert "dropped on purpose by the loader: loss.perceptual_loss.* (taming's LPIPS" in msg
    assert "loss.discriminator.*" in msg
    # the command line may not contradict the YAML (a preset's values are replaced, an override is refused)
    cfg = compose(SMALL + [f"first_stage.pretrained={ckpt}", f"first_stage.taming_config={yaml}",
                           "first_stage.attn_resolutions=[]"])
    with pytest.raises(ConfigError, match=r"first_stage.attn_resolutions=\[\] contradicts first_stage.taming_config"):
        validate_config(cfg, ["first_stage.attn_resolutions=[]"])
    # a taming file without its YAML: refused (GroupNorm's 32 groups, for one, are in no weight)
    with pytest.raises(ConfigError, match="first_stage.taming_config=PATH"):
        build_stage(compose(SMALL + [f"first_stage.pretrained={ckpt}"]))
    with pytest.raises(CheckpointError, match="first_stage.taming_config=PATH"):
        load_frozen_vq(OmegaConf.create({"ckpt": str(ckpt)}), "first_stage")


def test_taming_vqgan_is_the_frozen_first_stage_of_stage_two(vqgan_files, tmp_path):
    """stage=transformer trains on it and samples (sample.py); stage=vqdiffusion trains on it."""
    from vqtransformer.training.loop import run_training

    taming, _, ckpt, yaml = vqgan_files
    fs = ["first_stage.ckpt=" + str(ckpt), "first_stage.taming_config=" + str(yaml)]
    gpt = ["transformer.n_layer=1", "transformer.n_head=2", "transformer.n_embd=32", "transformer.block_size=16",
           "stage.val_samples=2", "trainer.max_steps=2", "trainer.val_every=2"]
    run_training(compose(["stage=transformer", *SMALL, *fs, *gpt, "conditioning=class", f"trainer.output_dir={tmp_path}"]))
    loaded = load_stage(tmp_path)  # our checkpoint of it; its first stage is taming's file again
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.stage.first_stage.encode_to_indices(x).flatten(), taming.encode(x)[2][2].flatten())
    out = run_sample([f"ckpt={tmp_path}", "n=3", "batch_size=3", f"out_dir={tmp_path / 's'}"])
    assert (out / "grid.png").is_file() and (out / "sample_00002.png").is_file()
    diffusion = build_stage(compose(["stage=vqdiffusion", *SMALL, *fs, "transformer.n_layer=1", "transformer.n_head=2",
                                     "transformer.n_embd=32", "diffusion.num_timesteps=10"]))
    loss, _ = diffusion.training_step({"image": images(4)}, 0, 0)
    assert torch.isfinite(loss) and diffusion.sample(2, steps=2).shape == (2, 3, RES, RES)
