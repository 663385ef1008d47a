"""The hashed, class-stratified validation hold-out (folder without val_dir, ffhq, celebahq, faceshq),
split summaries and class-balanced grid indices."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT, compose
from vqtransformer.data import DataError, ShapesDataset, balanced_indices, build_datasets, split_summary
from vqtransformer.data.splits import dataset_labels, holdout, n_held_out

COUNTS = [17, 40, 23, 31, 19, 36, 28, 25, 33, 21]  # 10 classes, different sizes
FRACTION = 0.1


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value % 256, (value * 7) % 256, (value * 13) % 256)).save(path)


@pytest.fixture
def class_root(tmp_path) -> Path:
    root = tmp_path / "classes"
    for c, n in enumerate(COUNTS):
        for i in range(n):
            _png(root / f"class{c:02d}" / f"img_{i:03d}.png", c * 50 + i)
    return root


def folder_split(root: Path, fraction: float = FRACTION, seed: int = 0):
    cfg = compose(["data=folder", f"data.root={root}", f"data.val_fraction={fraction}", f"data.seed={seed}",
                   "data.resolution=8"])
    return build_datasets(cfg)


def rel(ds, root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in ds.paths]


def sides(root: Path, **kw) -> tuple[set[str], set[str]]:
    train, val = folder_split(root, **kw)
    return set(rel(train, root)), set(rel(val, root))


def test_every_class_is_in_validation_in_proportion_and_splits_are_disjoint(class_root):
    train, val = folder_split(class_root)
    assert train.classes == val.classes == [f"class{c:02d}" for c in range(10)]
    per_class = {c: val.labels.count(c) for c in range(10)}
    for c, n in enumerate(COUNTS):
        assert abs(per_class[c] - round(n * FRACTION)) <= 1 and per_class[c] >= 1, (c, n, per_class[c])
        assert train.labels.count(c) + per_class[c] == n
    t, v = set(rel(train, class_root)), set(rel(val, class_root))
    assert not t & v and len(t | v) == sum(COUNTS)
    # labels still belong to their paths after the cut
    assert all(p.parent.name == val.classes[y] for p, y in zip(val.paths, val.labels))
    assert all(p.parent.name == train.classes[y] for p, y in zip(train.paths, train.labels))
    # not the old rule (the last files of the sorted list: nearly one class)
    assert len(set(val.labels)) == 10


def test_split_is_identical_across_calls_and_processes(class_root):
    first, again = sides(class_root), sides(class_root)
    assert first == again
    code = ("import json, sys; from pathlib import Path; from tests.data.test_holdout import sides; "
            "t, v = sides(Path(sys.argv[1])); print(json.dumps([sorted(t), sorted(v)]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "12345"}  # a different str hash()
    out = subprocess.run([sys.executable, "-c", code, str(class_root)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    t, v = json.loads(out.stdout.strip().splitlines()[-1])
    assert (set(t), set(v)) == first
    # another seed is another split (same per-class sizes)
    other = sides(class_root, seed=1)
    assert other[1] != first[1] and len(other[1]) == len(first[1])


def test_adding_a_file_moves_nothing_in_other_classes_and_at_most_one_in_its_own(class_root):
    before_t, before_v = sides(class_root)
    n_moves = 0
    # one at a time; class 2 grows 23 -> 43 (n_val 2 -> 4): new files land on either side, some push one out
    for k, c in enumerate([3, 0, 7] + [2] * 20 + [9, 1]):
        _png(class_root / f"class{c:02d}" / f"new_{k}.png", 200 + k)
        after_t, after_v = sides(class_root)
        new = f"class{c:02d}/new_{k}.png"
        assert new in after_t | after_v and not after_t & after_v
        moved = {p for p in before_t | before_v if (p in before_v) != (p in after_v)}
        assert all(p.startswith(f"class{c:02d}/") for p in moved), moved
        assert len(moved) <= 1, moved
        n_moves += len(moved)
        before_t, before_v = after_t, after_v
    assert n_moves > 0 and len(before_v) == 30  # the moves above did happen (and stayed in their class)


def test_ffhq_celebahq_and_faceshq_without_lists_are_hashed_holdouts(tmp_path):
    for which, n in (("ffhq", 60), ("celebahq", 45)):
        for i in range(n):
            _png(tmp_path / which / f"{i:05d}.png", i)

    def faces(name, *extra):
        roots = [f"data.{w}_root={tmp_path / w}" for w in ("ffhq", "celebahq") if name in (w, "faceshq")]
        cfg = compose([f"data={name}", *roots, "data.val_fraction=0.1", "data.resolution=8", *extra])
        return build_datasets(cfg)

    train, val = faces("ffhq")
    assert len(val) == 6 and len(train) == 54 and val.labels is None
    names = [p.name for p in val.paths]
    assert names == [p.name for p in faces("ffhq")[1].paths]  # deterministic
    assert names != [f"{i:05d}.png" for i in range(54, 60)]  # not the last files by name
    assert not {p.name for p in train.paths} & set(names)
    assert [p.name for p in faces("ffhq", "data.seed=7")[1].paths] != names
    _png(tmp_path / "ffhq" / "99999.png", 99)  # one more file moves at most one existing file
    assert len(set(names) ^ {p.name for p in faces("ffhq")[1].paths} - {"99999.png"}) <= 1
    train, val = faces("faceshq")
    assert [len(d) for d in val.datasets] == [5, 6] and [len(d) for d in train.datasets] == [40, 55]
    s = split_summary(train, val)
    assert s["data.split.val_size"] == 11 and s["data.split.train_size"] == 95
    assert s["data.split.rule"].startswith("celebahq: hashed holdout") and "val_per_class" not in str(s)


def test_holdout_function_rules():
    paths = [Path(f"c{i % 3}/{i}.png") for i in range(31)]
    labels = [i % 3 for i in range(31)]
    t, v = holdout(paths, None, 0.25, seed=0, labels=labels)
    assert sorted(t + v) == list(range(31)) and t == sorted(t) and v == sorted(v)
    assert [sum(labels[i] == c for i in v) for c in range(3)] == [n_held_out(n, 0.25) for n in (11, 10, 10)]
    assert (n_held_out(1, 0.5), n_held_out(2, 0.01), n_held_out(10, 0.25), n_held_out(3, 0.9)) == (0, 1, 3, 2)
    # the path relative to the root decides: moving the dataset keeps the split
    moved = holdout([Path("/elsewhere") / p for p in paths], "/elsewhere", 0.25, 0, labels)
    assert moved == (t, v)
    with pytest.raises(DataError, match="data.val_fraction"):
        holdout(paths, None, 1.0)


def test_split_summary_is_logged_and_flat(class_root, caplog):
    with caplog.at_level(logging.INFO, logger="vqtransformer.data.splits"):
        train, val = folder_split(class_root)
    s = split_summary(train, val)
    assert s["data.split.train_size"] == len(train) and s["data.split.val_size"] == len(val)
    assert s["data.split.val_per_class"] == ",".join(f"class{c:02d}:{val.labels.count(c)}" for c in range(10))
    assert s["data.split.train_per_class"].startswith(f"class00:{train.labels.count(0)},")
    assert s["data.split.rule"] == f"hashed holdout val_fraction={FRACTION} seed=0 per class"
    assert all(isinstance(v, (int, str)) for v in s.values())
    text = caplog.text
    assert f"{len(train)} train / {len(val)} validation" in text and s["data.split.val_per_class"] in text
    shapes = split_summary(ShapesDataset("train", 16, 5000), ShapesDataset("validation", 16, 64))
    assert shapes["data.split.val_size"] == 64 and "data.split.train_per_class" not in shapes  # not rendered
    assert sum(int(x.split(":")[1]) for x in shapes["data.split.val_per_class"].split(",")) == 64


def test_balanced_indices_one_row_per_class(class_root):
    _, val = folder_split(class_root)
    idx = balanced_indices(val, per_class=2)
    assert len(idx) == 20 and idx == balanced_indices(val, per_class=2)
    assert [val.labels[i] for i in idx] == [c for c in range(10) for _ in range(2)]
    few = balanced_indices(val, per_class=3, max_classes=4)
    assert len(few) == 12 and len({val.labels[i] for i in few}) == 4
    rows = [[val.labels[i] for i in few[r * 3:(r + 1) * 3]] for r in range(4)]
    assert all(len(set(row)) == 1 for row in rows)
    # a class with fewer items than per_class repeats them (rows stay aligned)
    big = balanced_indices(val, per_class=5)
    assert len(big) == 50 and [val.labels[i] for i in big[:5]] == [0] * 5
    # shapes: labels by rendering
    shapes = ShapesDataset("validation", 32, 256)
    labels = dataset_labels(shapes)
    s_idx = balanced_indices(shapes, per_class=4)
    assert len(s_idx) == 4 * ShapesDataset.num_classes
    assert [labels[i] for i in s_idx] == [c for c in range(ShapesDataset.num_classes) for _ in range(4)]
    assert all(shapes[i]["class_label"].item() == labels[i] for i in s_idx[::4])
    # no labels: evenly spaced, fixed
    class Plain:
        def __len__(self):
            return 100
    assert balanced_indices(Plain(), per_class=4, max_classes=2) == [0, 12, 25, 37, 50, 62, 75, 87]
    assert balanced_indices(Plain(), per_class=200) == list(range(100))
