"""Pretrained weights files (LPIPS backbones, Inception): the one resolver and the one offline error.

Weights never come from the network silently: they are read from an explicit file (a config key such as
``first_stage.loss.lpips_weights`` or ``eval.feature_weights``) or from the torch hub cache
(``$TORCH_HOME/hub/checkpoints``), downloaded there only when allowed (``download=True`` and not
``VQT_OFFLINE=1``), and their sha256 prefix (the one in the released file name) is checked. If they cannot
be had, :class:`WeightsUnavailableError` names the file, the cache directory, the key to set and the
caller's way out (``hint``). Training (the LPIPS loss) and evaluation (LPIPS, Inception) both use it.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import torch

from vqtransformer.errors import UserError


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights are neither given, cached nor downloadable (or are the wrong file); the message
    says which file, where it was looked for and which key to set."""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def offline() -> bool:
    """``VQT_OFFLINE=1``: never download."""
    return os.environ.get("VQT_OFFLINE", "0") == "1"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def missing_message(filename: str, what: str, key: str, why: str, hint: str = "") -> str:
    return (f"{what} '{filename}' are not available ({why}). Put the file in {hub_checkpoint_dir()} "
            f"(the torch hub cache, $TORCH_HOME/hub/checkpoints; TORCH_HOME="
            f"{os.environ.get('TORCH_HOME', '~/.cache/torch')}) or set {key}=/path/to/{filename}." +
            (f" {hint}" if hint else ""))


def resolve_weights(filename: str, url: str, sha_prefix: str, path: str | None, key: str,
                    download: bool = True, what: str = "weights", hint: str = "") -> Path:
    """Local path of a verified weights file: ``path`` (the value of config key ``key``) or the hub cache,
    downloaded into it when ``download`` (and not ``VQT_OFFLINE=1``). ``hint``: what else the user can do
    (e.g. an offline switch), appended to the error."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsUnavailableError(f"{key}={path}: no such file (expected the {what}, '{filename}')")
    else:
        p = hub_checkpoint_dir() / filename
        if not p.is_file():
            if not download or offline():
                why = "eval.download=false" if not download and key.startswith("eval.") else (
                    "downloads are off" + (" (VQT_OFFLINE=1)" if offline() else ""))
                raise WeightsUnavailableError(missing_message(filename, what, key, why, hint))
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                old = socket.getdefaulttimeout()
                socket.setdefaulttimeout(30)
                try:
                    torch.hub.download_url_to_file(url, str(p), hash_prefix=sha_prefix, progress=False)
                finally:
                    socket.setdefaulttimeout(old)
            except Exception as e:  # no network, proxy, hash mismatch: all end the same way
                raise WeightsUnavailableError(missing_message(filename, what, key, f"download from {url} failed: "
                                                              f"{' '.join(str(e).split())[:200]}", hint)) from None
    digest = sha256_file(p)
    if not digest.startswith(sha_prefix):
        raise WeightsUnavailableError(
            f"{what} file {p} has sha256 {digest[:16]}..., expected prefix {sha_prefix} ('{filename}'). "
            f"Set {key}=PATH to the right file, or delete {p} to fetch it again.")
    return p
