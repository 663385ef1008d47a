"""Image transforms shared by every file-based dataset: taming's preprocessing.

Shorter side resized to ``resolution`` (up or down, bicubic), then a random crop
(train) or centre crop (validation), optional horizontal flip (train), RGB, [-1, 1].
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA (composited on white) and CMYK images become RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


class ImageTransform:
    def __init__(self, resolution: int, train: bool, random_crop: bool = True, flip: bool = True):
        self.resolution = resolution
        self.random_crop = train and random_crop
        self.flip = train and flip

    def crop_box(self, w: int, h: int, rng: random.Random) -> tuple[int, int]:
        r = self.resolution
        if self.random_crop:
            return rng.randint(0, w - r), rng.randint(0, h - r)
        return (w - r) // 2, (h - r) // 2

    def resize(self, img: Image.Image, resample=Image.BICUBIC) -> Image.Image:
        w, h = img.size
        scale = self.resolution / min(w, h)
        if scale != 1:
            img = img.resize((max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))), resample)
        return img

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random
        img = self.resize(to_rgb(img))
        x0, y0 = self.crop_box(*img.size, rng)
        img = img.crop((x0, y0, x0 + self.resolution, y0 + self.resolution))
        arr = np.asarray(img, dtype=np.uint8)
        if self.flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
