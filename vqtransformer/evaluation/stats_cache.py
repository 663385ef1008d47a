"""Real-image features, computed once per (dataset, split, resolution, feature network) and cached.

Files live in ``${VQT_CACHE:-~/.cache/vqtransformer}/fid_stats/`` as
``<dataset>-<split>-<res>px-<network identity>-<key hash>.npz`` holding ``features`` [N, D]
(float32, what KID needs), ``mu`` and ``sigma`` (float64, what FID needs, in the pytorch-fid
layout), next to a ``.json`` with the full key. Writes are atomic, so concurrent sweep jobs
may race harmlessly.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

#: data-config keys that change how images are loaded, not which images: left out of the key
LOADER_KEYS = {"batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor", "shuffle",
               "max_bad_fraction"}


def cache_dir() -> Path:
    return Path(os.environ.get("VQT_CACHE", "~/.cache/vqtransformer")).expanduser() / "fid_stats"


def stats_key(data_cfg: dict, split: str, resolution: int, num_images: int, network_identity: str) -> dict:
    """The full identity of a set of real statistics."""
    dataset = {k: v for k, v in sorted(data_cfg.items()) if k not in LOADER_KEYS}
    return {"dataset": dataset, "split": split, "resolution": int(resolution), "num_images": int(num_images),
            "feature_network": network_identity, "version": 1}


def stats_path(key: dict, root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = str(key["dataset"].get("name", "data")).replace("/", "_")
    return (root or cache_dir()) / f"{name}-{key['split']}-{key['resolution']}px-{key['feature_network']}-{digest}.npz"


def load_or_compute(key: dict, compute: Callable[[], torch.Tensor], root: Path | None = None) -> tuple[torch.Tensor, bool]:
    """Cached real features for ``key`` (computing and storing them on a miss); returns (features, hit)."""
    path = stats_path(key, root)
    if path.is_file():
        with np.load(path) as f:
            return torch.from_numpy(f["features"]), True
    feats = compute().float()
    x = feats.double().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, features=feats.numpy(), mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(key, indent=2, sort_keys=True, default=str) + "\n")
    return feats, False
