"""``data=captions``: captioned images in the folder (.txt beside each image), filelist (JSONL / CSV)
and COCO layouts; one caption of several per epoch; skips and errors for bad inputs."""

import json
import logging

import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import compose
from vqtransformer.data import DataError, build_dataset, build_datasets, split_summary
from vqtransformer.data.captioned import CaptionedImages, draw
from vqtransformer.models.conditioning import training_captions
from vqtransformer.modules.text import WordTokenizer

LOGGER = "vqtransformer.data.captioned"


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (value % 256, (value * 7) % 256, 100)).save(path)


def _cfg(root, *overrides):
    return compose(["data=captions", f"data.root={root}", "data.resolution=16", "data.num_workers=0", *overrides])


def _by_name(ds):
    """{file name: caption of its item} over the dataset (reading every item once)."""
    return {ds.paths[int(it["index"])].name: it["caption"] for it in (ds[i] for i in range(len(ds)))}


def _all(*datasets):
    return {p.name: ds.all_captions(i) for ds in datasets for i, p in enumerate(ds.paths)}


def _whole(cfg):
    """Train and validation side together (the hold-out keeps at least one image even at val_fraction=0)."""
    return _all(*build_datasets(cfg))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "folder"
    for i in range(8):
        _png(root / "sub" / f"img{i}.png", i)
        (root / "sub" / f"img{i}.txt").write_text(f"  a photo   of thing {i}  \n\n   \n")
    (root / "sub" / "img0.txt").write_text("first caption\nsecond caption\nthird caption\n")
    return root


# -- the three layouts -----------------------------------------------------------------------------------

def test_folder_layout_items_captions_and_split(folder):
    cfg = _cfg(folder, "data.val_fraction=0.25")
    train, val = build_datasets(cfg)
    assert len(train) == 6 and len(val) == 2 and {p.name for p in train.paths}.isdisjoint(p.name for p in val.paths)
    assert train.layout == "folder" and "hashed holdout val_fraction=0.25" in train.split_rule
    assert split_summary(train, val)["data.split.val_size"] == 2
    item = train[0]
    assert item["image"].shape == (3, 16, 16) and -1 <= item["image"].min() <= item["image"].max() <= 1
    assert isinstance(item["caption"], str) and "class_label" not in item  # images in one folder: no classes
    captions = {**_all(train), **_all(val)}
    # whitespace-only lines ignored, whitespace runs collapsed
    assert captions["img3.png"] == ("a photo of thing 3",)
    assert captions["img0.png"] == ("first caption", "second caption", "third caption")
    for ds in (train, val):
        for name, caption in _by_name(ds).items():
            assert caption in captions[name]
    # training_captions (the text vocabulary) reads every caption of each image, without decoding images
    texts = training_captions(cfg)
    assert sorted(texts) == sorted(c for i in range(len(train)) for c in train.all_captions(i))
    assert len(texts) > len(train) and all(isinstance(t, str) and t for t in texts)
    assert "photo" in WordTokenizer.from_captions(texts, 16, 100).words


def test_filelist_jsonl_and_csv(tmp_path):
    root = tmp_path / "data"
    for i in range(4):
        _png(root / "images" / f"{i}.jpg", i)
    lines = [{"file": "images/0.jpg", "caption": "a red thing"},
             {"file": "images/1.jpg", "caption": ["one of two", "two of two"]},
             {"file": "images/2.jpg", "caption": "first row"},
             {"file": "images/2.jpg", "caption": "second row"},  # rows of one file add captions
             {"file": str(root / "images" / "3.jpg"), "caption": "an absolute path"}]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(d) for d in lines) + "\n\n")
    cfg = _cfg(root, "data.val_fraction=0", f"data.captions_file={tmp_path / 'caps.jsonl'}")
    ds = build_dataset(cfg.data, True)
    assert ds.layout == "filelist" and len(ds) == 3
    assert _whole(cfg) == {"0.jpg": ("a red thing",), "1.jpg": ("one of two", "two of two"),
                        "2.jpg": ("first row", "second row"), "3.jpg": ("an absolute path",)}
    assert all(c in _whole(cfg)[name] for name, c in _by_name(ds).items())

    (root / "caps.csv").write_text('file,caption,extra\nimages/0.jpg,"a cat, sitting",x\nimages/1.jpg,a dog,y\n'
                                   "images/1.jpg,a brown dog,z\n")
    cfg = _cfg(root, "data.val_fraction=0", "data.layout=filelist", "data.captions_file=caps.csv")  # relative: root
    assert _whole(cfg) == {"0.jpg": ("a cat, sitting",), "1.jpg": ("a dog", "a brown dog")}
    assert training_captions(cfg)[0] in ("a brown dog", "a cat, sitting", "a dog")
    (root / "bad.csv").write_text("path,text\nimages/0.jpg,x\n")
    with pytest.raises(DataError, match=r"data.captions_file: CSV .*bad.csv.* file,caption"):
        build_dataset(_cfg(root, "data.captions_file=bad.csv").data, True)
    (root / "bad.jsonl").write_text('{"file": "images/0.jpg", "caption": "ok"}\n{"file": "images/1.jpg", caption}\n')
    with pytest.raises(DataError, match=r"data.captions_file: .*bad.jsonl.* line 2 is not JSON"):
        build_dataset(_cfg(root, "data.captions_file=bad.jsonl").data, True)


def _coco(path, images, annotations):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "images": [{"id": i, "file_name": f, "width": 16, "height": 16}
                                                       for i, f in images],
                                "annotations": [{"id": k, "image_id": i, "caption": c}
                                                for k, (i, c) in enumerate(annotations)]}))


def test_coco_layout_several_captions_and_auto_detection(tmp_path, caplog):
    root = tmp_path / "coco"
    for i in range(3):
        _png(root / "train2017" / f"{i:012d}.jpg", i)
    _coco(root / "annotations" / "captions_train2017.json",
          [(10, "train2017/000000000000.jpg"), (11, "train2017/000000000001.jpg"), (12, "train2017/000000000002.jpg")],
          [(10, "A man riding a horse.\n"), (10, "A person on a horse "), (11, "Two dogs."), (10, "A rider.")])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train, val = build_datasets(_cfg(root))  # auto: the one annotations/*.json
    assert train.layout == "coco" and len(train) == 1 and len(val) == 1
    assert _all(train, val)["000000000000.jpg"] == ("A man riding a horse.", "A person on a horse", "A rider.")
    # the image without annotation: one counted warning
    assert "1 of 3 images have no usable caption: 1 with no annotation" in caplog.text
    assert "train2017/000000000002.jpg" in caplog.text
    with pytest.raises(DataError, match="data.skip_missing_captions=false"):
        build_dataset(_cfg(root, "data.skip_missing_captions=false").data, True)
    # explicit: the same
    explicit = _cfg(root, "data.layout=coco", "data.captions_file=annotations/captions_train2017.json").data
    assert build_dataset(explicit, True).layout == "coco"
    with pytest.raises(DataError, match="data.layout=coco needs data.captions_file"):
        build_dataset(_cfg(root, "data.layout=coco").data, True)
    (root / "other.jsonl").write_text("")
    with pytest.raises(DataError, match=r"data.layout=auto: .* several captions files .*set data.captions_file"):
        build_dataset(_cfg(root).data, True)
    (root / "notcoco.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="is not a COCO captions JSON"):
        build_dataset(_cfg(root, "data.captions_file=notcoco.json").data, True)


# -- one of several captions per epoch ----------------------------------------------------------------

def test_one_of_several_drawn_per_epoch_deterministic_and_varied(folder):
    for txt in (folder / "sub").glob("*.txt"):
        txt.write_text("first caption\nsecond caption\nthird caption\n")
    cfg = _cfg(folder, "data.val_fraction=0")
    a, b = build_dataset(cfg.data, True), build_dataset(cfg.data, True)
    i = 0
    three = ("first caption", "second caption", "third caption")
    seq_a, seq_b = [], []
    for epoch in range(9):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        seq_a.append(a[i]["caption"])
        seq_b.append(b.caption(i))  # the same draw, without decoding the image
        assert a[i]["caption"] == seq_a[-1]  # a second read in the same epoch: the same caption
    assert seq_a == seq_b  # deterministic: a fresh dataset draws the same
    for cycle in range(3):  # every caption once every 3 epochs
        assert sorted(seq_a[3 * cycle:3 * cycle + 3]) == list(three)
    orders = [draw(3, a._keys[i], 0, e) for e in range(30)]
    assert len({tuple(orders[k:k + 3]) for k in range(0, 30, 3)}) > 1  # in an order that varies between cycles
    # another data.seed: another order (over several images and epochs)
    other = build_dataset(_cfg(folder, "data.val_fraction=0", "data.seed=5").data, True)
    key = other._keys[i]
    assert [draw(3, key, 5, e) for e in range(30)] != [draw(3, key, 0, e) for e in range(30)]
    # validation: always the first caption
    val = build_dataset(_cfg(folder, "data.val_fraction=0.5").data, False)
    for k in range(len(val)):
        val.set_epoch(5)
        assert val[k]["caption"] == val.all_captions(k)[0]


def test_the_training_loop_sets_the_epoch_and_a_resumed_loader_draws_the_same(tmp_path):
    from omegaconf import OmegaConf

    from vqtransformer.training.loop import InfiniteLoader

    root = tmp_path / "many"
    for i in range(5):
        _png(root / f"{i}.png", i)
        (root / f"{i}.txt").write_text("".join(f"caption {i} {j}\n" for j in range(4)))
    ds = build_dataset(_cfg(root, "data.val_fraction=0").data, True)
    assert len(ds) == 4
    cfg = OmegaConf.create({"trainer": {"seed": 0}, "data": {"batch_size": 2, "num_workers": 2}})
    loader = InfiniteLoader(ds, cfg, rank=0, world=1, pin=False)
    got = [sorted(next(loader)["caption"] + next(loader)["caption"]) for _ in range(3)]  # 3 epochs, in workers
    want = [sorted(ds.captions[i][draw(4, ds._keys[i], 0, e)] for i in range(4)) for e in range(3)]
    assert got == want
    assert len({tuple(w) for w in want}) == 3  # the draws differ between epochs
    resumed = InfiniteLoader(ds, cfg, rank=0, world=1, pin=False)
    resumed.restore({"epoch": 2, "position": 0})
    assert sorted(next(resumed)["caption"] + next(resumed)["caption"]) == want[2]


# -- bad inputs ---------------------------------------------------------------------------------------

def test_missing_empty_and_non_utf8_captions_are_counted_skips(folder, caplog):
    sub = folder / "sub"
    (sub / "img1.txt").unlink()  # missing
    (sub / "img2.txt").write_text("   \n\t\n")  # whitespace only
    (sub / "img3.txt").write_bytes(b"caf\xe9 au lait\n")  # Latin-1, not UTF-8
    (sub / "img4.txt").write_bytes(b"good line\nbad \xff line\n")  # one bad line of two
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        captions = _whole(_cfg(folder, "data.val_fraction=0"))
    assert sorted(captions) == ["img0.png", "img4.png", "img5.png", "img6.png", "img7.png"]
    assert captions["img4.png"] == ("good line",)
    text = caplog.text
    assert "3 of 8 images have no usable caption" in text
    assert "1 with no .txt beside it (e.g. sub/img1.png)" in text
    assert "1 whose captions are all empty (e.g. sub/img2.png)" in text
    assert "1 whose captions are not UTF-8 text (sub/img3.txt)" in text
    assert "dropped 1 caption(s) that are not UTF-8" in text and "sub/img4.txt line 2" in text
    assert sum("no usable caption" in r.getMessage() for r in caplog.records) == 1  # one summarising warning
    with pytest.raises(DataError, match=r"3 of 8 images .*data.skip_missing_captions=false"):
        build_dataset(_cfg(folder, "data.skip_missing_captions=false").data, True)


def test_filelist_bad_lines_and_missing_images(tmp_path, caplog):
    root = tmp_path / "d"
    for i in range(3):
        _png(root / f"{i}.png", i)
    raw = (b'{"file": "0.png", "caption": "fine"}\n'
           b'{"file": "1.png", "caption": "   "}\n'
           b'{"file": "2.png", "caption": "na\xefve"}\n')
    (root / "caps.jsonl").write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = build_dataset(_cfg(root).data, True)  # auto: the one *.jsonl
    assert [p.name for p in ds.paths] == ["0.png"] and ds.layout == "filelist"
    assert "1 whose captions are all empty (e.g. 1.png)" in caplog.text
    assert "not UTF-8 text (caps.jsonl line 3 (2.png))" in caplog.text
    # a named image that does not exist: an error naming the file, the line and the keys
    (root / "caps.jsonl").write_bytes(raw + b'{"file": "gone/9.png", "caption": "nothing here"}\n')
    with pytest.raises(DataError, match=r"data.captions_file: .*caps.jsonl' names 1 image that does not exist under "
                                        r"data.root=.*'gone/9.png' \(line 4\)"):
        build_dataset(_cfg(root).data, True)
    with pytest.raises(DataError, match=r"data.captions_file: .*nope.jsonl' does not exist"):
        build_dataset(_cfg(root, "data.captions_file=nope.jsonl").data, True)


def test_coco_missing_image_file_is_an_error(tmp_path):
    root = tmp_path / "c"
    _png(root / "a.jpg")
    _coco(root / "caps.json", [(1, "a.jpg"), (2, "b.jpg")], [(1, "an image"), (2, "a missing image")])
    with pytest.raises(DataError, match=r"caps.json' names 1 image that does not exist under data.root=.*'b.jpg'"):
        build_dataset(_cfg(root, "data.captions_file=caps.json").data, True)


def test_zero_usable_items_names_root_layout_and_what_was_looked_for(tmp_path):
    root = tmp_path / "nocaps"
    for i in range(2):
        _png(root / f"{i}.png", i)
    with pytest.raises(DataError, match=r"data.layout=folder \(auto\), data.root=.*nocaps'\): no usable captioned "
                                        r"image; looked for a non-empty UTF-8 .txt .* also looks for one captions file"):
        build_dataset(_cfg(root).data, True)
    (root / "0.txt").write_text("\n \n")
    with pytest.raises(DataError, match=r"no usable captioned image.*whose captions are all empty \(e.g. 0.png\)"):
        build_dataset(_cfg(root, "data.layout=folder").data, True)
    (root / "caps.jsonl").write_text("")
    with pytest.raises(DataError, match=r"data.layout=filelist, data.root=.*data.captions_file=.*caps.jsonl'\): "
                                        r"no usable captioned image"):
        build_dataset(_cfg(root, "data.layout=filelist", "data.captions_file=caps.jsonl").data, True)
    with pytest.raises(DataError, match=r"data.root: directory .* does not exist"):
        build_dataset(_cfg(tmp_path / "absent").data, True)
    with pytest.raises(DataError, match="data.layout=tiles is unknown"):
        build_dataset(_cfg(root, "data.layout=tiles").data, True)


def test_corrupt_image_is_skipped_like_the_folder_dataset(tmp_path):
    root = tmp_path / "corrupt"
    for i in range(5):
        _png(root / ("val" if i == 4 else "train") / f"{i}.png", i)
        (root / ("val" if i == 4 else "train") / f"{i}.txt").write_text(f"caption {i}\n")
    (root / "train" / "1.png").write_bytes(b"not an image")
    cfg = _cfg(root, "data.train_dir=train", "data.val_dir=val", "data.max_bad_fraction=0.5")
    ds = build_dataset(cfg.data, True)
    assert isinstance(ds, CaptionedImages) and len(ds) == 4  # found at scan time by reading, not by its caption
    item = ds[1]  # replaced by the next readable image, with that image's caption
    assert int(item["index"]) == 2 and item["caption"] == "caption 2" and ds.bad == {1}
    assert ds.probe(4) == 1  # the pre-training read of the folder dataset


def test_class_subfolders_train_and_val_dirs_and_hydra_defaults(tmp_path):
    root = tmp_path / "classes"
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("cats", "dogs"):
            for i in range(n):
                _png(root / split / cls / f"{i}.png", i)
                (root / split / cls / f"{i}.txt").write_text(f"a {cls[:-1]} number {i}\n")
    cfg = _cfg(root, "data.train_dir=train", "data.val_dir=val")
    assert cfg.data.name == "captions" and cfg.data.layout == "auto" and cfg.data.captions_file is None
    assert cfg.data.skip_missing_captions is True and cfg.data.flip is False
    assert OmegaConf.is_missing(compose(["data=captions"]).data, "root")
    train, val = build_datasets(cfg)
    assert len(train) == 6 and len(val) == 2 and train.classes == ["cats", "dogs"]
    assert train.split_rule == "data.train_dir, layout=folder"
    assert {(it["class_label"].item(), it["caption"].split()[1]) for it in (val[0], val[1])} == {(0, "cat"), (1, "dog")}
    with pytest.raises(DataError, match="data.train_dir / data.val_dir are folders of data.layout=folder"):
        build_dataset(_cfg(root, "data.val_dir=val", "data.layout=coco", "data.captions_file=x.json").data, True)


def test_train_py_text_to_image_on_captions(tmp_path):
    """train.py stage=vqdiffusion conditioning=text data=captions: the vocabulary comes from the captions file."""
    from tests.conftest import run_train, untrained_vq_checkpoint
    from vqtransformer.loading import load_stage

    vq = untrained_vq_checkpoint(tmp_path / "vq.ckpt")
    root, lines = tmp_path / "data", []
    for i, (name, rgb) in enumerate([("red", (220, 20, 20)), ("blue", (20, 20, 220)), ("green", (20, 200, 20))] * 4):
        root.mkdir(exist_ok=True)
        Image.new("RGB", (20, 18), rgb).save(root / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": [f"a {name} square", f"plain {name}"]}))
    (root / "caps.jsonl").write_text("\n".join(lines) + "\n")
    r = run_train(["stage=vqdiffusion", f"first_stage.ckpt={vq}", "conditioning=text", "data=captions",
                   f"data.root={root}", "data.val_fraction=0.25", "data.resolution=16", "data.batch_size=4",
                   "data.num_workers=0", "transformer.n_layer=1", "transformer.n_head=2", "transformer.n_embd=32",
                   "text_encoder.n_layer=1", "text_encoder.n_head=2", "diffusion.num_timesteps=10",
                   "stage.sample_steps=2", "stage.val_samples=4", "trainer.max_steps=3", "trainer.val_every=3",
                   "trainer.ckpt_every=3", "trainer.val_batches=1", "trainer.log_every=1", "logger=none",
                   f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "9 train / 3 validation items" in r.stdout + r.stderr
    words = set(load_stage(tmp_path / "run").stage.denoiser_module.text_encoder.tokenizer.words)
    assert {"square", "red", "blue", "green"} <= words
