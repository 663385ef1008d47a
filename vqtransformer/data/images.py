"""File-based image datasets: a folder (optional class subfolders), taming-style file lists,
CIFAR-10's class-per-folder layout and FacesHQ (CelebA-HQ + FFHQ).

Unreadable or corrupt files are skipped and counted; when more than
``data.max_bad_fraction`` of the files seen so far are bad the dataset raises.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from vqtransformer.data.transforms import ImageTransform

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


class DataError(ValueError):
    """Bad dataset configuration or content; the message names the key or file to fix."""


def list_images(root: Path, key: str = "data.root") -> list[Path]:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{key}: directory '{root}' does not exist; set {key}=/path/to/images")
    if not root.is_dir():
        raise DataError(f"{key}: '{root}' is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"{key}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under '{root}'")
    return paths


def read_file_list(list_file: Path, base: Path | None, key: str) -> list[Path]:
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise DataError(f"{key}: file list '{list_file}' does not exist")
    lines = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise DataError(f"{key}: file list '{list_file}' is empty")
    base = Path(base).expanduser() if base else list_file.parent
    return [Path(ln) if Path(ln).is_absolute() else base / ln for ln in lines]


class ImagePaths(Dataset):
    """Images from a list of paths, optionally with integer labels."""

    def __init__(self, paths: list[Path], resolution: int, train: bool, labels: list[int] | None = None,
                 classes: list[str] | None = None, random_crop: bool = True, flip: bool = True,
                 max_bad_fraction: float = 0.01, seed: int = 0):
        self.paths = list(paths)
        self.labels = labels
        self.classes = classes or []
        self.num_classes = len(self.classes)
        self.transform = ImageTransform(resolution, train, random_crop, flip)
        self.max_bad_fraction = max_bad_fraction
        self.train = train
        self.seed = seed
        self.bad: set[int] = set()
        self.seen = 0

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> torch.Tensor:
        rng = None if self.train else random.Random(self.seed * 1_000_003 + index)
        with Image.open(self.paths[index]) as img:
            img.load()
            return self.transform(img, rng)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            self.seen += 1
            if i in self.bad:
                continue
            try:
                image = self._load(i)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                self.bad.add(i)
                log.warning("skipping unreadable image %s (%s); %d bad so far", self.paths[i], e, len(self.bad))
                if len(self.bad) > max(1, self.max_bad_fraction * len(self.paths)):
                    raise DataError(
                        f"{len(self.bad)} of {len(self.paths)} images are unreadable (more than "
                        f"data.max_bad_fraction={self.max_bad_fraction}); last: {self.paths[i]}") from e
                continue
            item = {"image": image, "index": torch.tensor(i)}
            if self.labels is not None:
                item["class_label"] = torch.tensor(self.labels[i])
            return item
        raise DataError("no readable image in the dataset")


def folder_dataset(root: Path, resolution: int, train: bool, key: str = "data.root", **kw) -> ImagePaths:
    """Any directory of images; when every image sits in a first-level subfolder, those are classes."""
    root = Path(root).expanduser()
    paths = list_images(root, key)
    parents = {p.parent for p in paths}
    labels = classes = None
    if all(p.parent != root for p in paths) and all(p.parent.parent == root for p in paths) and len(parents) > 1:
        classes = sorted(p.name for p in parents)
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[p.parent.name] for p in paths]
    return ImagePaths(paths, resolution, train, labels, classes, **kw)
