"""Train / validation splits and what they contain.

:func:`holdout` is the one rule for every dataset without an explicit validation folder or list
(``folder`` without ``val_dir``, ``ffhq``, ``celebahq``, ``faceshq``): a file is held out by a hash
of ``data.seed`` and its path relative to the dataset root, so the split

* is random but deterministic (the same in every process, run and machine; no ``hash()``),
* is stratified by class: per class ``n_val = round(n_class * val_fraction)`` (half up), at least 1
  when the class has more than one image and at most ``n_class - 1``; the images with the smallest
  hashes are held out,
* is stable when files are added: a file added to one class moves at most one file of that same
  class between the splits, and none of any other class.

:func:`split_summary` gives split sizes and per-class counts (logged, and MLflow params of a
training run); :func:`balanced_indices` gives a fixed, class-balanced selection for image grids.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import ConcatDataset, Dataset, Subset

from vqtransformer.data.images import DataError

log = logging.getLogger(__name__)

#: datasets that render their labels (shapes) are counted only up to this many items
MAX_RENDERED_LABELS = 4096


def path_key(seed: int, path: Path | str, root: Path | str | None = None) -> int:
    """The split hash of one file: blake2b of the seed and the path relative to ``root`` (POSIX form)."""
    path = Path(path)
    if root is not None:
        try:
            path = path.relative_to(Path(root))
        except ValueError:  # outside the root (an absolute path in a list): the path as given
            pass
    digest = hashlib.blake2b(f"{int(seed)}\0{path.as_posix()}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def n_held_out(n: int, val_fraction: float) -> int:
    """round(n * val_fraction), half up; at least 1 and at most n - 1 when n > 1; 0 for n <= 1."""
    if n <= 1:
        return 0
    return min(n - 1, max(1, math.floor(n * float(val_fraction) + 0.5)))


def holdout(paths: Sequence[Path], root: Path | str | None, val_fraction: float, seed: int = 0,
            labels: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) into ``paths``, each in the order of ``paths``."""
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    groups: dict[int, list[int]] = {}
    for i in range(len(paths)):
        groups.setdefault(labels[i] if labels is not None else 0, []).append(i)
    val: set[int] = set()
    for members in groups.values():
        keyed = sorted(members, key=lambda i: (path_key(seed, paths[i], root), Path(paths[i]).as_posix()))
        val.update(keyed[:n_held_out(len(members), val_fraction)])
    return [i for i in range(len(paths)) if i not in val], sorted(val)


def dataset_labels(dataset: Dataset, max_rendered: int = MAX_RENDERED_LABELS) -> list[int] | None:
    """Per-item class labels, or None when the dataset has none (or would have to render too many)."""
    if isinstance(dataset, Subset):
        base = dataset_labels(dataset.dataset, max_rendered)
        return None if base is None else [base[i] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_labels(d, max_rendered) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [x for p in parts for x in p]
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return [int(x) for x in labels]
    if hasattr(dataset, "render") and getattr(dataset, "num_classes", 0) and len(dataset) <= max_rendered:
        return [int(dataset.render(i)[1]) for i in range(len(dataset))]  # shapes: label of item i
    return None


def class_names(dataset: Dataset) -> list[str]:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, ConcatDataset):
        return class_names(dataset.datasets[0]) if dataset.datasets else []
    return list(getattr(dataset, "classes", None) or [])


def per_class_counts(dataset: Dataset, labels: list[int] | None = None) -> dict[str, int] | None:
    """{class name (or id): number of items}, in class order, classes without items included."""
    labels = dataset_labels(dataset) if labels is None else labels
    if labels is None:
        return None
    names = class_names(dataset)
    n = max(len(names), max(labels, default=-1) + 1)
    counts = [0] * n
    for y in labels:
        counts[y] += 1
    return {(names[c] if c < len(names) else str(c)): counts[c] for c in range(n)}


def _compact(counts: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in counts.items())


def split_summary(train_ds: Dataset, val_ds: Dataset) -> dict[str, int | str]:
    """Split sizes and per-class counts, keyed as MLflow params (``data.split.*``).

    ``train_size``, ``val_size``, ``rule`` (how the split was made, where the dataset says) and, for
    labelled data, ``val_per_class`` / ``train_per_class`` as compact ``"class:n,..."`` strings
    (a split whose labels would have to be rendered in bulk, shapes' training set, has no count).
    """
    val, train = dataset_summary(val_ds), dataset_summary(train_ds)
    out: dict[str, int | str] = {"data.split.train_size": train["size"], "data.split.val_size": val["size"]}
    if "rule" in val:
        out["data.split.rule"] = val["rule"]
    for name, summary in (("val", val), ("train", train)):
        if "per_class" in summary:
            out[f"data.split.{name}_per_class"] = summary["per_class"]
    return out


def dataset_summary(ds: Dataset) -> dict[str, int | str]:
    """One side of a split: ``size``, ``rule`` (where the dataset says) and ``per_class`` (``"class:n,..."``)."""
    out: dict[str, int | str] = {"size": len(ds)}
    rule = getattr(ds, "split_rule", None)
    if rule:
        out["rule"] = rule
    counts = per_class_counts(ds)
    if counts is not None:
        out["per_class"] = _compact(counts)
    return out


def log_split_summary(summary: dict[str, int | str]) -> None:
    log.info("data split: %d train / %d validation items%s", summary["data.split.train_size"],
             summary["data.split.val_size"],
             f" ({summary['data.split.rule']})" if "data.split.rule" in summary else "")
    for name in ("val", "train"):
        if f"data.split.{name}_per_class" in summary:
            log.info("data split: %s per class: %s", name, summary[f"data.split.{name}_per_class"])


def balanced_indices(dataset: Dataset, per_class: int, max_classes: int | None = None) -> list[int]:
    """Fixed indices of ``dataset`` for an image grid: ``per_class`` items of each class, class by class
    (one grid row per class with ``nrow=per_class``).

    With more classes than ``max_classes``, evenly spaced classes are shown. Within a class the items
    are evenly spaced over its members (in index order); a class with fewer than ``per_class`` items
    repeats them so that rows stay aligned; classes without items are skipped. Without labels:
    ``per_class * (max_classes or 1)`` indices evenly spaced over the dataset (all of them if fewer).
    """
    if per_class < 1:
        raise ValueError(f"per_class={per_class} must be >= 1")
    labels = dataset_labels(dataset)
    if labels is None:
        n, want = len(dataset), per_class * (max_classes or 1)
        if n <= want:
            return list(range(n))
        return [(j * n) // want for j in range(want)]
    members: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        members.setdefault(y, []).append(i)
    classes = sorted(members)
    if max_classes is not None and len(classes) > max_classes:
        classes = [classes[(j * len(classes)) // max_classes] for j in range(max_classes)]
    out: list[int] = []
    for c in classes:
        m = members[c]
        if len(m) >= per_class:
            out += [m[(j * len(m)) // per_class] for j in range(per_class)]
        else:
            out += [m[j % len(m)] for j in range(per_class)]
    return out
