"""``shapes``: the embedded default dataset — procedural, deterministic by seed, no download.

Each image shows 1-4 coloured geometric objects (circle, square, triangle, diamond,
cross, ring) of random size and position over a textured background (or, with
``background="plain"``, one flat colour: an easier variant for short runs), later objects
occluding earlier ones. Every item also carries

* ``class_label``: the shape class of the dominant object (most visible pixels),
* ``segmentation``: per-pixel class ids (0 = background, 1 + shape class),
* ``depth``: a depth-like map in [-1, 1] (background slopes away, each object a
  slanted plane, nearer objects drawn later),
* ``caption``: a sentence derived from the scene after drawing (``vqtransformer.data.captions``:
  "a large red circle above a small blue square on a striped background").

Item ``i`` of split ``s`` is a pure function of ``(seed, s, i)``, so two processes
(or ranks) see the same data without sharing memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset

from vqtransformer.data.captions import SceneObject, caption

SHAPE_CLASSES = ("circle", "square", "triangle", "diamond", "cross", "ring")
_SPLIT_OFFSET = {"train": 0, "validation": 1_000_003, "test": 2_000_003}


def _shape_mask(kind: int, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    """Boolean mask of one shape of radius ``r`` centred at (cx, cy), rotated by ``rot``."""
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(rot), np.sin(rot)
    u, v = c * dx + s * dy, -s * dx + c * dy
    name = SHAPE_CLASSES[kind]
    if name == "circle":
        return u * u + v * v <= r * r
    if name == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if name == "triangle":  # upright equilateral-ish triangle in the rotated frame
        return (v <= 0.6 * r) & (v >= -r + 1.6 * np.abs(u))
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if name == "cross":
        w = 0.33 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if name == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(name)


BACKGROUNDS = ("textured", "plain")
OBJECT_SCALE = (0.14, 0.34)  # default object radius range, as fractions of the resolution


def render_shapes(rng: np.random.Generator, resolution: int, max_objects: int = 4, background: str = "textured",
                  object_scale: tuple[float, float] = OBJECT_SCALE):
    """One sample: image uint8 [H,W,3], label int, segmentation uint8 [H,W], depth float32 [H,W]."""
    return render_scene(rng, resolution, max_objects, background, object_scale)[:4]


def render_scene(rng: np.random.Generator, resolution: int, max_objects: int = 4, background: str = "textured",
                 object_scale: tuple[float, float] = OBJECT_SCALE):
    """:func:`render_shapes` plus the scene's objects (:class:`SceneObject`, in drawing order); the
    random draws are the same, so are the images."""
    H = W = resolution
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    c0 = rng.uniform(0, 255, 3)
    if background == "plain":
        img = np.broadcast_to(c0, (H, W, 3)).astype(np.float64)
    else:  # textured: a colour gradient plus oriented stripes and noise
        c1 = rng.uniform(0, 255, 3)
        t = (np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy) / (H + W)
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
        freq, phase = rng.uniform(0.15, 0.6), rng.uniform(0, 2 * np.pi)
        img += 18 * np.sin(freq * (xx + rng.uniform(-1, 1) * yy) + phase)[..., None]
        img += rng.normal(0, 6, size=img.shape)
    seg = np.zeros((H, W), np.uint8)
    depth = 0.6 + 0.4 * yy / H  # floor receding towards the top
    owner = np.full((H, W), -1, np.int64)
    n = int(rng.integers(1, max_objects + 1))
    kinds = rng.integers(0, len(SHAPE_CLASSES), size=n)
    drawn = []
    for j, kind in enumerate(kinds):  # later objects are nearer and occlude earlier ones
        r = rng.uniform(*object_scale) * resolution
        cx, cy = rng.uniform(r * 0.6, W - r * 0.6), rng.uniform(r * 0.6, H - r * 0.6)
        # squares, diamonds and triangles stay near-upright so that the class is visible
        rot = rng.uniform(0, 2 * np.pi) if SHAPE_CLASSES[kind] in ("circle", "cross", "ring") else rng.uniform(-0.25, 0.25)
        m = _shape_mask(int(kind), xx, yy, cx, cy, r, rot)
        colour = rng.uniform(0, 255, 3)
        shade = 1 - 0.35 * ((xx - cx) / (2 * r) + (yy - cy) / (2 * r))  # simple lighting gradient
        img[m] = (colour[None, :] * np.clip(shade[m], 0.5, 1.4)[:, None])
        seg[m] = kind + 1
        near = 0.5 - 0.4 * (j + 1) / (n + 1)
        depth[m] = near + 0.08 * ((yy[m] - cy) / r)
        owner[m] = j
        drawn.append((SHAPE_CLASSES[kind], r / resolution, (cx / W, cy / H), tuple(float(c) for c in colour)))
    counts = np.bincount(owner[owner >= 0], minlength=n)
    label = int(kinds[int(np.argmax(counts))]) if counts.sum() else int(kinds[-1])
    img = np.clip(img, 0, 255).astype(np.uint8)
    depth = np.clip(depth, 0, 1).astype(np.float32)
    objects = [SceneObject(*d, visible=int(c)) for d, c in zip(drawn, counts)]
    return img, label, seg, depth, objects


class ShapesDataset(Dataset):
    """Procedural shapes; ``size`` items per split, rendered on the fly (cheap at 32/64 px)."""

    num_classes = len(SHAPE_CLASSES)  # image-level classes; segmentation has num_classes + 1 ids

    def __init__(self, split: str = "train", resolution: int = 32, size: int = 20000, seed: int = 0,
                 max_objects: int = 4, flip: bool = False, background: str = "textured",
                 object_scale: tuple[float, float] = OBJECT_SCALE):
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"data.split must be one of {sorted(_SPLIT_OFFSET)}, got '{split}'")
        if resolution < 8:
            raise ValueError(f"data.resolution={resolution} is too small for shapes (>= 8)")
        if background not in BACKGROUNDS:
            raise ValueError(f"data.background={background!r} must be one of {', '.join(BACKGROUNDS)}")
        self.split, self.resolution, self.size, self.seed = split, resolution, size, seed
        lo, hi = (float(v) for v in object_scale)
        if not 0.0 < lo <= hi <= 0.5:
            raise ValueError(f"data.object_scale={[lo, hi]} must be [min, max] object radii as fractions of "
                             "data.resolution with 0 < min <= max <= 0.5")
        self.max_objects, self.flip, self.background, self.object_scale = max_objects, flip, background, (lo, hi)
        self.classes = list(SHAPE_CLASSES)

    def __len__(self) -> int:
        return self.size

    def render(self, index: int):
        """image, label, segmentation, depth of item ``index`` (numpy)."""
        return self.render_scene(index)[:4]

    def render_scene(self, index: int):
        rng = np.random.default_rng([self.seed, _SPLIT_OFFSET[self.split] + index])
        return render_scene(rng, self.resolution, self.max_objects, self.background, self.object_scale)

    def caption(self, index: int) -> str:
        """The caption of item ``index`` (``vqtransformer.data.captions.caption``); flips mirror it."""
        objects = self.render_scene(index)[4]
        if self._flipped(index):
            objects = [dataclasses.replace(o, centre=(1 - o.centre[0], o.centre[1])) for o in objects]
        return caption(objects, self.background, self.object_scale)

    def _flipped(self, index: int) -> bool:
        return bool(self.flip and (index * 2654435761 + self.seed) % 2)  # deterministic per item

    def __getitem__(self, index: int) -> dict:
        img, label, seg, depth, objects = self.render_scene(index)
        image = torch.from_numpy(img).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        segmentation = torch.from_numpy(seg).long()
        depth_t = torch.from_numpy(depth)[None].mul(2).sub(1)
        if self._flipped(index):
            image, segmentation, depth_t = image.flip(-1), segmentation.flip(-1), depth_t.flip(-1)
            objects = [dataclasses.replace(o, centre=(1 - o.centre[0], o.centre[1])) for o in objects]
        return {"image": image, "class_label": torch.tensor(label), "segmentation": segmentation,
                "depth": depth_t, "caption": caption(objects, self.background, self.object_scale),
                "index": torch.tensor(index)}
