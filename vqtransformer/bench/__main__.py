"""`make bench`: run every benchmark module, print one table, write JSON."""

from __future__ import annotations

import argparse
import importlib
import sys

from vqtransformer.bench import machine, write_json

MODULES = ["vqgan", "transformer", "vqdiffusion"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer cases and iterations")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(MODULES))
    ap.add_argument("--out", default="bench/results/bench.json")
    args = ap.parse_args(argv)
    names = [n for n in (args.only.split(",") if args.only else MODULES) if n]
    rows: list[dict] = []
    print(f"machine: {machine()}")
    for name in names:
        try:
            module = importlib.import_module(f"vqtransformer.bench.{name}")
        except ImportError as e:
            print(f"[skip] {name}: {e}", file=sys.stderr)
            continue
        print(f"== {name}", flush=True)
        for row in module.run(args.quick):
            rows.append(row)
            print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    write_json(rows, args.out)
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
