"""On-disk cache of the code indices of a dataset (``stage.code_cache=DIR``), so that epochs
after the first do not re-run the frozen encoders.

Entries are keyed by the item's ``index`` and checked against a fingerprint of its image
(a fixed random projection), so a cache is never wrong: an item that comes back different
(random crop or flip, another item under the same index) is re-encoded and replaced. The file
name is a hash of the frozen models' weights (first stage and condition VQ), the
conditioning and data configs and the split (:func:`cache_key`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

#: data keys that change what is loaded (batch size, workers and the like do not)
_IGNORED_DATA_KEYS = {"batch_size", "num_workers", "max_bad_fraction"}


def weights_hash(module: nn.Module) -> str:
    """SHA-256 of a module's parameters (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.named_parameters()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(models: list[nn.Module], data_cfg: DictConfig, cond_cfg: DictConfig | None, split: str) -> str:
    data = {k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k not in _IGNORED_DATA_KEYS}
    cond = OmegaConf.to_container(cond_cfg, resolve=True) if cond_cfg is not None else None
    h = hashlib.sha256()
    for m in models:
        h.update(weights_hash(m).encode())
    h.update(json.dumps({"data": data, "conditioning": cond, "split": split}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


_PROJECTIONS: dict[tuple, torch.Tensor] = {}


def fingerprint(images: torch.Tensor) -> torch.Tensor:
    """One float64 per image: a fixed random projection of its pixels (equal images, equal values)."""
    shape = tuple(images.shape[1:])
    if shape not in _PROJECTIONS:
        g = torch.Generator().manual_seed(1234)
        _PROJECTIONS[shape] = torch.rand(images[0].numel(), generator=g, dtype=torch.float64)
    w = _PROJECTIONS[shape].to(images.device)
    return (images.detach().flatten(1).double() @ w).cpu()


class CodeCache:
    """Token tensors per dataset index (``z``: image codes, optionally ``c``: condition codes)."""

    def __init__(self, path: str | Path, max_token: int = 2**31 - 1):
        self.path = Path(path)
        self.dtype = torch.int16 if max_token < 2**15 else torch.int32
        self.fp = torch.zeros(0, dtype=torch.float64)
        self.valid = torch.zeros(0, dtype=torch.bool)
        self.tokens: dict[str, torch.Tensor] = {}
        self.dirty = False
        if self.path.is_file():
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            self.fp, self.valid, self.tokens = state["fp"], state["valid"], state["tokens"]
            log.info("code cache %s: %d entries", self.path, int(self.valid.sum()))

    def __len__(self) -> int:
        return int(self.valid.sum())

    def lookup(self, index: torch.Tensor, fp: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The cached tokens of every item of a batch, or None unless all of them are cached and unchanged."""
        index = index.cpu().long()
        if index.numel() == 0 or int(index.max()) >= self.valid.numel() or int(index.min()) < 0:
            return None
        if not self.valid[index].all():
            return None
        if not torch.allclose(self.fp[index], fp.double(), rtol=1e-9, atol=1e-6):
            return None
        return {k: v[index].long() for k, v in self.tokens.items()}

    def store(self, index: torch.Tensor, fp: torch.Tensor, **tokens: torch.Tensor) -> None:
        index = index.cpu().long()
        need = int(index.max()) + 1
        if need > self.valid.numel():  # grow (amortised doubling)
            cap = max(need, 2 * self.valid.numel())
            self.fp = torch.cat((self.fp, self.fp.new_zeros(cap - self.fp.numel())))
            self.valid = torch.cat((self.valid, self.valid.new_zeros(cap - self.valid.numel())))
            for k, v in self.tokens.items():
                self.tokens[k] = torch.cat((v, v.new_zeros(cap - v.shape[0], *v.shape[1:])))
        for k, v in tokens.items():
            v = v.detach().cpu().flatten(1)
            if k not in self.tokens:
                self.tokens[k] = torch.zeros(self.valid.numel(), v.shape[1], dtype=self.dtype)
            self.tokens[k][index] = v.to(self.tokens[k].dtype)
        self.fp[index] = fp.double()
        self.valid[index] = True
        self.dirty = True

    def save(self) -> None:
        """Write the cache (atomically) if it changed."""
        if not self.dirty:
            return
        from vqtransformer.training.checkpoint import atomic_save

        atomic_save({"fp": self.fp, "valid": self.valid, "tokens": self.tokens}, self.path)
        self.dirty = False
