"""Benchmarks (`make bench`): speed of each stage's hot paths. Numbers, not assertions.

``python -m vqtransformer.bench [--quick] [--only vqgan,transformer,...] [--out bench/results/bench.json]``
prints one table and writes every row as JSON. Each module exposes ``run(quick) -> list[dict]``;
a row has at least ``bench``, ``case`` and a value with its unit.
"""

import json
import time

import torch


def timed(fn, warmup: int = 2, iters: int = 5, min_time: float = 0.0) -> float:
    """Median seconds per call of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - start) < min_time:
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def machine() -> dict:
    import os
    import platform

    info = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(rows: list[dict], path) -> None:
    from pathlib import Path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
