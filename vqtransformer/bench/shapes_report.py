"""``make shapes-report``: every stage trained on ``shapes`` at its preset's budget, judged, reported.

Runs the entry points as a user does (``train.py``, ``evaluate.py``, ``sample.py``, each a
subprocess with this interpreter) and reuses what exists, so a rerun only does what is missing:

1. ``vqgan``: the default ``make train`` model, trained to ``disc_start - 1`` steps, scored (the point
   just before the adversarial phase; its checkpoint is kept as ``pre_disc.ckpt``), then resumed to
   ``trainer.max_steps`` in the same run and scored again;
2. ``segmentation-vq``: a VQ model of the label maps (the condition of ``transformer-segmentation``);
3. ``transformer-none`` / ``-class`` / ``-segmentation``: tiny GPTs over the codes of 1.;
4. ``vqdiffusion-class``: class-conditional VQ-Diffusion over the same codes;
5. ``vitgan``: the tiny ViTGAN.

Every score comes from ``evaluate.py`` with the shapes judge as feature network (offline,
dataset-specific, not comparable to published numbers). The segmentation row's agreement (the
judge's class of each sample equals the dominant class of the label map it was drawn from) is
computed here from ``sample.py``'s PNGs. Writes ``report.md``, ``report.html``, ``results.json``
and the grids under ``--out`` (default ``outputs/shapes-report``) and logs them as the artifacts
of one MLflow run (experiment ``shapes-report``).

    python -m vqtransformer.bench.shapes_report [--out DIR] [--only vqgan,transformer-class]
        [--steps-scale 0.1] [--set stage=key=value ...]

``--steps-scale`` shortens every training run (plumbing checks; the report then says so).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# budgets and targets of issue 11's table (steps are the presets' budgets on a 2-core CPU)
VQ_STEPS, DISC_START = 1500, 1001  # the `make train` defaults (conf/trainer/cpu.yaml, vqgan_tiny)
GPT_STEPS, DIFFUSION_STEPS, VITGAN_STEPS = 2000, 3000, 3000


@dataclass
class Job:
    name: str
    train: list[str]                       # train.py overrides (run dir added)
    sample: list[str] = field(default_factory=list)   # sample.py overrides; None: no samples
    needs: list[str] = field(default_factory=list)    # jobs whose checkpoints it reads
    steps: int = 0


def jobs(out: Path, scale: float) -> dict[str, Job]:
    def n(steps: int) -> int:
        return max(20, int(round(steps * scale)))

    run = out / "runs"
    vq = run / "vqgan" / "checkpoints" / "last.ckpt"
    seg = run / "segmentation-vq" / "checkpoints" / "last.ckpt"
    disc_start = n(DISC_START - 1) + 1
    vq_loss = [f"first_stage.loss.disc_start={disc_start}"]
    if scale != 1.0:  # keep the adversarial schedule's proportions
        vq_loss += [f"first_stage.loss.disc_pretrain_steps={n(300)}", f"first_stage.loss.disc_ramp_steps={n(300)}"]
    gpt = ["stage=transformer", f"first_stage.ckpt={vq}"]
    return {
        "vqgan": Job("vqgan", [f"trainer.max_steps={n(VQ_STEPS)}", *vq_loss], steps=n(VQ_STEPS)),
        "segmentation-vq": Job("segmentation-vq", ["data.target=segmentation", f"trainer.max_steps={n(VQ_STEPS)}"],
                               steps=n(VQ_STEPS)),
        "transformer-none": Job("transformer-none", [*gpt, "conditioning=none", f"trainer.max_steps={n(GPT_STEPS)}"],
                                ["n=36"], ["vqgan"], n(GPT_STEPS)),
        "transformer-class": Job("transformer-class", [*gpt, "conditioning=class", f"trainer.max_steps={n(GPT_STEPS)}"],
                                 ["n=36"], ["vqgan"], n(GPT_STEPS)),
        "transformer-segmentation": Job(
            "transformer-segmentation",
            [*gpt, "conditioning=segmentation", f"conditioning.ckpt={seg}", f"trainer.max_steps={n(GPT_STEPS)}"],
            ["n=256"], ["vqgan", "segmentation-vq"], n(GPT_STEPS)),
        "vqdiffusion-class": Job("vqdiffusion-class", ["stage=vqdiffusion", f"first_stage.ckpt={vq}", "conditioning=class",
                                                       f"trainer.max_steps={n(DIFFUSION_STEPS)}"],
                                 ["n=36"], ["vqgan"], n(DIFFUSION_STEPS)),
        "vitgan": Job("vitgan", ["stage=vitgan", f"trainer.max_steps={n(VITGAN_STEPS)}"], ["n=36"], [], n(VITGAN_STEPS)),
    }


def _run(cmd: list[str], log: Path) -> float:
    """Run an entry point; its output goes to ``log``; returns the wall time. A failure stops the report."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"shapes-report: `{' '.join(cmd[1:3])} ...` failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def _evaluate(ckpt: Path, log: Path, dest: Path, extra: list[str]) -> dict:
    """``evaluate.py ckpt=...``; the summary it writes is copied to ``dest`` and returned."""
    before = log.read_text() if log.exists() else ""
    _run([sys.executable, "evaluate.py", f"ckpt={ckpt}", *extra], log)
    found = re.findall(r"^summary: (.+)$", log.read_text()[len(before):], re.M)
    if not found:
        raise SystemExit(f"shapes-report: evaluate.py printed no summary path; see {log}")
    shutil.copy(found[-1].strip(), dest)
    return json.loads(dest.read_text())


def _client_and_run(run_dir: Path):
    """(MLflow client, run id) of the run recorded in ``run_dir``'s checkpoint (run id None: tracking off)."""
    from mlflow.tracking import MlflowClient

    from vqtransformer.tracking.mlflow_tracker import resolve_tracking_uri

    state = _ckpt(run_dir / "checkpoints" / "last.ckpt")
    uri = resolve_tracking_uri((state["config"].get("logger") or {}).get("tracking_uri"))
    return MlflowClient(uri), state.get("mlflow_run_id")


def _metric_history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    client, run_id = _client_and_run(run_dir)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) if run_id else []


def _last_image(run_dir: Path, prefix: str, dest: Path) -> Path | None:
    """The newest ``images/<prefix>_stepNNNNNNN.png`` artifact of the run, downloaded to ``dest``."""
    client, run_id = _client_and_run(run_dir)
    if not run_id:
        return None
    names = sorted(f.path for f in client.list_artifacts(run_id, "images") if Path(f.path).name.startswith(prefix))
    if not names:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, names[-1], str(dest)))


def segmentation_agreement(sample_dir: Path, data_cfg: dict) -> dict[str, float]:
    """The judge's class of sample i against the dominant class of validation map i (sample.py
    conditions sample i on validation item i)."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from PIL import Image

    from vqtransformer.data import build_dataset
    from vqtransformer.evaluation.judge import load_or_train_judge, predict

    cfg = OmegaConf.create({**data_cfg, "target": "image"})
    judge = load_or_train_judge(cfg)
    val = build_dataset(OmegaConf.create(data_cfg), False)
    files = sorted(sample_dir.glob("sample_*.png"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    wanted = []
    for i in range(len(files)):
        seg = torch.as_tensor(val[i % len(val)]["segmentation"]).long().flatten()
        counts = seg.bincount(minlength=judge.num_logits + 1)[1:]
        wanted.append(int(counts.argmax()))
    hit = (predict(judge, images)[0] == torch.tensor(wanted)).float()
    return {"judge/map_class_agreement": float(hit.mean()), "n": len(files)}


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def build_rows(res: dict) -> list[dict]:
    """The issue's table: one row per target, with the measured value and whether it is met."""
    rows = []

    def row(stage, what, value, target, ok):
        rows.append({"stage": stage, "what": what, "value": value, "target": target,
                     "met": None if value is None else bool(ok)})

    m = lambda job, key: (res.get(job, {}).get("metrics") or {}).get(key)  # noqa: E731
    pre = res.get("vqgan", {}).get("pre_disc", {}).get("metrics", {})
    psnr, rfid = m("vqgan", "psnr"), m("vqgan", "judge/rfid")
    row("vqgan", "val PSNR at the end (dB)", psnr, ">= 26", psnr is not None and psnr >= 26)
    if pre:
        row("vqgan", "PSNR end - PSNR before disc_start (dB)", None if psnr is None else psnr - pre["psnr"], ">= -0.5",
            psnr is not None and psnr - pre["psnr"] >= -0.5)
        row("vqgan", "judge rFID end vs before disc_start", None if rfid is None else rfid - pre["judge/rfid"],
            "< 0 (lower at the end)", rfid is not None and rfid < pre["judge/rfid"])
    agree = m("vqgan", "judge/rec_class_agreement")
    if agree is not None:  # the ceiling of every class accuracy below: stage 2 draws in these codes
        row("vqgan", "judge class of reconstruction == of original", agree, "reported (bounds stage 2)", True)
    for job, cls in (("transformer-class", True), ("transformer-none", False), ("vqdiffusion-class", True),
                     ("vitgan", False)):
        if job not in res:
            continue
        if cls:
            acc = m(job, "judge/class_accuracy")
            row(job, "judge class accuracy", acc, ">= 0.90", acc is not None and acc >= 0.9)
        else:
            lo, hi = m(job, "judge/class_freq_min_ratio"), m(job, "judge/class_freq_max_ratio")
            row(job, "class frequency ratio min / max", None if lo is None else f"{lo:.3g} / {hi:.3g}",
                "each in [0.5, 2]", lo is not None and lo >= 0.5 and hi <= 2)
        fid = m(job, "judge/fid")
        if job.startswith("transformer") and rfid is not None:
            row(job, "judge FID / first stage's judge rFID", None if fid is None else fid / rfid, "<= 2",
                fid is not None and fid <= 2 * rfid)
        elif fid is not None:
            row(job, "judge FID", fid, "reported", True)
    if "transformer-segmentation" in res:
        a = res["transformer-segmentation"].get("agreement", {}).get("judge/map_class_agreement")
        row("transformer-segmentation", "judge class == map's dominant class", a, ">= 0.85", a is not None and a >= 0.85)
    return rows


def write_report(out: Path, res: dict, scale: float) -> list[Path]:
    rows = build_rows(res)
    note = "" if scale == 1.0 else (f"\n**Shortened run (--steps-scale {scale}): a plumbing check, not the "
                                    f"presets' budgets; the targets do not apply.**\n")
    md = ["# shapes report", "",
          "Every number is from the shapes judge (a CNN trained on the generator's own labels; dataset-specific,"
          " not comparable to published Inception numbers). Command: `make shapes-report`.", note,
          "| stage | measure | value | target | met |", "|---|---|---|---|---|"]
    md += [f"| {r['stage']} | {r['what']} | {_fmt(r['value'])} | {r['target']} | "
           f"{'—' if r['met'] is None else ('yes' if r['met'] else 'NO')} |" for r in rows]
    md += ["", "| job | steps | training wall (s) | run dir |", "|---|---|---|---|"]
    md += [f"| {k} | {v.get('steps')} | {_fmt(v.get('train_s'))} | `{v.get('run_dir')}` |" for k, v in res.items()]
    curve = res.get("vqgan", {}).get("val_psnr_curve")
    if curve:
        md += ["", "vqgan val PSNR against steps: " + ", ".join(f"{s}: {v:.2f}" for s, v in curve)]
    md += [""]
    grids = []
    for job, v in res.items():
        for label, g in v.get("grids", {}).items():
            grids.append((f"{job}: {label}", g))
            md += [f"## {job}: {label}", "", f"![{job} {label}]({g})", ""]
    (out / "report.md").write_text("\n".join(md) + "\n")
    table = "".join(f"<tr><td>{html.escape(r['stage'])}</td><td>{html.escape(r['what'])}</td><td>{_fmt(r['value'])}</td>"
                    f"<td>{html.escape(r['target'])}</td><td>{'—' if r['met'] is None else ('yes' if r['met'] else 'NO')}"
                    f"</td></tr>" for r in rows)
    figs = "".join(f"<h2>{html.escape(t)}</h2><img src='{html.escape(g)}' style='image-rendering:pixelated'>"
                   for t, g in grids)
    (out / "report.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>shapes report</title><h1>shapes report</h1>"
        f"<p>Numbers from the shapes judge (dataset-specific, not comparable to published numbers).</p>"
        f"{'<p><b>' + html.escape(note.strip(' *')) + '</b></p>' if note else ''}"
        f"<table border=1 cellpadding=4><tr><th>stage</th><th>measure</th><th>value</th><th>target</th><th>met</th>"
        f"</tr>{table}</table>{figs}\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "jobs": res, "steps_scale": scale}, indent=2) + "\n")
    return [out / "report.md", out / "report.html", out / "results.json"] + [out / g for _, g in grids]


def _latest_sample_grid(out: Path, job: str, log: Path, overrides: list[str], ckpt: Path) -> Path:
    sdir = out / "runs" / job / "report-samples"
    if not (sdir / "grid.png").is_file():
        _run([sys.executable, "sample.py", f"ckpt={ckpt}", f"out_dir={sdir}", *overrides], log)
    return sdir


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "outputs" / "shapes-report"))
    p.add_argument("--only", default=None, help="comma-separated jobs (default: all)")
    p.add_argument("--steps-scale", type=float, default=1.0)
    p.add_argument("--set", action="append", default=[], metavar="JOB=OVERRIDE",
                   help="an extra train.py override for one job, e.g. vqgan=first_stage.ch=64")
    p.add_argument("--no-mlflow", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    all_jobs = jobs(out, a.steps_scale)
    wanted = a.only.split(",") if a.only else list(all_jobs)
    unknown = [w for w in wanted if w not in all_jobs]
    if unknown:
        raise SystemExit(f"--only: unknown job(s) {unknown}; choose from {', '.join(all_jobs)}")
    order = []
    for w in wanted:  # dependencies first
        for d in all_jobs[w].needs + [w]:
            if d not in order:
                order.append(d)
    extra: dict[str, list[str]] = {}
    for s in a.set:
        job, _, ov = s.partition("=")
        extra.setdefault(job, []).append(ov)
    res_path = out / "results.json"
    res: dict = json.loads(res_path.read_text())["jobs"] if res_path.is_file() else {}
    for name in order:
        job = all_jobs[name]
        run_dir = out / "runs" / name
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        log = out / "runs" / f"{name}.log"
        r = res.setdefault(name, {})
        r.update(run_dir=str(run_dir.relative_to(out)), steps=job.steps)
        train = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *job.train, *extra.get(name, [])]
        if not ckpt.is_file() or r.get("done_steps") != job.steps:
            t = 0.0
            if name == "vqgan":  # stop just before the adversarial phase, score, then go on in the same run
                pre_steps = int(next(o for o in job.train if "disc_start=" in o).split("=")[1]) - 1
                pre = run_dir / "checkpoints" / "pre_disc.ckpt"
                if not pre.is_file():
                    t += _run([*[o for o in train if not o.startswith("trainer.max_steps=")],
                               f"trainer.max_steps={pre_steps}"], log)
                    shutil.copy(ckpt, pre)
                r["pre_disc"] = _evaluate(pre, log, out / "vqgan-pre-disc-summary.json", [])
                train += ["trainer.resume=true"]
            t += _run(train, log)
            r["train_s"], r["done_steps"] = round(t, 1), job.steps
        if name == "segmentation-vq":
            continue  # a condition model: scored through transformer-segmentation
        if name != "transformer-segmentation":
            r.update(_evaluate(ckpt, log, out / f"{name}-summary.json", []))
        grids = {}
        if name == "vqgan":
            r["val_psnr_curve"] = _metric_history(run_dir, "val/psnr")
            img = _last_image(run_dir, "reconstructions_step", run_dir / "report-images")
            if img is not None:
                grids["reconstructions (validation; per class row: input, reconstruction, ...)"] = img
        else:
            sdir = _latest_sample_grid(out, name, log, job.sample, ckpt)
            grids["samples"] = sdir / "grid.png"
            if name == "transformer-segmentation":
                cfg = _ckpt(ckpt)["config"]["data"]
                r["agreement"] = segmentation_agreement(sdir, cfg)
        r["grids"] = {}
        for label, g in grids.items():
            dest = out / "grids" / f"{name}.png"
            dest.parent.mkdir(exist_ok=True)
            shutil.copy(g, dest)
            r["grids"][label] = str(dest.relative_to(out))
        res_path.write_text(json.dumps({"rows": [], "jobs": res, "steps_scale": a.steps_scale}, indent=2) + "\n")
    files = write_report(out, res, a.steps_scale)
    print((out / "report.md").read_text())
    if not a.no_mlflow:
        _log_report(files, out)
    return res


def _ckpt(path: Path) -> dict:
    from vqtransformer.training.checkpoint import load

    return load(path)


def _log_report(files: list[Path], out: Path) -> None:
    import mlflow

    from vqtransformer.tracking.mlflow_tracker import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(None))
    mlflow.set_experiment("shapes-report")
    with mlflow.start_run(run_name=f"shapes-report {time.strftime('%Y-%m-%d %H:%M')}") as run:
        for f in files:
            rel = f.relative_to(out).parent
            mlflow.log_artifact(str(f), None if str(rel) == "." else str(rel))
        print(f"shapes-report: logged to MLflow run {run.info.run_id} (experiment shapes-report)")


if __name__ == "__main__":
    main()
