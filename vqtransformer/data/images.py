"""File-based image datasets: a folder (optional class subfolders), taming-style file lists,
CIFAR-10's class-per-folder layout and FacesHQ (CelebA-HQ + FFHQ).

Unreadable or corrupt files are skipped and counted; when more than
``data.max_bad_fraction`` of the files seen so far are bad the dataset raises.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from vqtransformer.data.transforms import ImageTransform
from vqtransformer.errors import UserError

log = logging.getLogger(__name__)
#: Pillow's default decompression-bomb limit; ``data.max_image_pixels`` changes it (larger files are bad files)
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def _image_extensions() -> set[str]:
    """Every file extension of a format Pillow can open (PNG, JPEG, PNM/PGM/PPM, TIFF, WebP, ...)."""
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


IMAGE_EXTENSIONS = _image_extensions() | {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def safe_name(path) -> str:
    """A path as text that every log handler can write (file names that are not valid UTF-8 included)."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


class DataError(UserError, ValueError):
    """Bad dataset configuration or content; the message names the key or file to fix."""

    @classmethod
    def without_worker_traceback(cls, e: BaseException) -> DataError:
        """The one-line message of a DataError that a DataLoader worker raised (the main process gets the
        worker's traceback as the message)."""
        text = str(e)
        if "Traceback" in text:
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else text
            text = last.split("DataError: ", 1)[1] if "DataError: " in last else last
        return cls(text.strip())


class BadImage(OSError):
    """A file that is not a usable image (too large, an unsupported mode)."""


def list_images(root: Path, key: str = "data.root") -> list[Path]:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{key}: directory '{safe_name(root)}' does not exist; set {key}=/path/to/images")
    if not root.is_dir():
        raise DataError(f"{key}: '{safe_name(root)}' is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"{key}: no images (any format Pillow opens: .png, .jpg, .ppm, .tif, .webp, ...) under "
                        f"'{safe_name(root)}'")
    return paths


def read_file_list(list_file: Path, base: Path | None, key: str) -> list[Path]:
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise DataError(f"{key}: file list '{safe_name(list_file)}' does not exist")
    lines = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise DataError(f"{key}: file list '{safe_name(list_file)}' is empty")
    base = Path(base).expanduser() if base else list_file.parent
    return [Path(ln) if Path(ln).is_absolute() else base / ln for ln in lines]


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer / float images as 8 bits, scaled (65535 -> 255, 32768 -> 128), not clipped."""
    import numpy as np

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else float(arr.max())
        return Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else (65535.0 if arr.max() <= 65535 else float(arr.max()))
        return Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    return img


class ImagePaths(Dataset):
    """Images from a list of paths, optionally with integer labels.

    Bad files (unreadable, corrupt, larger than ``max_image_pixels``) are skipped and counted in a
    bitmap in shared memory, so the count is global over DataLoader workers.
    """

    def __init__(self, paths: list[Path], resolution: int, train: bool, labels: list[int] | None = None,
                 classes: list[str] | None = None, random_crop: bool = True, flip: bool = True,
                 max_bad_fraction: float = 0.01, seed: int = 0, max_image_pixels: int | None = None):
        self._bad_map: torch.Tensor | None = None
        self.paths = list(paths)  # (re)creates the shared bad-file bitmap
        self.labels = labels
        self.classes = classes or []
        self.num_classes = len(self.classes)
        self.transform = ImageTransform(resolution, train, random_crop, flip)
        self.max_bad_fraction = max_bad_fraction
        self.max_image_pixels = int(max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS)
        self.train = train
        self.seed = seed
        self.seen = 0

    @property
    def paths(self) -> list[Path]:
        return self._paths

    @paths.setter
    def paths(self, paths: list[Path]) -> None:
        # created here, in the main process, so that forked DataLoader workers share it
        self._paths = list(paths)
        self._bad_map = torch.zeros(len(self._paths), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def bad_map(self) -> torch.Tensor:
        """One flag per file, in shared memory (created before the workers fork / are spawned)."""
        return self._bad_map

    @property
    def bad(self) -> set[int]:
        return set(torch.nonzero(self.bad_map).flatten().tolist())

    def open_image(self, path: Path) -> Image.Image:
        """The image at ``path``: EXIF orientation applied, 16-bit values scaled, pixel count limited."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = self.max_image_pixels
            try:
                img = Image.open(path)
            except Image.DecompressionBombError as e:
                raise BadImage(f"larger than data.max_image_pixels={self.max_image_pixels} ({e})") from None
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        with img:
            w, h = img.size
            if w * h > self.max_image_pixels:
                raise BadImage(f"{w}x{h} pixels is more than data.max_image_pixels={self.max_image_pixels}")
            img.load()
            out = ImageOps.exif_transpose(img) or img
            out = to_8bit(out)
            if out is img:
                out = img.copy()
        return out

    def _load(self, index: int) -> torch.Tensor:
        rng = None if self.train else random.Random(self.seed * 1_000_003 + index)
        return self.transform(self.open_image(self.paths[index]), rng)

    def _limit(self, n: int) -> float:
        return max(1, self.max_bad_fraction * n)

    def _mark_bad(self, i: int, e: BaseException) -> None:
        bad_map = self.bad_map
        bad_map[i] = 1
        count = int(bad_map.sum())
        log.warning("skipping unreadable image %s (%s: %s); %d bad so far", safe_name(self.paths[i]),
                    type(e).__name__, " ".join(str(e).split())[:200], count)
        if count > self._limit(len(self.paths)):
            raise DataError(f"{count} of {len(self.paths)} images are unreadable (more than "
                            f"data.max_bad_fraction={self.max_bad_fraction}); last: {safe_name(self.paths[i])}")

    def probe(self, n: int = 32) -> int:
        """Read ``n`` evenly spaced files before training; more bad ones than ``data.max_bad_fraction``
        allows among them (at least 2) is a DataError now, before any run exists. Returns the bad count."""
        if not self.paths:
            raise DataError("no images in the dataset")
        idx = sorted({round(k * (len(self.paths) - 1) / max(1, n - 1)) for k in range(min(n, len(self.paths)))})
        bad = []
        for i in idx:
            try:
                self.open_image(self.paths[i])
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                self.bad_map[i] = 1
                bad.append(i)
                log.warning("skipping unreadable image %s (%s: %s)", safe_name(self.paths[i]), type(e).__name__,
                            " ".join(str(e).split())[:200])
        if len(bad) > self._limit(len(idx)):
            raise DataError(f"{len(bad)} of {len(idx)} images checked before training are unreadable (more than "
                            f"data.max_bad_fraction={self.max_bad_fraction}); e.g. {safe_name(self.paths[bad[-1]])}")
        return len(bad)

    def __getitem__(self, index: int) -> dict:
        bad_map = self.bad_map
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            self.seen += 1
            if bad_map[i]:
                continue
            try:
                image = self._load(i)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                self._mark_bad(i, e)
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
