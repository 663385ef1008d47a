"""The fixed evaluation protocol (see ``docs/evaluation.md``).

Every number this package reports is computed the same way:

* images in [-1, 1] are clamped and quantised to uint8 (``round((x + 1) * 127.5)``), exactly as if
  they had been written to PNG;
* the feature network receives the uint8 images; Inception resizes them the way torch-fidelity does
  (uint8 -> float, TF1-compatible bilinear to 299x299, no antialias, ``(x - 128) / 128``);
* N samples (``eval.num_samples``) against the real images of ``eval.split`` with ``eval.seed``;
* FID / IS / KID come from torchmetrics, fed with features computed once per image.

Numbers from any feature network other than ``inception`` carry its name in their key
(``standin/fid``) and are not comparable to published results.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from vqtransformer.errors import UserError

PROTOCOL_VERSION = 1

#: metrics of a first stage (reconstruction of the real split)
RECONSTRUCTION_METRICS = ("rfid", "lpips", "psnr", "ssim", "ms_ssim", "l1", "codebook")
#: metrics of a generator (samples vs the real split); ``nll`` is the transformer's own
GENERATOR_METRICS = ("fid", "is", "kid", "nll")
#: metrics whose value depends on the feature network (keys carry its name unless it is ``inception``)
FEATURE_METRICS = ("rfid", "rec_class_agreement", "fid", "is_mean", "is_std", "kid_mean", "kid_std", "class_accuracy",
                   "class_freq_min_ratio", "class_freq_max_ratio", "caption_shape_accuracy",
                   "caption_colour_accuracy", "caption_accuracy")

#: eval.num_samples=null means this many generated samples (fewer on the synthetic ``shapes`` data)
DEFAULT_NUM_SAMPLES = 10_000
DEFAULT_NUM_SAMPLES_SHAPES = 1_000


class EvaluationError(UserError, RuntimeError):
    """A user-facing failure: the message says what is wrong and which key or argument fixes it."""


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 in [0, 255] (clamped, rounded to nearest)."""
    return x.detach().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (what PSNR / SSIM / L1 are computed on)."""
    return x.double().div(255.0)


def metrics_for_stage(stage, requested: list[str] | None) -> list[str]:
    """The metrics to compute for ``stage`` (a Stage or Stage class: its ``name`` and declared
    ``capabilities``): ``requested`` checked, or the defaults of what it can do (a first stage:
    reconstruction metrics; a generator: FID / IS / KID, plus NLL when it has a likelihood)."""
    name, caps = stage.name, stage.capabilities
    if "reconstruct" in caps:
        allowed, kind, other = RECONSTRUCTION_METRICS, "a first stage (reconstruction)", GENERATOR_METRICS
        default = list(RECONSTRUCTION_METRICS)
    elif "sample" in caps:
        allowed, kind, other = GENERATOR_METRICS, "a generator", RECONSTRUCTION_METRICS
        default = ["fid", "is", "kid"] + (["nll"] if "nll" in caps else [])
    else:
        raise EvaluationError(f"stage '{name}' has no evaluation protocol: it neither reconstructs nor samples")
    if requested is None:
        return default
    requested = [str(m) for m in requested]
    for m in requested:
        if m in other:
            raise EvaluationError(
                f"eval.metrics asks for '{m}', but stage '{name}' is {kind}; its metrics are "
                f"{list(allowed)}. Drop '{m}' from eval.metrics (or leave eval.metrics=null for the defaults).")
        if m not in allowed:
            raise EvaluationError(f"eval.metrics: unknown metric '{m}' for stage '{name}'; choose from "
                                  f"{list(allowed)}")
    if "nll" in requested and "nll" not in caps:
        raise EvaluationError(f"eval.metrics: 'nll' needs a likelihood, which stage '{name}' does not have; drop it "
                              "(e.g. eval.metrics=[fid,is,kid])")
    return requested


def metric_key(name: str, feature_network: str) -> str:
    """``fid`` for Inception numbers, ``<network>/fid`` for any other feature network."""
    if name in FEATURE_METRICS and feature_network != "inception":
        return f"{feature_network}/{name}"
    return name


def check_covariance_rank(n: int, dim: int, what: str, policy: str, fix: str) -> str | None:
    """FID needs ``n >= dim + 1`` samples for a full-rank covariance. Raise (``policy='error'``) or
    return a warning line (``'warn'``); ``None`` when ``n`` is enough."""
    if n >= dim + 1:
        return None
    msg = (f"{what}: {n} images give a rank-deficient {dim}x{dim} feature covariance; a stable FID needs at "
           f"least {dim + 1}. {fix}")
    if policy == "warn":
        return msg
    raise EvaluationError(msg + " (or set eval.small_n=warn to report it anyway, flagged)")


@dataclass(frozen=True)
class Protocol:
    """Everything a score depends on besides the model; its :meth:`id` is logged with every evaluation."""

    split: str
    num_samples: int
    num_real: int | None
    seed: int
    feature_network: str  # identity incl. weights hash, e.g. "inception-6726825d"
    is_splits: int
    kid_subsets: int
    kid_subset_size: int
    version: int = PROTOCOL_VERSION

    def as_dict(self) -> dict:
        return asdict(self)

    def id(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:12]
