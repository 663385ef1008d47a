"""Sweep comparison: one row per evaluated run (the hyperparameters that vary + the eval metrics),
written as CSV and Markdown, and metric-vs-hyperparameter plots; the answer (best run per headline
metric) and the confound check that ``evaluate.py sweep_id=`` writes into the sweep's parent run.

A record is ``{"run_id", "run_name", "params": {flat config key: str}, "metrics": {key: float}}``;
metric keys are those of the JSON summary (``rfid``, or ``standin/rfid`` for a stand-in network:
``<network>/<metric>``). The Markdown table is sorted by the primary metric (best first) and its
header says for every metric whether lower or higher is better; the CSV keeps the runs' order.
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


#: direction of every metric the protocol reports (by base name, the part after ``<network>/``)
LOWER_IS_BETTER = {"rfid", "fid", "lpips", "l1", "nll", "bpd", "kid_mean", "dead_codes"}
HIGHER_IS_BETTER = {"psnr", "ssim", "ms_ssim", "codebook_usage", "perplexity", "is_mean", "class_accuracy",
                    "caption_shape_accuracy", "caption_colour_accuracy", "caption_accuracy", "rec_class_agreement"}
#: the metrics a sweep's answer is given for, most important first (the first present is the primary one)
HEADLINE = ("rfid", "fid", "psnr", "lpips", "ssim", "codebook_usage", "perplexity", "nll", "is_mean", "kid_mean",
            "class_accuracy", "l1", "dead_codes")
#: networks whose numbers are plumbing checks only (random weights)
STANDIN_NETWORKS = {"standin"}


def base_name(metric: str) -> str:
    return metric.rsplit("/", 1)[-1]


def network_of(metric: str) -> str | None:
    """``standin`` for ``standin/rfid``; None for an Inception or network-free metric."""
    return metric.rsplit("/", 1)[0] if "/" in metric else None


def direction(metric: str) -> str | None:
    b = base_name(metric)
    return "lower" if b in LOWER_IS_BETTER else "higher" if b in HIGHER_IS_BETTER else None


def network_note(metrics) -> str:
    """A title suffix naming the non-Inception networks behind ``metrics`` ('' when there are none)."""
    nets = sorted({n for n in map(network_of, metrics) if n})
    if not nets:
        return ""
    kinds = [f"'{n}' (stand-in, random weights: plumbing only)" if n in STANDIN_NETWORKS else
             f"'{n}' (dataset-specific)" for n in nets]
    return f"{', '.join(kinds)} features: not comparable to published numbers"


def best_runs(records: list[dict]) -> dict[str, dict]:
    """``{metric: {"run_id", "run_name", "value", "direction"}}`` for every headline metric present."""
    out: dict[str, dict] = {}
    keys = list(dict.fromkeys(k for r in records for k in r.get("metrics", {})))
    for head in HEADLINE:
        for key in (k for k in keys if base_name(k) == head):
            vals = [(_num(r["metrics"].get(key)), r) for r in records if _num(r.get("metrics", {}).get(key)) is not None]
            if not vals:
                continue
            pick = min if direction(key) == "lower" else max
            value, r = pick(vals, key=lambda t: t[0])
            out[key] = {"run_id": r.get("run_id", ""), "run_name": r.get("run_name", ""), "value": value,
                        "direction": direction(key)}
    return out


def primary_metric(records: list[dict]) -> str | None:
    best = best_runs(records)
    return next(iter(best), None)


def sort_records(records: list[dict], metric: str | None = None) -> list[dict]:
    """Best first by ``metric`` (default: the primary metric); runs without it last."""
    metric = metric or primary_metric(records)
    if metric is None:
        return list(records)
    sign = 1 if direction(metric) == "lower" else -1

    def key(r):
        v = _num(r.get("metrics", {}).get(metric))
        return (v is None, sign * v if v is not None else 0.0)

    return sorted(records, key=key)


#: config keys a second stage derives from its first stage (stages/transformer.py: record_first_stage),
#: and split records derived from the data config: they differ whenever their source differs
DERIVED = {"first_stage.ckpt": ("first_stage.codebook.", "first_stage.arch.", "first_stage.checkpoint",
                                "transformer.vocab_size"),
           "first_stage.run_id": ("first_stage.codebook.", "first_stage.arch.", "first_stage.checkpoint",
                                  "transformer.vocab_size"),
           "data.": ("data.split.",)}


def confounds(records: list[dict], swept: set[str] | None, axes: list[str] | None = None) -> list[str]:
    """Param keys that differ between the runs although the sweep did not vary them.

    ``swept``: the config keys the sweep varies (the parent's ``vqt.sweep_varying`` record); without a
    record, ``axes`` (the swept overrides: a key, or a group whose keys all count as swept)."""
    allowed = set(swept or ())
    prefixes = [a.lstrip("+~") + "." for a in (axes or [])] if swept is None else []
    allowed |= {a.lstrip("+~") for a in (axes or [])} if swept is None else set()
    derived: list[str] = []
    for src, keys in DERIVED.items():
        if any(k == src or (src.endswith(".") and k.startswith(src)) for k in allowed) or \
                any(p.startswith(src) or src.startswith(p) for p in prefixes):
            derived += list(keys)
    out = []
    for k in varying_params(records):
        if k in allowed or any(k.startswith(p) for p in prefixes) or any(k == d or k.startswith(d) for d in derived):
            continue
        out.append(k)
    return out


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


def _head(h: str) -> str:
    d = direction(h)
    return f"{h} ({'↓ lower' if d == 'lower' else '↑ higher'} is better)" if d else h


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(_head(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(header: list[str], rows: list[list], path: Path, title: str = "", notes: list[str] = ()) -> Path:
    lines = ([f"# {title}", ""] if title else []) + [f"> {n}" for n in notes] + ([""] if notes else [])
    path.write_text("\n".join(lines) + markdown_table(header, rows) + "\n")
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
        note = network_note([label])
        title = f"{label} vs {x_label}" + (f"\n{'STAND-IN' if network_of(label) in STANDIN_NETWORKS else network_of(label)}"
                                            f": not comparable to published" if note else "")
        ax.set(xlabel=x_label, ylabel=label, title=title)
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
    metrics = [k for r in records for k in r.get("metrics", {})]
    primary = primary_metric(records)
    notes = [n for n in (network_note(metrics) and f"{network_note(metrics)}.",
                         primary and f"Sorted by {primary}, best first.") if n]
    _, sorted_rows = comparison_table(sort_records(records, primary))
    files = [write_csv(header, rows, out_dir / "comparison.csv"),
             write_markdown(header, sorted_rows, out_dir / "comparison.md",
                            title + (" (stand-in numbers)" if any(network_of(m) in STANDIN_NETWORKS for m in metrics)
                                     else ""), notes)]
    for spec in plots if plots is not None else DEFAULT_PLOTS:
        p = plot_metric_vs(records, list(spec["x"]), list(spec["y"]), out_dir / f"{spec['name']}.png")
        if p is not None:
            files.append(p)
    return files
