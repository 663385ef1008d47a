"""FSQ and LFQ first stages end to end at tiny size: a VQGAN step reports usage / perplexity / dead codes
as VQ does, and a transformer and a VQ-Diffusion model take their vocabulary from the quantizer, train a
few steps on its codes, decode samples, and record the first stage's codebook in their config (params)."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose, optimizer_steps
from vqtransformer.models.vqgan import VQModel

RES = 16
KINDS = {"fsq": {"kind": "fsq", "n_embed": 60, "levels": [5, 4, 3]}, "lfq": {"kind": "lfq", "n_embed": 64}}


def tiny_first_stage(kind: str) -> VQModel:
    torch.manual_seed(0)
    fs = OmegaConf.create({"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                           "resolution": RES, "z_channels": 32})
    cb = OmegaConf.create({"embed_dim": 8, "levels": None, "beta": 0.25, "entropy_weight": 0.1, **KINDS[kind]})
    return VQModel.from_config(fs, cb).eval()


class FakeAccelerator:
    device = torch.device("cpu")
    num_processes = 1

    def prepare(self, *objs):
        return objs

    def unwrap_model(self, m):
        return m


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 3, RES, RES, generator=g) * 2 - 1, "class_label": torch.arange(n) % 3}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_vqgan_stage_reports_codebook_statistics(kind, one_thread):
    from vqtransformer.stages.vqgan import VQGANStage

    preset = {"fsq": "codebook=fsq_1k", "lfq": "codebook=lfq_1k"}[kind]
    overrides = [preset, f"data.resolution={RES}", "first_stage.ch=32", "first_stage.z_channels=32",
                 "codebook.embed_dim=8"]
    overrides += (["codebook.levels=[5,4,3]", "codebook.n_embed=60"] if kind == "fsq" else ["codebook.n_embed=64"])
    stage = VQGANStage(compose(["stage=vqgan", *overrides]))
    assert stage.vqgan.quantize.kind == kind
    specs = stage.setup(FakeAccelerator())
    b = batch()
    loss, logs = stage.training_step(b, 0, 0)
    loss.backward()
    specs[0].optimizer.step()
    assert math.isfinite(loss.item())
    assert {"codebook/usage", "codebook/dead", "codebook/perplexity", "loss/codebook"} <= set(logs)
    assert 0 < logs["codebook/usage"] <= 1
    stage.train(False)
    with torch.no_grad():
        stage.validate(b)
        end = stage.validation_end()
    assert 0 < end["val/codebook_usage"] <= 1 and end["val/perplexity"] >= 1


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_transformer_trains_on_the_codes_of_an_fsq_or_lfq_first_stage(kind, one_thread):
    from vqtransformer.stages.transformer import TransformerStage

    fs = tiny_first_stage(kind)
    cfg = compose(["stage=transformer", "first_stage.ckpt=unused", f"data.resolution={RES}", "data.batch_size=4",
                   "transformer.n_layer=1", "transformer.n_embd=32", "transformer.n_head=2",
                   "transformer.block_size=32", "trainer.max_steps=5", "stage.val_samples=2",
                   "transformer.lr=3e-3", "transformer.warmup_steps=0"])
    stage = TransformerStage(cfg, first_stage=fs)
    assert stage.vocab_size == fs.quantize.n_embed == stage.gpt.vocab_size
    # what the run's params will say (the loop logs the flattened config)
    assert cfg.transformer.vocab_size == fs.quantize.n_embed
    assert cfg.first_stage.codebook.kind == kind and cfg.first_stage.codebook.size == fs.quantize.n_embed
    assert cfg.first_stage.codebook.dim == fs.quantize.code_dim and cfg.first_stage.arch.f == 4
    (spec,) = stage.setup(FakeAccelerator())
    b = batch()
    losses = [loss.item() for loss, _ in optimizer_steps(stage, spec, b, 4)]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    stage.train(False)
    x = stage.sample(2, seed=0)
    assert x.shape == (2, 3, RES, RES) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_vqdiffusion_trains_on_the_codes_of_an_fsq_or_lfq_first_stage(kind, one_thread):
    from vqtransformer.stages.vqdiffusion import VQDiffusionStage

    fs = tiny_first_stage(kind)
    cfg = compose(["stage=vqdiffusion", f"data.resolution={RES}", "transformer.n_layer=1", "transformer.n_head=2",
                   "transformer.n_embd=32", "diffusion.num_timesteps=10", "stage.importance_min_count=1",
                   "stage.sample_steps=3", "stage.val_samples=2"])
    stage = VQDiffusionStage(cfg, first_stage=fs)
    assert stage.diffusion.K == fs.quantize.n_embed
    assert cfg.first_stage.codebook.kind == kind
    (spec,) = stage.setup(FakeAccelerator())
    b = batch()
    stage.train(True)
    ((loss, _),) = optimizer_steps(stage, spec, b, 3)[-1:]
    assert torch.isfinite(loss)
    stage.train(False)
    x = stage.sample(2, steps=3, seed=0)
    assert x.shape == (2, 3, RES, RES) and x.min() >= -1 and x.max() <= 1
