import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import CIFAR_TAR, compose
from vqtransformer.data import DataError, ShapesDataset, build_datasets
from vqtransformer.data.images import ImagePaths, folder_dataset


def test_shapes_is_deterministic_and_consistent():
    a, b = ShapesDataset("train", 32, size=10, seed=3), ShapesDataset("train", 32, size=10, seed=3)
    for i in range(5):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["class_label"] == y["class_label"]
        assert x["image"].shape == (3, 32, 32) and -1 <= x["image"].min() and x["image"].max() <= 1
        seg = x["segmentation"]
        assert seg.shape == (32, 32) and seg.max() <= ShapesDataset.num_classes
        # the dominant object's class is present in the segmentation map
        assert (seg == x["class_label"] + 1).any()
        assert x["depth"].shape == (1, 32, 32)
    assert not torch.equal(ShapesDataset("validation", 32, size=2, seed=3)[0]["image"], a[0]["image"])
    labels = [a[i]["class_label"].item() for i in range(10)] + [ShapesDataset("train", 32, 200, 0)[i]["class_label"].item() for i in range(200)]
    assert len(set(labels)) == ShapesDataset.num_classes


def test_shapes_easier_variants_plain_background_one_object_larger_scale():
    d = ShapesDataset("train", 32, size=20, max_objects=1, background="plain", object_scale=(0.3, 0.45))
    for i in range(20):
        x = d[i]
        seg, img = x["segmentation"], x["image"]
        assert set(seg.unique().tolist()) <= {0, x["class_label"].item() + 1}  # one object: its class is the label
        background = img[:, seg == 0]
        assert torch.allclose(background, background[:, :1].expand_as(background), atol=1e-6)  # one flat colour
        assert (seg > 0).float().mean() > 0.08  # larger objects than the default's smallest
    # the default (textured) images are unchanged by the options' existence
    assert torch.equal(ShapesDataset("train", 32, size=2)[1]["image"],
                       ShapesDataset("train", 32, size=2, background="textured", object_scale=(0.14, 0.34))[1]["image"])
    cfg = compose(["data.background=plain", "data.object_scale=[0.2,0.3]"])
    built = build_datasets(cfg)[0]
    assert built.background == "plain" and built.object_scale == (0.2, 0.3)
    with pytest.raises(ValueError, match="data.background"):
        ShapesDataset("train", 32, background="stripes")
    with pytest.raises(ValueError, match="data.object_scale"):
        ShapesDataset("train", 32, object_scale=(0.4, 0.2))


def _write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def test_folder_with_class_subfolders_converts_modes_and_resizes_small_images(tmp_path):
    _write(tmp_path / "cats" / "a.png", Image.new("L", (10, 12), 128))  # grayscale, smaller than the crop
    _write(tmp_path / "cats" / "b.png", Image.new("RGBA", (40, 40), (255, 0, 0, 0)))  # transparent -> white
    _write(tmp_path / "dogs" / "c.jpg", Image.new("RGB", (64, 48), (0, 0, 255)))
    ds = folder_dataset(tmp_path, 32, train=False)
    assert ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    items = [ds[i] for i in range(3)]
    assert all(it["image"].shape == (3, 32, 32) for it in items)
    assert [it["class_label"].item() for it in items] == [0, 0, 1]
    assert torch.allclose(items[1]["image"], torch.ones(3, 32, 32))  # RGBA composited on white


def test_corrupt_files_are_skipped_and_counted_then_refused_past_the_fraction(tmp_path):
    for i in range(4):
        _write(tmp_path / f"ok{i}.png", Image.new("RGB", (16, 16), (i * 40, 0, 0)))
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    paths = sorted(tmp_path.iterdir())
    ds = ImagePaths(paths, 16, train=False, max_bad_fraction=0.5)
    bad_index = [p.name for p in paths].index("bad.png")
    item = ds[bad_index]  # substituted by the next readable image
    assert item["image"].shape == (3, 16, 16) and len(ds.bad) == 1
    strict = ImagePaths(paths, 16, train=False, max_bad_fraction=0.0)
    for i in range(len(paths)):
        if paths[i].name != "bad.png":
            strict[i]
    (tmp_path / "bad2.png").write_bytes(b"\x89PNG broken")
    strict = ImagePaths(sorted(tmp_path.iterdir()), 16, train=False, max_bad_fraction=0.0)
    with pytest.raises(DataError, match="max_bad_fraction"):
        for i in range(len(strict)):
            strict[i]


def test_missing_and_empty_directories_name_the_key(tmp_path):
    cfg = compose(["data=folder", f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(DataError, match=r"data.root: directory .* does not exist"):
        build_datasets(cfg)
    (tmp_path / "empty").mkdir()
    cfg = compose(["data=folder", f"data.root={tmp_path / 'empty'}"])
    with pytest.raises(DataError, match="data.root: no images"):
        build_datasets(cfg)


def test_filelist_and_holdout(tmp_path):
    for i in range(5):
        _write(tmp_path / "img" / f"{i}.png", Image.new("RGB", (20, 20), (i, i, i)))
    (tmp_path / "train.txt").write_text("img/0.png\nimg/1.png\nimg/2.png\n")
    (tmp_path / "val.txt").write_text("img/3.png\n")
    cfg = compose(["data=filelist", f"data.root={tmp_path}", f"data.train_list={tmp_path / 'train.txt'}",
                   f"data.val_list={tmp_path / 'val.txt'}", "data.resolution=16"])
    train, val = build_datasets(cfg)
    assert len(train) == 3 and len(val) == 1 and val[0]["image"].shape == (3, 16, 16)


def test_cifar10_layout_from_the_shared_tar(tmp_path):
    if not CIFAR_TAR.is_file():
        pytest.skip("../shared/data/cifar10/cifar10_jpg.tar is not on this machine")
    with tarfile.open(CIFAR_TAR) as tar:
        members = [m for m in tar.getmembers() if m.isdir() or "/0000" in m.name]  # a slice: 1 image per class
        tar.extractall(tmp_path, members=members, filter="data")
    root = next(p for p in tmp_path.rglob("train")).parent
    cfg = compose(["data=cifar10", f"data.root={root}"])
    train, val = build_datasets(cfg)
    assert train.num_classes == 10 and len(train) >= 10 and len(val) >= 10
    assert train[0]["image"].shape == (3, 32, 32)
    assert np.isfinite(train[0]["image"].numpy()).all()
