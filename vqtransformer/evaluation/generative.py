"""Generator metrics: FID (Heusel et al. 2017), Inception Score (Salimans et al. 2016), KID
(Binkowski et al. 2018) of N samples against the real images of a split, plus the transformer's NLL.

The torchmetrics metrics do the statistics. Each image goes through the feature network once
(:func:`~vqtransformer.evaluation.features.extract_features`); the metrics receive those
features through a pass-through ``feature`` module, so FID, KID and IS share one forward pass
and the real side can come from the on-disk cache.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from vqtransformer.evaluation.protocol import EvaluationError, to_uint8


class Precomputed(nn.Module):
    """torchmetrics ``feature`` module for features computed upstream: passes them through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (float64 throughout)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=Precomputed(real.shape[1])).to(real.device)  # float64 states
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    return float(m.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
    """Kernel Inception Distance (cubic polynomial kernel MMD^2, unbiased): mean and std over subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        m = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=subset_size)
    m = m.to(real.device)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the subsets are drawn with torch.randperm on the CPU generator
        mean, std = m.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int, seed: int) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` disjoint splits."""
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        m = InceptionScore(feature=Precomputed(logits.shape[1]), splits=splits)
    m.update(logits.double())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


def class_balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels 0..C-1 repeated: every class gets floor(n/C) or ceil(n/C) samples."""
    return torch.arange(n) % num_classes


def batch_seed(seed: int, index: int) -> int:
    """The seed of sample batch ``index`` (distinct per batch and across ``eval.seed`` values)."""
    return seed * 1_000_003 + index


@torch.no_grad()
def generate_uint8(stage, n: int, batch_size: int, seed: int, num_classes: int | None = None,
                   prompts: list[str] | None = None, options: dict | None = None) -> Iterator[torch.Tensor]:
    """``n`` samples of ``stage.sample(**options)`` as uint8 batches on the CPU (class-balanced when
    ``num_classes``; sample i of caption ``prompts[i]`` when given).

    Batch i is drawn with ``seed=batch_seed(seed, i)`` (stages that seed their own generator) after
    ``torch.manual_seed(seed)`` (stages that use the global one)."""
    torch.manual_seed(seed)
    labels = class_balanced_labels(n, num_classes) if num_classes else None
    for i, start in enumerate(range(0, n, batch_size)):
        b = min(batch_size, n - start)
        cond = labels[start:start + b] if labels is not None else None
        if prompts is not None:
            cond = list(prompts[start:start + b])
        x = stage.sample(b, condition=cond, seed=batch_seed(seed, i), **(options or {}))
        if x.shape[0] != b or x.dim() != 4 or x.shape[1] != 3:
            raise EvaluationError(f"stage '{stage.name}'.sample({b}) returned shape {tuple(x.shape)}; "
                                  f"expected [{b}, 3, H, W] in [-1, 1]")
        yield to_uint8(x).cpu()


@torch.no_grad()
def transformer_nll(stage, loader, device: torch.device, num_pixels: int) -> dict[str, float]:
    """Validation NLL of the transformer over the split, in nats per token, and bits per image
    dimension (the code NLL of an image divided by 3*H*W*ln 2).

    Uses ``stage.nll(batch) -> Tensor [B, T]`` (per-token NLL in nats, teacher-forced).

    Class-conditional stages (``condition_type == "class"``) also get ``class_information``: the
    NLL of each image under a wrong class (its label shifted by a random 1..C-1, seeded) minus under
    its own, summed over its tokens and averaged over the images, in nats per image: how much worse
    a wrong class explains the image, 0 when the model ignores its class. Not bounded by log C (the
    mutual information): a model sure of the class finds the image very unlikely under another.
    One more teacher-forced pass per batch. (The label-map GPT of the tests: 38 nats; the tiny RGB
    GPT on shapes: 0.02-0.03.)"""
    total, tokens, images, info = 0.0, 0, 0, 0.0
    num_classes = int(stage.num_classes) if stage.condition_type == "class" else 0
    gen = torch.Generator().manual_seed(0)
    for batch in tqdm(loader, desc="val nll", leave=False):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        nll = stage.nll(batch).double()
        total += float(nll.sum())
        tokens += nll.numel()
        images += nll.shape[0]
        if num_classes > 1:
            y = torch.as_tensor(batch["class_label"]).long()
            shift = torch.randint(1, num_classes, y.shape, generator=gen).to(y.device)
            wrong = stage.nll({**batch, "class_label": (y + shift) % num_classes}).double()
            info += float((wrong - nll).sum())
    out = {"nll": total / tokens, "bpd": total / (images * 3 * num_pixels * math.log(2))}
    if num_classes > 1:
        out["class_information"] = info / images
    return out


def generator_metrics(real: torch.Tensor, fake: torch.Tensor, fake_logits: torch.Tensor | None, metrics: list[str],
                      is_splits: int, kid_subsets: int, kid_subset_size: int, seed: int,
                      device: torch.device | None = None) -> tuple[dict, list[str]]:
    """FID / IS / KID from features (computed on ``device``: KID's kernels are the costly part); returns
    (values, notes)."""
    out, notes = {}, []
    if device is not None:
        real, fake = real.to(device), fake.to(device)
    if "fid" in metrics:
        out["fid"] = fid(real, fake)
    if "is" in metrics:
        if fake_logits is None:
            raise EvaluationError("eval.metrics asks for 'is' but the feature network has no class logits; "
                                  "drop 'is' or use a network that returns (features, logits)")
        out["is_mean"], out["is_std"] = inception_score(fake_logits, is_splits, seed)
    if "kid" in metrics:
        size = min(kid_subset_size, real.shape[0], fake.shape[0])
        if size < kid_subset_size:
            notes.append(f"KID subset size reduced from {kid_subset_size} to {size} (the smaller set)")
        out["kid_mean"], out["kid_std"] = kid(real, fake, kid_subsets, size, seed)
    return out, notes
