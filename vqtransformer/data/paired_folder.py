"""``paired_folder``: images with per-pixel maps (label or depth) from two parallel directories,
matched by file name (stem): ``<root>/<image_dir>/x.jpg`` <-> ``<root>/<map_dir>/x.png``.

Image and map are resized (shorter side to ``data.resolution``: bicubic / nearest for labels /
bilinear for depth), cropped with the same box (random for training, centred for validation)
and flipped together (training). Items: ``image`` [3, R, R] in [-1, 1]; ``segmentation`` [R, R]
(long ids 0..``data.num_classes``, 0 = background) or ``depth`` [1, R, R] in [-1, 1]; ``coord``
[1, R, R], the normalised raster position of each pixel in the resized full image (taming's
coord conditioning: a model trained on crops can then be sampled larger); ``index``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset

from vqtransformer.data.images import DataError, list_images
from vqtransformer.data.splits import holdout
from vqtransformer.data.transforms import ImageTransform, to_rgb

MAP_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".npy")


def _read_map(path: Path, kind: str) -> Image.Image:
    """A map as a single-channel PIL image: mode "I" (label ids) or "F" (depth in [0, 1])."""
    if path.suffix == ".npy":
        arr = np.load(path)
    else:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P" or kind == "segmentation":
                arr = np.asarray(img if img.mode in ("P", "L", "I", "I;16") else img.convert("L"))
            else:
                arr = np.asarray(img if img.mode in ("L", "I", "I;16", "F") else img.convert("L"))
    if arr.ndim == 3:
        arr = arr[..., 0]
    if kind == "segmentation":
        return Image.fromarray(arr.astype(np.int32))  # mode "I"
    if arr.dtype == np.uint8:
        depth = arr / 255.0
    elif arr.dtype in (np.uint16, np.int32) and path.suffix != ".npy":
        depth = arr / 65535.0
    else:  # float maps: per-image min-max
        lo, hi = float(arr.min()), float(arr.max())
        depth = (arr - lo) / max(hi - lo, 1e-8)
    return Image.fromarray(depth.astype(np.float32))  # mode "F"


class PairedFolder(Dataset):
    def __init__(self, pairs: list[tuple[Path, Path]], resolution: int, train: bool, map_type: str = "segmentation",
                 num_classes: int = 0, random_crop: bool = True, flip: bool = True, seed: int = 0):
        if map_type not in ("segmentation", "depth"):
            raise DataError(f"data.map_type='{map_type}' must be segmentation or depth")
        if map_type == "segmentation" and num_classes < 1:
            raise DataError("data.num_classes must be set (the largest label id) for data.map_type=segmentation")
        self.pairs, self.map_type, self.num_classes = pairs, map_type, num_classes
        self.transform = ImageTransform(resolution, train, random_crop, flip)
        self.train, self.seed, self.resolution = train, seed, resolution

    @classmethod
    def from_config(cls, cfg: DictConfig, train: bool) -> PairedFolder:
        root = Path(cfg.root).expanduser()
        image_dir, map_dir = root / cfg.get("image_dir", "images"), root / cfg.get("map_dir", "labels")
        images = list_images(image_dir, "data.image_dir")
        if not map_dir.is_dir():
            raise DataError(f"data.map_dir: '{map_dir}' is not a directory")
        maps = {p.stem: p for p in sorted(map_dir.rglob("*")) if p.suffix.lower() in MAP_EXTENSIONS}
        missing = [p.name for p in images if p.stem not in maps]
        if missing:
            raise DataError(f"{len(missing)} images in '{image_dir}' have no map of the same name in '{map_dir}' "
                            f"(data.map_dir), e.g. {missing[:3]}")
        pairs = [(p, maps[p.stem]) for p in images]
        train_idx, val_idx = holdout([p for p, _ in pairs], image_dir, cfg.get("val_fraction", 0.05), int(cfg.get("seed", 0)))
        pairs = [pairs[i] for i in (train_idx if train else val_idx)]
        if not pairs:
            raise DataError(f"data.val_fraction={cfg.get('val_fraction')} leaves no training pairs")
        return cls(pairs, cfg.resolution, train, cfg.get("map_type", "segmentation"), int(cfg.get("num_classes", 0)),
                   cfg.get("random_crop", True), cfg.get("flip", True), int(cfg.get("seed", 0)))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        img_path, map_path = self.pairs[index]
        rng = random.Random() if self.train else random.Random(self.seed * 1_000_003 + index)
        with Image.open(img_path) as img:
            img.load()
            image = to_rgb(img)
        m = _read_map(map_path, self.map_type)
        if m.size != image.size:
            raise DataError(f"map '{map_path}' is {m.size} px but its image '{img_path}' is {image.size} px")
        t, r = self.transform, self.resolution
        image = t.resize(image)
        m = t.resize(m, Image.NEAREST if self.map_type == "segmentation" else Image.BILINEAR)
        W, H = image.size
        x0, y0 = t.crop_box(W, H, rng)
        box = (x0, y0, x0 + r, y0 + r)
        img = np.asarray(image.crop(box), dtype=np.uint8)
        mp = np.asarray(m.crop(box))
        if t.flip and rng.random() < 0.5:
            img, mp = img[:, ::-1], mp[:, ::-1]
        yy, xx = np.mgrid[y0:y0 + r, x0:x0 + r]
        item = {"image": torch.from_numpy(img.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0),
                "coord": torch.from_numpy(((yy * W + xx) / (H * W)).astype(np.float32))[None],
                "index": torch.tensor(index)}
        if self.map_type == "segmentation":
            seg = torch.from_numpy(mp.astype(np.int64))
            if int(seg.max()) > self.num_classes or int(seg.min()) < 0:
                raise DataError(f"label map '{map_path}' has id {int(seg.max())} > data.num_classes={self.num_classes}")
            item["segmentation"] = seg
        else:
            item["depth"] = torch.from_numpy(mp.astype(np.float32).copy())[None].mul(2).sub(1)
        return item
