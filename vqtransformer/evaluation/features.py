"""Feature networks (Inception for FID / IS / KID, or a named stand-in) and LPIPS, with their weights.

Weights never come from the network silently: :func:`vqtransformer.weights.resolve_weights` (the one
resolver, shared with the training loss) reads them from ``eval.feature_weights`` / ``eval.lpips_weights``
or from the torch hub cache (``$TORCH_HOME/hub/checkpoints``), downloads them there only when
``eval.download=true`` and the network is reachable, and checks their sha256 prefix (the one in the file
name). If they cannot be had, :class:`~vqtransformer.weights.WeightsUnavailableError` names the file, the
cache directory and the key to set. LPIPS is the training loss's (:func:`vqtransformer.losses.perceptual.build_lpips`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from vqtransformer.evaluation.protocol import EvaluationError
from vqtransformer.weights import WeightsUnavailableError, hub_checkpoint_dir, resolve_weights, sha256_file

__all__ = ["build_feature_network", "build_lpips", "extract_features", "resolve_weights", "hub_checkpoint_dir",
           "WeightsUnavailableError", "FeatureNetwork", "StandinFeatures", "INCEPTION_FILE"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SHA256_PREFIX = "6726825d"

STANDIN_VERSION = 1

#: evaluate.py's way out when weights are missing (appended to the resolver's error)
OFFLINE_HINT = ("No score is reported with a different network unless you ask for it: offline, eval.standin=true "
                "scores with labelled stand-in networks (metrics eval/standin/..., plumbing only, not comparable to "
                "published numbers; docs/evaluation.md).")


class FeatureNetwork(nn.Module):
    """uint8 images [B, 3, H, W] -> (features [B, D], logits [B, K] or None), float32.

    ``name`` labels the numbers (``inception`` or e.g. ``standin``); ``identity`` also pins the
    weights and keys the real-statistics cache.
    """

    name: str
    identity: str
    num_features: int
    num_logits: int  # 0: no class logits, so no Inception Score

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class InceptionFeatures(FeatureNetwork):
    """torch-fidelity's ``FeatureExtractorInceptionV3``: pool3 (2048) for FID/KID, unbiased logits for IS.

    It does the protocol's resize itself: uint8 -> float, TF1-compatible bilinear to 299x299
    (``interpolate_bilinear_2d_like_tensorflow1x``, no antialias), then ``(x - 128) / 128``.
    """

    name = "inception"
    num_features = 2048
    num_logits = 1008

    def __init__(self, weights: Path):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights))
        self.identity = f"inception-{INCEPTION_SHA256_PREFIX}"

    def forward(self, x):
        feats, logits = self.net(x)
        return feats, logits


class StandinFeatures(FeatureNetwork):
    """A small CNN with fixed random weights (seeded): deterministic, offline, meaningless in absolute
    terms. For plumbing and tests only; its numbers are labelled ``standin``."""

    name = "standin"
    size = 64

    def __init__(self, num_features: int = 64, num_logits: int = 10, seed: int = 0):
        super().__init__()
        self.num_features, self.num_logits = num_features, num_logits
        self.identity = f"standin-v{STANDIN_VERSION}-d{num_features}-s{seed}"
        self.convs = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, num_features, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(num_features, num_logits)
        g = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                gain = 10.0 if m is self.fc else 1.0  # spread the logits so that IS is not stuck at 1
                m.weight.data = torch.randn(m.weight.shape, generator=g) * gain * (2.0 / fan_in) ** 0.5
                m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(self.size, self.size), align_corners=False)
        feats = 3 * self.convs((x - 128) / 128).mean(dim=(2, 3))
        return feats, self.fc(feats)


class TorchScriptFeatures(FeatureNetwork):
    """A TorchScript module (e.g. a dataset classifier) taking uint8 [B, 3, H, W] and returning
    features [B, D] or a tuple (features [B, D], logits [B, K])."""

    def __init__(self, path: Path):
        super().__init__()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit is deprecated but still loads
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        stem = re.sub(r"[^\w\-.]", "_", path.stem)  # the name goes into MLflow metric keys
        self.name = f"ts-{stem}"
        self.identity = f"ts-{stem}-{sha256_file(path)[:8]}"
        with torch.no_grad():
            feats, logits = self.forward(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
        self.num_features = feats.shape[1]
        self.num_logits = 0 if logits is None else logits.shape[1]

    def forward(self, x):
        out = self.net(x)
        if isinstance(out, (tuple, list)):
            return out[0].float(), out[1].float()
        return out.float(), None


def default_feature_network(data_cfg) -> str:
    """``eval.feature_network=auto``: the ``shapes`` judge on ``data=shapes`` images, else Inception."""
    shapes = data_cfg is not None and data_cfg.get("name") == "shapes" and data_cfg.get("target", "image") == "image"
    return "shapes_judge" if shapes else "inception"


def build_feature_network(name: str, weights: str | None = None, download: bool = True,
                          data_cfg=None) -> FeatureNetwork:
    """``eval.feature_network``: ``auto`` (default: :func:`default_feature_network`), ``inception``,
    ``shapes_judge`` (:mod:`vqtransformer.evaluation.judge`), ``standin``, or a TorchScript file path."""
    if name == "auto":
        name = default_feature_network(data_cfg)
    if name == "shapes_judge":
        from vqtransformer.evaluation.judge import load_or_train_judge

        if data_cfg is None:
            raise EvaluationError("eval.feature_network=shapes_judge needs the run's data config (data=shapes)")
        return load_or_train_judge(data_cfg)
    if name == "inception":
        path = resolve_weights(INCEPTION_FILE, INCEPTION_URL, INCEPTION_SHA256_PREFIX, weights,
                               "eval.feature_weights", download, "Inception weights", OFFLINE_HINT)
        return InceptionFeatures(path)
    if name == "standin":
        return StandinFeatures()
    p = Path(name).expanduser()
    if p.is_file():
        return TorchScriptFeatures(p)
    raise EvaluationError(f"eval.feature_network={name}: choose 'auto', 'inception', 'shapes_judge', 'standin' or a "
                          "TorchScript file path")


@torch.no_grad()
def extract_features(net: FeatureNetwork, batches: Iterable[torch.Tensor], device: torch.device,
                     total: int | None = None, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``net`` over uint8 batches; returns (features [N, D], logits [N, K] or None) on the CPU."""
    net = net.to(device).eval()
    feats, logits = [], []
    with tqdm(total=total, desc=desc, unit="img", leave=False) as bar:
        for x in batches:
            f, lg = net(x.to(device, non_blocking=True))
            feats.append(f.float().cpu())
            if lg is not None:
                logits.append(lg.float().cpu())
            bar.update(x.shape[0])
    if not feats:
        raise EvaluationError(f"{desc}: no images")
    return torch.cat(feats), (torch.cat(logits) if logits else None)


# -- LPIPS ----------------------------------------------------------------
def build_lpips(net: str = "alex", weights: str | None = None, download: bool = True) -> nn.Module:
    """The training loss's LPIPS (:func:`vqtransformer.losses.perceptual.build_lpips`: the ``lpips``
    package's calibrated linear heads on a verified ImageNet backbone) as a metric: ``lpips(a, b)`` with
    images in [-1, 1] returns [B] distances. ``standin``: the AlexNet layout with a random backbone fixed
    by seed (offline plumbing; its numbers are labelled ``standin/lpips``)."""
    from vqtransformer.losses.perceptual import BACKBONE_FILES
    from vqtransformer.losses.perceptual import build_lpips as lpips_network

    if net == "standin":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return _LpipsDistance(lpips_network("alex", random_backbone=True))
    if net not in BACKBONE_FILES:
        raise EvaluationError(f"eval.lpips_net={net}: choose one of {sorted(BACKBONE_FILES)} or 'standin'")
    return _LpipsDistance(lpips_network(net, weights, key="eval.lpips_weights", download=download,
                                        hint=OFFLINE_HINT))


class _LpipsDistance(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.model(a, b).flatten()
