"""Datasets from ``cfg.data``: ``shapes`` (embedded default), ``folder``, ``filelist``, ``cifar10``,
``faceshq`` / ``ffhq`` / ``celebahq``, ``paired_folder``, ``captions`` (captioned images:
``vqtransformer.data.captioned``). Every dataset yields dicts with ``image`` in [-1, 1]
(plus ``class_label`` / ``segmentation`` / ``depth`` / ``caption`` where it has them)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, Dataset

from vqtransformer.data.images import DataError, ImagePaths, folder_dataset, list_images, read_file_list
from vqtransformer.data.shapes import BACKGROUNDS, OBJECT_SCALE, ShapesDataset
from vqtransformer.data.splits import balanced_indices, holdout, log_split_summary, split_summary

__all__ = ["build_datasets", "DataError", "ShapesDataset", "balanced_indices", "split_summary"]


def _common(cfg: DictConfig) -> dict:
    return {"random_crop": cfg.get("random_crop", True), "flip": cfg.get("flip", True),
            "max_bad_fraction": cfg.get("max_bad_fraction", 0.01), "max_image_pixels": cfg.get("max_image_pixels")}


def _ruled(ds: Dataset, rule: str) -> Dataset:
    ds.split_rule = rule  # how the split was made: data.split.rule in split_summary
    return ds


def _held_out(ds: ImagePaths, root: Path, cfg: DictConfig, train: bool) -> ImagePaths:
    """``ds`` cut to its side of the hashed, class-stratified hold-out (vqtransformer.data.splits.holdout)."""
    fraction, seed = cfg.get("val_fraction", 0.02), int(cfg.get("seed", 0))
    train_idx, val_idx = holdout(ds.paths, root, fraction, seed, ds.labels)
    keep = train_idx if train else val_idx
    ds.paths = [ds.paths[i] for i in keep]
    if ds.labels is not None:
        ds.labels = [ds.labels[i] for i in keep]
    return _ruled(ds, f"hashed holdout val_fraction={fraction} seed={seed}{' per class' if ds.labels is not None else ''}")


def _faces(cfg: DictConfig, which: str, train: bool) -> ImagePaths:
    root_key = f"data.{which}_root"
    root = cfg.get(f"{which}_root") or cfg.get("root")
    if not root:
        raise DataError(f"{root_key} is not set; point it at the {which} image directory")
    list_key = f"{which}_{'train' if train else 'val'}_list"
    if cfg.get(list_key):
        paths = read_file_list(Path(cfg[list_key]), Path(root), f"data.{list_key}")
        return _ruled(ImagePaths(paths, cfg.resolution, train, **_common(cfg)), f"data.{list_key}")
    root = Path(root).expanduser()
    return _held_out(ImagePaths(list_images(root, root_key), cfg.resolution, train, **_common(cfg)), root, cfg, train)


def build_dataset(cfg: DictConfig, train: bool) -> Dataset:
    name = cfg.name
    split = "train" if train else "validation"
    if name == "shapes":
        ds = ShapesDataset(split, cfg.resolution, cfg.train_size if train else cfg.val_size, cfg.seed,
                           cfg.get("max_objects", 4), flip=train and cfg.get("flip", True),
                           background=cfg.get("background", BACKGROUNDS[0]), object_scale=cfg.get("object_scale", OBJECT_SCALE))
        return _ruled(ds, f"procedural seed={cfg.seed} ({split} offset)")
    if name == "folder":
        sub = cfg.get("train_dir" if train else "val_dir")
        root = Path(cfg.root) / sub if sub else Path(cfg.root)
        if not sub:  # one directory: hashed hold-out, stratified by class subfolder
            root = root.expanduser()
            return _held_out(folder_dataset(root, cfg.resolution, train, **_common(cfg)), root, cfg, train)
        key = f"data.{'train' if train else 'val'}_dir"
        return _ruled(folder_dataset(root, cfg.resolution, train, key=key, **_common(cfg)), key)
    if name == "cifar10":
        root = Path(cfg.root).expanduser()
        sub = root / ("train" if train else "test")
        if not sub.is_dir():
            raise DataError(f"data.root: '{root}' has no '{sub.name}/' folder; point data.root at the extracted "
                            "CIFAR-10 image folders (train/<class>/*.jpg, test/<class>/*.jpg)")
        return _ruled(folder_dataset(sub, cfg.resolution, train, **_common(cfg)), "train/ and test/ folders")
    if name == "filelist":
        key = "train_list" if train else "val_list"
        if not cfg.get(key):
            raise DataError(f"data.{key} is not set; give a text file with one image path per line")
        paths = read_file_list(Path(cfg[key]), Path(cfg.root) if cfg.get("root") else None, f"data.{key}")
        return _ruled(ImagePaths(paths, cfg.resolution, train, **_common(cfg)), f"data.{key}")
    if name in ("ffhq", "celebahq"):
        return _faces(cfg, name, train)
    if name == "faceshq":
        parts = {which: _faces(cfg, which, train) for which in ("celebahq", "ffhq")}
        return _ruled(ConcatDataset(list(parts.values())), "; ".join(f"{k}: {d.split_rule}" for k, d in parts.items()))
    if name == "paired_folder":
        from vqtransformer.data.paired_folder import PairedFolder  # written with the transformer stage

        return _ruled(PairedFolder.from_config(cfg, train), f"last val_fraction={cfg.get('val_fraction', 0.05)} by file name")
    if name == "captions":
        from vqtransformer.data.captioned import captioned_dataset  # sets its split_rule (layout included)

        return captioned_dataset(cfg, train, **_common(cfg))
    raise DataError(f"data.name='{name}' is unknown; choose shapes, folder, filelist, cifar10, faceshq, ffhq, celebahq, "
                    "paired_folder, captions")


def build_datasets(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    """(train, validation) datasets for ``cfg.data``; logs the split (sizes, per-class counts)."""
    train, val = build_dataset(cfg.data, True), build_dataset(cfg.data, False)
    log_split_summary(split_summary(train, val))
    return train, val


def num_classes(dataset: Dataset) -> int:
    if isinstance(dataset, ConcatDataset):
        return max(num_classes(d) for d in dataset.datasets)
    return int(getattr(dataset, "num_classes", 0))
