"""Checkpoint I/O, the ground floor: written atomically (temp file + fsync + rename) by rank 0, read with
``torch.load(..., weights_only=True)``, weights loaded with errors that name what does not fit. This module
imports nothing of the project above it (no stage, no MLflow); turning a checkpoint into a ready stage is
:mod:`vqtransformer.loading`'s job.

Layout of one of our ``.ckpt`` files (a plain dict of tensors, numbers, strings and lists)::

    format, stage, config (resolved YAML), model {module: state_dict, arch: {...}}, optimizers [..],
    schedulers [..], step, data {epoch, position}, rng {..}, mlflow_run_id, unsent_metrics [(key, value, ts, step)]

Files written by PyTorch Lightning 1.x (taming-transformers' releases) also carry ``callbacks`` keyed by
callback classes (``ModelCheckpoint``), ``optimizer_states`` and ``hyper_parameters`` holding OmegaConf
objects, which ``weights_only`` refuses. :func:`load` reads those known globals through inert stand-ins
(no code of those classes runs; they become plain strings and dicts) and still refuses anything else.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from vqtransformer.errors import UserError

log = logging.getLogger(__name__)
FORMAT = "vqtransformer/1"
LAST = "last.ckpt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used here; the message names the file and what differs."""


def _temp_prefix(path: Path) -> str:
    """``.last.ckpt.HOST.PID.``: temp files name their writer, so that a later start can tell its own
    stale ones (the writer is gone) from those of a process still writing."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname().split(".")[0]) or "host"
    return f".{path.name}.{host}.{os.getpid()}."


def _nbytes(obj: Any) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 64


def _no_space(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def atomic_save(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` to a temp file beside ``path``, fsync, rename over ``path``: ``path`` is always either
    the previous or the new complete checkpoint. A full disk raises ``CheckpointError`` naming the file and
    the size needed; the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, Exception) and _no_space(e):
            mb = _nbytes(obj) / 2**20
            raise CheckpointError(f"no space left on device writing {path} ({mb:.1f} MB needed); the previous "
                                  f"checkpoint there is unchanged. Free space or point the run elsewhere, then "
                                  f"resume with trainer.resume") from None
        raise
    return path


def remove_stale_temp_files(directory: str | Path, name: str = LAST) -> list[Path]:
    """Delete the temp files of ``name`` that killed writers left in ``directory`` (``.NAME.*.tmp``; not
    those of a live process on this host). Returns what was removed."""
    d = Path(directory)
    if not d.is_dir():
        return []
    host = _temp_prefix(d / name).split(".")[-3]
    removed = []
    for p in d.glob(f".{name}.*.tmp"):
        parts = p.name[len(name) + 2:].split(".")  # HOST.PID.RANDOM.tmp (or mkstemp's RANDOM.tmp of older runs)
        if len(parts) >= 4 and parts[0] == host and parts[1].isdigit() and int(parts[1]) != os.getpid():
            try:
                os.kill(int(parts[1]), 0)
                continue  # its writer still runs on this host
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        elif len(parts) >= 4 and parts[0] == host and parts[1] == str(os.getpid()):
            continue  # ours, being written
        try:
            size = p.stat().st_size
            p.unlink()
            removed.append(p)
            log.info("removed stale checkpoint temp file %s (%.1f MB) left by a killed process", p, size / 2**20)
        except OSError:
            pass
    return removed


# -- reading: weights_only, with inert stand-ins for Lightning's and OmegaConf's objects --------------
#: modules whose globals a Lightning 1.x checkpoint may name (callbacks as dict keys, hyper_parameters)
_FOREIGN_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf")
#: other globals such files name as plain values (OmegaConf metadata: ref types, key types, flags)
_FOREIGN_NAMES = {"typing.Any", "argparse.Namespace", "collections.defaultdict", "builtins.dict", "builtins.list",
                  "builtins.tuple", "builtins.set", "builtins.int", "builtins.float", "builtins.str",
                  "builtins.bool", "builtins.bytes", "builtins.object", "pathlib.PosixPath", "pathlib.WindowsPath"}
#: dict subclasses that are filled item by item (pickle's SETITEMS): read as plain dicts
_DICT_CLASSES = {"pytorch_lightning.utilities.parsing.AttributeDict", "lightning.fabric.utilities.data.AttributeDict",
                 "lightning_fabric.utilities.data.AttributeDict"}


class Foreign:
    """Inert stand-in for an object of a known non-tensor class in a foreign checkpoint: it records the
    arguments and state pickle gives it and runs nothing else; :func:`plain` turns it into plain data."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def _known_foreign(name: str) -> bool:
    return name in _FOREIGN_NAMES or name.split(".", 1)[0] in _FOREIGN_MODULES


def _stand_in(name: str):
    if name in _DICT_CLASSES:
        return dict  # NEWOBJ + SETITEMS build a plain dict
    if name == "collections.defaultdict":
        return _empty_dict
    return type(name.rsplit(".", 1)[-1], (Foreign,), {"qualname": name})


def _empty_dict(*args) -> dict:
    return {}


def plain(obj: Any) -> Any:
    """``obj`` with every :class:`Foreign` stand-in replaced by plain data: OmegaConf containers by their
    content (dicts, lists, values), a stand-in class by its qualified name, other objects by
    ``{"__class__": name, "state": ...}``."""
    if isinstance(obj, type) and issubclass(obj, Foreign):
        return obj.qualname
    if isinstance(obj, Foreign):
        name, state = obj.qualname, obj.state if isinstance(obj.state, dict) else {}
        if name.startswith("omegaconf.") and "_content" in state:
            return plain(state["_content"])
        if name.startswith("omegaconf.") and "_val" in state:
            return plain(state["_val"])
        if name == "argparse.Namespace":
            return plain(state)
        return {"__class__": name, "state": plain(obj.state)}
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj) if isinstance(obj, list) else tuple(plain(v) for v in obj)
    return obj


def _refused(path: Path, names: list[str]) -> CheckpointError:
    shown = f" ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})" if names else ""
    return CheckpointError(f"checkpoint '{path}' is refused: it contains code or objects that are not safe to load"
                           f"{shown} (only tensors, numbers, strings, lists and dicts are read, and Lightning's "
                           "callback and OmegaConf entries as plain data)")


_READ_ONCE: dict | None = None


@contextlib.contextmanager
def read_once():
    """Inside the block, :func:`load` reads each file once (a taming Net2Net file holds the first stage, the
    condition's VQ and the GPT: three loaders, one read). Callers must not modify what it returns."""
    global _READ_ONCE
    outer = _READ_ONCE is not None
    if not outer:
        _READ_ONCE = {}
    try:
        yield
    finally:
        if not outer:
            _READ_ONCE = None


def load(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` as plain data, read with ``torch.load(weights_only=True)``, on the CPU.

    A Lightning 1.x file (callbacks, optimizer_states, hyper_parameters with OmegaConf objects) is read
    with inert stand-ins for exactly those known globals; a file naming any other global (e.g. code that
    would run on unpickling) is refused with :class:`CheckpointError` naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if _READ_ONCE is None:
        return _load(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _READ_ONCE:
        _READ_ONCE[key] = _load(path)
    return _READ_ONCE[key]


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = " ".join(str(e).split())
        if "Weights only load failed" not in msg and "Unsupported global" not in msg:
            raise CheckpointError(f"checkpoint '{path}' cannot be read: {msg[:300]}") from None
    try:  # only lists the GLOBAL instructions; nothing is unpickled
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: nothing we can vet
        raise _refused(path, []) from None
    unknown = [n for n in names if not _known_foreign(n)]
    if unknown or not names:
        raise _refused(path, unknown)
    try:
        with torch.serialization.safe_globals([(_stand_in(n), n) for n in names]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a known name used in a way the stand-ins do not allow
        msg = " ".join(str(e).split())
        raise CheckpointError(f"checkpoint '{path}' is refused: {msg[:300]}") from None
    log.info("read %s with inert stand-ins for %s", path, ", ".join(sorted(names)))
    return plain(obj)


def find_last(directory: str | Path) -> Path | None:
    """``last.ckpt`` in ``directory`` or its ``checkpoints/`` folder, if any."""
    d = Path(directory).expanduser()
    for p in (d / LAST, d / "checkpoints" / LAST):
        if p.is_file():
            return p
    return None


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor], what: str, strict: bool = True,
                      dropped: dict[str, str] | None = None) -> None:
    """``load_state_dict`` whose errors name the shapes that differ (another architecture or codebook size),
    the weights the checkpoint lacks and the first weights this model does not have. ``strict=False``
    tolerates missing weights only, never unexpected ones. ``dropped``: what the caller's loader left out on
    purpose (``{"loss.perceptual_loss.*": "LPIPS, rebuilt from the lpips package"}``), named in the error."""
    own = module.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and torch.is_tensor(v) and torch.is_tensor(own[k])  # not a module's extra state
                  and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or unexpected or (strict and missing):
        lines = [f"checkpoint weights for {what} do not fit this model (another architecture or codebook size? "
                 "compare the architecture keys of the config the checkpoint was trained with)"]
        if mismatched:
            lines.append("shape mismatches: " + "; ".join(mismatched[:6]) + (" ..." if len(mismatched) > 6 else ""))
        if strict and missing:
            lines.append(f"missing in checkpoint ({len(missing)}): {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            lines.append(f"unexpected in checkpoint ({len(unexpected)}, weights this model does not have): "
                         f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if dropped:
            lines.append("dropped on purpose by the loader: " + "; ".join(f"{k} ({why})" for k, why in dropped.items()))
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
