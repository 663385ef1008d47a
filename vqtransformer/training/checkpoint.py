"""Checkpoints: written atomically (temp file + fsync + rename) by rank 0, read with
``torch.load(..., weights_only=True)``, and re-buildable into a stage from the config
they carry (``load_stage_checkpoint``) — what ``evaluate.py``, ``sample.py`` and the
second stages use.

Layout of a ``.ckpt`` file (a plain dict of tensors, numbers, strings and lists)::

    format, stage, config (resolved YAML), model {module: state_dict}, optimizers [..],
    schedulers [..], step, data {epoch, position}, rng {..}, mlflow_run_id
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

FORMAT = "vqtransformer/1"
LAST = "last.ckpt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here; the message names the file and what differs."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint '{path}' cannot be read safely (weights_only=True): {e}") from e


def find_last(directory: str | Path) -> Path | None:
    """``last.ckpt`` in ``directory`` or its ``checkpoints/`` folder, if any."""
    d = Path(directory).expanduser()
    for p in (d / LAST, d / "checkpoints" / LAST):
        if p.is_file():
            return p
    return None


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor], what: str, strict: bool = True) -> None:
    """``load_state_dict`` whose errors name both shapes (another architecture or codebook size)."""
    own = module.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"checkpoint weights for {what} do not fit this model (another architecture or codebook size?)"]
        if mismatched:
            lines.append("shape mismatches: " + "; ".join(mismatched[:6]) + (" ..." if len(mismatched) > 6 else ""))
        if strict and missing:
            lines.append(f"missing in checkpoint: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if strict and unexpected:
            lines.append(f"unexpected in checkpoint: {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        raise CheckpointError("\n  ".join(lines))
    module.load_state_dict(state, strict=strict)


# -- RNG state, in weights_only-safe types ------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- rebuilding stages from checkpoints -----------------------------------------
def config_of(ckpt: dict[str, Any]):
    from omegaconf import OmegaConf

    if "config" not in ckpt:
        raise CheckpointError("checkpoint carries no config: not written by vqtransformer")
    return OmegaConf.create(ckpt["config"])


def load_stage_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None):
    """(stage, cfg) rebuilt from a vqtransformer checkpoint, weights loaded, on the CPU, eval mode."""
    from omegaconf import OmegaConf

    from vqtransformer.stages import build_stage

    ckpt = load(path)
    cfg = config_of(ckpt)
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    stage = build_stage(cfg, for_inference=True)
    stage.load_state_dict(ckpt["model"])
    stage.train(False)
    return stage, cfg


def resolve_run_checkpoint(run_id: str, tracking_uri: str | None = None) -> Path:
    """Local path of the checkpoint of MLflow run ``run_id`` (tag ``vqt.checkpoint`` or artifact)."""
    from vqtransformer.tracking import get_client

    client = get_client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"MLflow run '{run_id}' does not exist in {client.tracking_uri}") from e
    path = run.data.tags.get("vqt.checkpoint")
    if path and Path(path).is_file():
        return Path(path)
    try:
        local = client.download_artifacts(run_id, f"checkpoints/{LAST}")
        return Path(local)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"MLflow run '{run_id}' has no checkpoint (no 'vqt.checkpoint' tag pointing at an "
                              f"existing file, no 'checkpoints/{LAST}' artifact)") from e


def load_first_stage(first_stage_cfg, tracking_uri: str | None = None):
    """The frozen VQModel of ``first_stage.ckpt`` or ``first_stage.run_id`` (eval mode, no grad)."""
    ckpt_path = first_stage_cfg.get("ckpt")
    run_id = first_stage_cfg.get("run_id")
    if not ckpt_path and not run_id:
        raise CheckpointError("first_stage.ckpt or first_stage.run_id must be set to a trained VQGAN "
                              "(python train.py stage=transformer first_stage.ckpt=outputs/.../checkpoints/last.ckpt)")
    path = Path(ckpt_path) if ckpt_path else resolve_run_checkpoint(run_id, tracking_uri)
    stage, _ = load_stage_checkpoint(path)
    if stage.name != "vqgan":
        raise CheckpointError(f"first_stage checkpoint '{path}' is a '{stage.name}' checkpoint, not a vqgan one")
    model = stage.unwrap(stage.vqgan)
    model.eval().requires_grad_(False)
    model.checkpoint_path = str(path)
    model.target = stage.target  # what it encodes (its data.target): image | segmentation | depth
    return model
