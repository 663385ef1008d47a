"""Stage-1 speed: the full VQGAN training step and the quantizer's nearest-code lookup.

Training step (the issue's reference case): 64 px, ch 64, ch_mult [1,2,2], attention at 16,
K=1024 codes of dim 64, batch 8, fp32; encoder, quantizer, decoder, L1 + LPIPS-VGG
(random backbone weights: same cost) + codebook loss, adaptive weight, discriminator step —
exactly ``training.loop.train_step`` with both optimizers active.
"""

from __future__ import annotations

import torch

from vqtransformer.bench import timed

REFERENCE = ["data.resolution=64", "data.batch_size=8", "first_stage.ch=64", "first_stage.ch_mult=[1,2,2]",
             "first_stage.attn_resolutions=[16]", "first_stage.z_channels=64", "codebook.n_embed=1024",
             "codebook.embed_dim=64", "first_stage.loss.perceptual=lpips", "first_stage.loss.lpips_net=vgg",
             "first_stage.loss.lpips_random_backbone=true", "first_stage.loss.disc_start=0", "logger=none"]


def compose(overrides):
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import vqtransformer.config  # noqa: F401

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def training_step_rate(overrides: list[str], iters: int, device: str = "cpu", mixed_precision: str = "no") -> float:
    from accelerate import Accelerator

    from vqtransformer.data import ShapesDataset
    from vqtransformer.stages.vqgan import VQGANStage
    from vqtransformer.training.loop import to_device, train_step

    cfg = compose(REFERENCE + overrides + [f"trainer.mixed_precision={mixed_precision}"])
    acc = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision)
    stage = VQGANStage(cfg)
    specs = stage.setup(acc)
    ds = ShapesDataset("train", cfg.data.resolution, size=64)
    batch = to_device(torch.utils.data.default_collate([ds[i] for i in range(cfg.data.batch_size)]), acc.device)
    stage.train(True)
    step = [0]

    def one():
        train_step(stage, specs, [batch], 1000 + step[0], acc)
        step[0] += 1

    sec = timed(one, warmup=2, iters=iters)
    return cfg.data.batch_size / sec


CHUNK = 1024  # rows of z per distance chunk: at most CHUNK x K distances exist at once


def quantizer_rows(quick: bool) -> list[dict]:
    from vqtransformer.modules.quantize import nearest_code

    rows = []
    z = torch.randn(8 * 16 * 16, 64)  # a batch of 8 16x16 latent grids
    for k in (1024, 4096, 16384):
        e = torch.randn(k, 64)
        sec = timed(lambda e=e: nearest_code(z, e, chunk_size=CHUNK), warmup=1, iters=3 if quick else 10)
        rows.append({"bench": "quantizer", "case": f"nearest code K={k} N={z.shape[0]} D=64",
                     "ms": sec * 1e3, "vectors_per_s": z.shape[0] / sec,
                     "peak_distance_MB": CHUNK * k * 4 / 2**20})
    return rows


def run(quick: bool) -> list[dict]:
    rows = []
    iters = 3 if quick else 8
    for cl in (True, False):
        ips = training_step_rate([f"trainer.channels_last={str(cl).lower()}"], iters)
        rows.append({"bench": "vqgan", "case": f"train step 64px b8 K1024 fp32 channels_last={cl}",
                     "images_per_s": ips, "target": 8.3})
    if torch.cuda.is_available():
        for mp in ("no", "bf16"):
            ips = training_step_rate(["data.batch_size=32"], iters, device="cuda", mixed_precision=mp)
            rows.append({"bench": "vqgan", "case": f"GPU train step 64px b32 {mp}", "images_per_s": ips})
    rows += quantizer_rows(quick)
    return rows
