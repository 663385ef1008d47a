"""paired_folder: images and maps matched by name, transformed jointly; clear errors."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vqtransformer.data.images import DataError
from vqtransformer.data.paired_folder import PairedFolder


def write_pairs(root, n=4, size=(24, 20), depth=False):
    (root / "images").mkdir(parents=True)
    (root / "maps").mkdir()
    for i in range(n):
        w, h = size
        xx = np.tile(np.arange(w), (h, 1))
        img = np.stack([xx * 10 % 256, np.full((h, w), 40 * i), np.zeros((h, w))], -1).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        lab = (xx >= w // 2).astype(np.uint8) * (1 + i % 3)  # left half background, right half class
        if depth:
            Image.fromarray((xx * 255 // (w - 1)).astype(np.uint8)).save(root / "maps" / f"im{i}.png")
        else:
            Image.fromarray(lab).save(root / "maps" / f"im{i}.png")


def cfg(root, **kw):
    base = dict(root=str(root), image_dir="images", map_dir="maps", map_type="segmentation", num_classes=3,
                resolution=16, val_fraction=0.25, random_crop=True, flip=True)
    base.update(kw)
    return OmegaConf.create(base)


def test_joint_crop_and_flip_keep_image_and_map_aligned(tmp_path):
    write_pairs(tmp_path)
    train = PairedFolder.from_config(cfg(tmp_path), True)
    val = PairedFolder.from_config(cfg(tmp_path), False)
    assert len(train) == 3 and len(val) == 1
    torch.manual_seed(0)
    for _ in range(10):
        item = train[1]
        seg, red = item["segmentation"], item["image"][0]
        assert item["image"].shape == (3, 16, 16) and seg.shape == (16, 16) and seg.dtype == torch.long
        # the label boundary sits where the image's red ramp wraps (both from the same x): jointly flipped
        cols = seg[0] > 0
        ramp_up = (red[0, 1:] > red[0, :-1]).float().mean() > 0.5
        assert cols[-1] if ramp_up else cols[0]
        assert item["coord"].shape == (1, 16, 16) and 0 <= item["coord"].min() and item["coord"].max() < 1
    a, b = val[0], val[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["segmentation"], b["segmentation"])


def test_depth_maps_scale_to_unit_range(tmp_path):
    write_pairs(tmp_path, depth=True)
    item = PairedFolder.from_config(cfg(tmp_path, map_type="depth", flip=False, random_crop=False), True)[0]
    d = item["depth"]
    assert d.shape == (1, 16, 16) and -1 <= d.min() and d.max() <= 1 and d[0, 0, -1] > d[0, 0, 0]


def test_errors_name_the_key(tmp_path):
    write_pairs(tmp_path)
    (tmp_path / "maps" / "im0.png").unlink()
    with pytest.raises(DataError, match="data.map_dir"):
        PairedFolder.from_config(cfg(tmp_path), True)
    write_pairs(tmp_path / "b")
    with pytest.raises(DataError, match="data.num_classes"):  # some training map has ids 2 and 3
        ds = PairedFolder.from_config(cfg(tmp_path / "b", num_classes=1), True)
        [ds[i] for i in range(len(ds))]
    with pytest.raises(DataError, match="data.map_type"):
        PairedFolder.from_config(cfg(tmp_path / "b", map_type="normals"), True)
