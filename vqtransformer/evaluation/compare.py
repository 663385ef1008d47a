"""Sweep comparison: one row per evaluated run (the hyperparameters that vary + the eval metrics),
written as CSV and Markdown, and metric-vs-hyperparameter plots.

A record is ``{"run_id", "run_name", "params": {flat config key: str}, "metrics": {key: float}}``;
metric keys are those of the JSON summary (``rfid``, or ``standin/rfid`` for a stand-in network).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

#: default plots: x is a config key (matched as a suffix of the logged param keys, or a metric),
#: y the metrics drawn against it
DEFAULT_PLOTS = [
    {"name": "codebook_size", "x": ["codebook.n_embed", "codebook_size"], "y": ["rfid", "psnr", "codebook_usage"]},
    {"name": "transformer_depth", "x": ["transformer.n_layer", "transformer.depth"], "y": ["fid"]},
]


def _lookup(d: dict, key: str):
    """``d[key]``, else the unique entry whose key ends with ``.key`` or ``/key``."""
    if key in d:
        return key, d[key]
    hits = [k for k in d if k.endswith("." + key) or k.endswith("/" + key)]
    return (hits[0], d[hits[0]]) if len(hits) == 1 else (None, None)


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def varying_params(records: list[dict]) -> list[str]:
    """Param keys whose value differs between records (the sweep's axes)."""
    keys = sorted({k for r in records for k in r.get("params", {})})
    return [k for k in keys if len({str(r.get("params", {}).get(k)) for r in records}) > 1]


def comparison_table(records: list[dict]) -> tuple[list[str], list[list]]:
    params = varying_params(records)
    metric_keys = list(dict.fromkeys(k for r in records for k in r.get("metrics", {})))
    header = ["run_name", "run_id", *params, *metric_keys]
    rows = [[r.get("run_name", ""), r.get("run_id", ""), *[r.get("params", {}).get(p, "") for p in params],
             *[r.get("metrics", {}).get(m, "") for m in metric_keys]] for r in records]
    return header, rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_csv(header: list[str], rows: list[list], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_markdown(header: list[str], rows: list[list], path: Path, title: str = "") -> Path:
    lines = ([f"# {title}", ""] if title else []) + ["| " + " | ".join(header) + " |",
                                                      "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_metric_vs(records: list[dict], x_keys: list[str], y_keys: list[str], path: Path) -> Path | None:
    """Each y metric against the first x key found in the runs; None when x does not vary or no y exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_key in x_keys:
        xs = {}
        for i, r in enumerate(records):
            name, v = _lookup(r.get("params", {}), x_key)
            if name is None:
                name, v = _lookup(r.get("metrics", {}), x_key)
            if _num(v) is not None:
                xs[i], x_label = _num(v), name
        if len(set(xs.values())) > 1:
            break
    else:
        return None
    panels = []
    for y in y_keys:
        pts, y_label = defaultdict(list), None
        for i, x in xs.items():
            name, v = _lookup(records[i].get("metrics", {}), y)
            if _num(v) is not None:
                pts[x].append(_num(v))
                y_label = name
        if pts:
            panels.append((y_label, pts))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (label, pts) in zip(axes[0], panels):
        xs_sorted = sorted(pts)
        for x in xs_sorted:
            ax.scatter([x] * len(pts[x]), pts[x], color="C0", s=14, alpha=0.6)
        ax.plot(xs_sorted, [sum(pts[x]) / len(pts[x]) for x in xs_sorted], "-o", color="C1", ms=4)
        if min(xs_sorted) > 0 and max(xs_sorted) / min(xs_sorted) >= 8:
            ax.set_xscale("log", base=2)
        ax.set(xlabel=x_label, ylabel=label, title=f"{label} vs {x_label}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(records: list[dict], out_dir: Path, title: str = "", plots: list[dict] | None = None) -> list[Path]:
    """comparison.csv, comparison.md and one PNG per plot that applies; returns the written files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = comparison_table(records)
    files = [write_csv(header, rows, out_dir / "comparison.csv"),
             write_markdown(header, rows, out_dir / "comparison.md", title)]
    for spec in plots if plots is not None else DEFAULT_PLOTS:
        p = plot_metric_vs(records, list(spec["x"]), list(spec["y"]), out_dir / f"{spec['name']}.png")
        if p is not None:
            files.append(p)
    return files
