"""`make bench-ablation`: the codebook ablation (quantizer kind x size) as a real sweep, scored offline.

Runs ``train.py -m experiment=codebook_ablation`` on CIFAR-10 (Krizhevsky 2009) with the settings of
`make bench-quality`: 32 px, f4 (8x8 codes), ch 64, ch_mult [1,2,2], attention at 8, embed_dim 64
for every quantizer, L1 + codebook loss only (no LPIPS, no discriminator), 1,500 steps at batch 16,
lr 2e-4. The presets: learned VQ (k1024, k16384), FSQ (fsq_1k, fsq_16k), LFQ (lfq_1k, lfq_16k).
Then ``evaluate.py sweep_id=ID eval.standin=true`` scores every child on the test split (PSNR, L1,
codebook usage / perplexity / dead codes, and a *stand-in* rFID: random-weight features, plumbing
only, not comparable to published rFID) and writes the answer to the sweep's parent run.

The table (PSNR, usage, perplexity, stand-in rFID, training images/s) goes to the parent run
(``bench_ablation.md`` / ``.json`` at its artifact root) and to ``bench/results/ablation.{json,md}``.
Targets: FSQ and LFQ usage >= 99 % at every size; the best method's PSNR at ~16k codes at least the
best VQ variant's at 1024.

    python -m vqtransformer.bench.ablation [--steps 1500] [--presets k1024,fsq_1k,...] [--num-real N]
        [--data-root DIR] [--tracking-uri URI] [--launcher basic|submitit_local]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vqtransformer.bench import write_json
from vqtransformer.bench.quality import cifar_root

ROOT = Path(__file__).resolve().parents[2]
PRESETS = "k1024,k16384,fsq_1k,fsq_16k,lfq_1k,lfq_16k"


def train_overrides(root: Path, steps: int, lr: float) -> list[str]:
    """`make bench-quality`'s model and budget (one embed_dim for every quantizer)."""
    return ["data=cifar10", f"data.root={root}", "data.resolution=32", "data.batch_size=16", "data.num_workers=1",
            "first_stage.ch=64", "first_stage.ch_mult=[1,2,2]", "first_stage.attn_resolutions=[8]",
            "first_stage.z_channels=64", "codebook.embed_dim=64", "first_stage.loss.perceptual=none",
            "first_stage.loss.disc_start=1000000000", f"stage.learning_rate={lr}", f"trainer.max_steps={steps}",
            f"trainer.val_every={steps}", f"trainer.ckpt_every={steps}", "trainer.log_every=50",
            "logger.log_checkpoint=false", "logger.experiment_name=bench-ablation"]


def _run(cmd: list[str], env: dict) -> None:
    print("+", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise SystemExit(f"bench-ablation: `{' '.join(cmd[:3])} ...` exited with {p.returncode}")


def collect(uri: str, sweep_id: str) -> tuple[str | None, list[dict]]:
    """(parent run id, one row per child) from the store after evaluate.py."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`vqt.sweep_id` = '{sweep_id}'", max_results=1000)
    parent = next((r.info.run_id for r in runs if r.data.tags.get("vqt.role") == "parent"), None)
    rows = []
    for r in sorted((r for r in runs if r.data.tags.get("vqt.role") != "parent"),
                    key=lambda r: int(r.data.tags.get("vqt.job_num", 0))):
        m, p = r.data.metrics, r.data.params
        speed = [x.value for x in client.get_metric_history(r.info.run_id, "speed/images_per_s")]
        rows.append({"bench": "codebook_ablation", "preset": r.info.run_name, "kind": p.get("codebook.kind"),
                     "K": int(p.get("codebook.n_embed", 0)), "levels": p.get("codebook.levels"),
                     "steps": int(p.get("trainer.max_steps", 0)), "psnr_db": m.get("eval/psnr"), "l1": m.get("eval/l1"),
                     "usage": m.get("eval/codebook_usage"), "perplexity": m.get("eval/perplexity"),
                     "dead_codes": m.get("eval/dead_codes"), "standin_rfid": m.get("eval/standin/rfid"),
                     "images_per_s": sum(speed[1:] or speed) / max(len(speed[1:] or speed), 1) if speed else None,
                     "run_id": r.info.run_id, "status": r.info.status})
    return parent, rows


def _f(v, fmt):
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def table(rows: list[dict], steps: int, n_real: str) -> str:
    lines = [f"# Codebook ablation on CIFAR-10 (32 px, f4, {steps} steps, batch 16; test split, {n_real} images)", "",
             "rFID here is a STAND-IN (random-weight features, eval.standin=true): plumbing only, not comparable to "
             "published rFID. PSNR, usage and perplexity do not depend on it.", "",
             "| preset | kind | K | PSNR dB (↑) | L1 [0,1] (↓) | usage (↑) | perplexity (↑) | perplexity/K | dead codes "
             "| stand-in rFID (↓) | train images/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -(r["psnr_db"] or 0)):
        lines.append(f"| {r['preset']} | {r['kind']} | {r['K']} | {_f(r['psnr_db'], '.2f')} | {_f(r['l1'], '.4f')} | "
                     f"{_f(r['usage'] and 100 * r['usage'], '.1f')} % | {_f(r['perplexity'], '.0f')} | "
                     f"{_f(r['perplexity'] and r['perplexity'] / r['K'], '.2f')} | {_f(r['dead_codes'], '.0f')} | "
                     f"{_f(r['standin_rfid'], '.3f')} | {_f(r['images_per_s'], '.0f')} |")
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["kind"] in ("fsq", "lfq") and r["usage"] is not None:
            out.append(f"{'PASS' if r['usage'] >= 0.99 else 'FAIL'}: {r['preset']} usage {100 * r['usage']:.1f} % "
                       "(target >= 99 %)")
    vq1k = [r["psnr_db"] for r in rows if r["kind"] == "vq" and r["K"] == 1024 and r["psnr_db"] is not None]
    big = [(r["psnr_db"], r["preset"]) for r in rows if 8192 <= r["K"] <= 32768 and r["psnr_db"] is not None]
    if vq1k and big:
        best, name = max(big)
        out.append(f"{'PASS' if best >= max(vq1k) else 'FAIL'}: best PSNR at ~16k codes {best:.2f} dB ({name}) vs "
                   f"best VQ at 1024 {max(vq1k):.2f} dB (target: at least as high)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=PRESETS, help="codebook presets to sweep (comma-separated)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--num-real", type=int, default=None, help="score the first N test images (default: all 10,000)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else the project's mlflow.db")
    ap.add_argument("--launcher", default="basic", help="hydra/launcher: basic (one job after another) | submitit_local")
    ap.add_argument("--out", default="bench/results/ablation.json")
    args = ap.parse_args(argv)

    from vqtransformer.tracking import resolve_tracking_uri

    root = cifar_root(args.data_root)
    uri = resolve_tracking_uri(args.tracking_uri)
    sweep_dir = Path(tempfile.mkdtemp(prefix="vqt-ablation-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", "VQT_OFFLINE": "1"}
    t0 = time.perf_counter()
    _run([sys.executable, "train.py", "-m", "experiment=codebook_ablation", f"codebook={args.presets}",
          *([f"hydra/launcher={args.launcher}"] if args.launcher != "basic" else []),
          *train_overrides(root, args.steps, args.lr), f"hydra.sweep.dir={sweep_dir}"], env)
    train_s = time.perf_counter() - t0
    sweep_id = json.loads((sweep_dir / "sweep.json").read_text())["sweep_id"]
    _run([sys.executable, "evaluate.py", f"sweep_id={sweep_id}", f"tracking_uri={uri}", "eval.standin=true",
          "eval.metrics=[rfid,psnr,l1,codebook]", "eval.small_n=warn",
          *([f"eval.num_real={args.num_real}"] if args.num_real else [])], env)
    parent, rows = collect(uri, sweep_id)
    n_real = str(args.num_real or "all")
    md = table(rows, args.steps, n_real)
    checks = targets(rows)
    md += "\n" + "\n".join(f"- {c}" for c in checks) + "\n" + (
        f"\nsweep `{sweep_id}`, parent run `{parent}` in {uri}; {len(rows)} jobs trained in {train_s / 60:.1f} min\n")
    out = Path(args.out)
    write_json([{**r, "sweep_id": sweep_id, "parent_run_id": parent, "num_real": n_real} for r in rows], out)
    out.with_suffix(".md").write_text(md)
    if parent:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        with tempfile.TemporaryDirectory() as d:
            for name, text in (("bench_ablation.md", md), ("bench_ablation.json", out.read_text())):
                (Path(d) / name).write_text(text)
                client.log_artifact(parent, str(Path(d) / name))
        client.set_tag(parent, "vqt.bench", "bench-ablation")
    print(md, flush=True)
    print(f"wrote {out} and {out.with_suffix('.md')}" + (f"; logged to parent run {parent}" if parent else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
