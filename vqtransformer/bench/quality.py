"""`make bench-quality`: codebook quality at a fixed budget (minutes, not seconds).

CIFAR-10 (Krizhevsky 2009), 32 px, f4 (8x8 codes), ch 64, ch_mult [1,2,2], attention at 8,
embed_dim 64, L1 + codebook loss only (no LPIPS, no discriminator), 1,500 steps at batch 16,
for K=1024 and K=16384. Reports test-set PSNR, codebook usage and perplexity of each run.
Targets: usage >= 98%, perplexity >= K/2, PSNR >= 23 dB at K=1024 and not lower at K=16384.

Data: ``--data-root`` (class-per-folder train/ and test/), else the development copy
``../shared/data/cifar10/cifar10_jpg.tar`` extracted once into ``$VQT_CACHE/cifar10``.
``--variant original`` runs the paper's plain quantizer (U(-1/K,1/K) init, no restarts) for contrast.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from vqtransformer.bench import write_json
from vqtransformer.bench.vqgan import compose

VARIANTS = {
    "default": [],  # the codebook group's defaults: data init + dead-code restart
    "cosine": ["codebook.l2_normalize=true"],
    "original": ["codebook.init=uniform", "codebook.restart_dead=false"],
}


def cifar_root(given: str | None) -> Path:
    if given:
        return Path(given)
    tar = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10" / "cifar10_jpg.tar"
    cache = Path(os.environ.get("VQT_CACHE", Path.home() / ".cache" / "vqtransformer")) / "cifar10"
    if not (cache / "cifar10_jpg" / "test").is_dir():
        if not tar.is_file():
            raise SystemExit(f"no CIFAR-10: pass --data-root DIR (train/<class>/*, test/<class>/*); {tar} is absent")
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as t:
            t.extractall(cache, filter="data")
    return cache / "cifar10_jpg"


@torch.no_grad()
def test_metrics(stage, dataset, batch_size: int = 250) -> dict:
    from vqtransformer.modules.quantize import perplexity
    from vqtransformer.stages.vqgan import psnr

    model = stage.unwrap(stage.vqgan).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=1)
    counts = torch.zeros(model.quantize.n_embed)
    psnrs = []
    for batch in loader:
        x = batch["image"].contiguous(memory_format=torch.channels_last)
        xrec, _, info = model(x)
        psnrs.append(psnr(xrec, x))
        counts += info["counts"]
    return {"psnr_db": float(torch.cat(psnrs).mean()), "usage": float((counts > 0).float().mean()),
            "perplexity": float(perplexity(counts)), "test_images": int(sum(len(p) for p in psnrs))}


def run_one(k: int, steps: int, root: Path, variant: str, lr: float) -> dict:
    from vqtransformer.data import build_datasets
    from vqtransformer.loading import build_stage
    from vqtransformer.training.checkpoint import load
    from vqtransformer.training.loop import run_training

    out = Path(tempfile.mkdtemp(prefix=f"vqt-quality-k{k}-"))
    overrides = ["data=cifar10", f"data.root={root}", "data.resolution=32", "data.batch_size=16", "data.num_workers=1",
                 "first_stage.ch=64", "first_stage.ch_mult=[1,2,2]", "first_stage.attn_resolutions=[8]",
                 "first_stage.z_channels=64", f"codebook.n_embed={k}", "codebook.embed_dim=64",
                 "first_stage.loss.perceptual=none", "first_stage.loss.disc_start=1000000000",
                 f"stage.learning_rate={lr}", f"trainer.max_steps={steps}", f"trainer.val_every={steps}",
                 f"trainer.ckpt_every={steps}", "logger=none", f"trainer.output_dir={out}", *VARIANTS[variant]]
    cfg = compose(overrides)
    t = time.perf_counter()
    run_training(cfg)
    train_s = time.perf_counter() - t
    stage = build_stage(cfg, for_inference=True)
    stage.load_state_dict(load(out / "checkpoints" / "last.ckpt")["model"])
    _, test = build_datasets(compose(overrides))
    row = {"bench": "codebook_quality", "variant": variant, "K": k, "steps": steps, "lr": lr,
           "train_s": train_s, **test_metrics(stage, test)}
    row["perplexity_over_K"] = row["perplexity"] / k
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="1024,16384")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--variant", default="default", choices=sorted(VARIANTS))
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default="bench/results/quality.json")
    args = ap.parse_args(argv)
    root = cifar_root(args.data_root)
    rows = []
    for k in map(int, args.ks.split(",")):
        row = run_one(k, args.steps, root, args.variant, args.lr)
        rows.append(row)
        print(f"K={k:6d} {args.variant:9s} PSNR {row['psnr_db']:.2f} dB  usage {100 * row['usage']:.1f}%  "
              f"perplexity {row['perplexity']:.0f} ({row['perplexity_over_K']:.2f} K)  train {row['train_s']:.0f}s",
              flush=True)
    write_json(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
