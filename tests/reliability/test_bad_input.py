"""Bad input (issue 14, points 7-10): a full disk, bad image files, bad config values, unsafe checkpoints."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import TINY, compose, run_train
from vqtransformer.config import _GT0, SCHEMA, ConfigError, validate_config
from vqtransformer.data.images import DataError, ImagePaths, list_images
from vqtransformer.training import checkpoint as ckpt_io

FOLDER_TINY = [o for o in TINY if not o.startswith("data.val_size")]


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _error_lines(stderr: str) -> list[str]:
    """stderr without the progress bar."""
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip() and "it/s" not in ln
            and "s/it" not in ln and not ln.startswith("vqgan:")]


# -- 7: a full disk -------------------------------------------------------------------------------
@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_in_one_line_keeps_the_checkpoint_and_tags_its_step(tmp_path, tiny_tmpfs):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tiny_tmpfs / "run"  # 20 MB: one 12 MB checkpoint fits, a second beside it does not
    r = run_train(TINY + ["trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.val_every=100",
                          f"logger.tracking_uri={uri}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = _error_lines(r.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: no space left on device writing {run_dir / 'checkpoints' / 'last.ckpt'} (")
    assert " MB needed)" in lines[0] and "inline_container" not in r.stderr + r.stdout
    assert ckpt_io.load(run_dir / "checkpoints" / "last.ckpt")["step"] == 2
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    (run,) = _runs(uri)
    assert run.info.status == "FAILED" and run.data.tags["vqt.checkpoint_step"] == "2"
    assert "no space left on device" in run.data.tags["vqt.end_reason"]


# -- 8: bad image files ------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_huge_png(path: Path, w: int = 14000, h: int = 14000) -> None:
    """A real, decodable 1-bit PNG of w x h pixels (a few hundred kB on disk)."""
    row = b"\0" + b"\0" * ((w + 7) // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))


def _good(path: Path, value: int = 128, size=(24, 24)) -> Path:
    Image.new("RGB", size, (value, 50, 200)).save(path)
    return path


def test_a_decompression_bomb_is_a_counted_bad_file_with_a_configurable_limit(tmp_path):
    write_huge_png(tmp_path / "huge.png")
    good = _good(tmp_path / "good.png")
    ds = ImagePaths([tmp_path / "huge.png", good], 16, train=False, max_bad_fraction=0.5)
    item = ds[0]  # the bomb is skipped, the next file is used
    assert int(item["index"]) == 1 and ds.bad == {0}
    small = ImagePaths([good, _good(tmp_path / "g2.png")], 16, train=False, max_bad_fraction=0.5,
                       max_image_pixels=100)  # 24x24 > 100 pixels
    with pytest.raises(DataError, match="images are unreadable"):
        small[0]


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    arr = np.zeros((8, 8), dtype=np.uint16)
    arr[:, :4], arr[:, 4:] = 65535, 32768
    Image.fromarray(arr).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")
    out = ImagePaths([tmp_path / "deep.png"], 8, train=False).open_image(tmp_path / "deep.png")
    values = np.asarray(out.convert("L"))
    assert values[0, 0] == 255 and values[0, 7] == 128


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    out = ImagePaths([tmp_path / "rot.jpg"], 8, train=False).open_image(tmp_path / "rot.jpg")
    assert out.size == (10, 20)


def test_every_format_pillow_opens_is_an_image(tmp_path):
    for ext in (".ppm", ".pgm", ".pbm", ".png"):
        Image.new("L" if ext != ".ppm" else "RGB", (8, 8)).convert("1" if ext == ".pbm" else
                                                                  ("RGB" if ext == ".ppm" else "L")).save(tmp_path / f"a{ext}")
    assert sorted(p.suffix for p in list_images(tmp_path)) == [".pbm", ".pgm", ".png", ".ppm"]


def test_bad_files_are_counted_across_workers_and_fail_in_one_line(tmp_path):
    from vqtransformer.training.loop import InfiniteLoader

    paths = [_good(tmp_path / f"g{i}.png", 10 * i) for i in range(8)]
    for i in (1, 3, 5, 7):  # corrupt every other file
        paths[i].write_bytes(b"not an image")
    ds = ImagePaths(paths, 16, train=True, max_bad_fraction=0.9)
    cfg = OmegaConf.create({"trainer": {"seed": 0}, "data": {"batch_size": 2, "num_workers": 2}})
    loader = InfiniteLoader(ds, cfg, 0, 1, pin=False)
    for _ in range(4):
        next(loader)
    assert ds.bad == {1, 3, 5, 7}  # seen by the main process, whichever worker found them
    strict = ImagePaths(paths, 16, train=True, max_bad_fraction=0.1)
    loader = InfiniteLoader(strict, cfg, 0, 1, pin=False)
    with pytest.raises(DataError) as e:
        for _ in range(8):
            next(loader)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value), str(e.value)
    assert "images are unreadable" in str(e.value) and "data.max_bad_fraction=0.1" in str(e.value)


def test_a_folder_with_bad_files_non_utf8_names_and_pnm_trains_with_workers(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(14):
        _good(data / f"img{i}.{'ppm' if i % 2 else 'png'}", 15 * i, (20, 20))
    write_huge_png(data / "huge.png")
    bad_name = os.fsdecode(bytes(data) + b"/bad\xff.png")  # not valid UTF-8
    Path(bad_name).write_bytes(b"garbage")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    r = run_train(FOLDER_TINY + ["data=folder", f"data.root={data}", "data.num_workers=2", "data.max_bad_fraction=0.2",
                          "data.val_fraction=0.2", "trainer.max_steps=4", "trainer.val_every=4",
                          f"logger.tracking_uri={uri}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "bad\\xff.png" in log and "huge.png" in log and "max_image_pixels" in log
    assert "Logging error" not in r.stderr and "UnicodeEncodeError" not in r.stderr
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED"


def test_a_dataset_of_unreadable_files_fails_before_any_mlflow_run(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(10):
        (data / f"x{i}.png").write_bytes(b"garbage")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_train(FOLDER_TINY + ["data=folder", f"data.root={data}", "data.num_workers=2", "trainer.max_steps=4",
                          f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and "unreadable" in lines[0] and "data.max_bad_fraction" in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists() or not _runs(uri)


# -- 9: bad config values ----------------------------------------------------------------------------
def _bad_values(spec) -> list:
    kind, lo, hi = spec
    kind = kind.rstrip("?")
    if kind == "choice":
        return ["bogus"]
    if kind == "bool":
        return ["maybe"]
    if kind == "str":
        return []
    out = ["abc"] if kind in ("int", "float") else ["abc", "[a,b]"]
    if kind == "int" and lo is not None:
        out.append(lo - 1)
    if kind == "int":
        out.append(1.5)
    if kind == "float" and lo is not None:
        out.append(-1 if lo == _GT0 else lo - 1)
    if kind == "float" and hi is not None:
        out.append(hi + 1)
    if kind.startswith("list") and lo is not None:
        out.append(f"[{-1 if lo == _GT0 else lo - 1}]")
    return out


def _base(key: str) -> list[str]:
    if key.startswith("transformer.") or key in ("first_stage.ckpt", "first_stage.run_id"):
        return ["stage=transformer", "first_stage.ckpt=/x.ckpt"]
    if key in ("data.root", "data.val_fraction"):
        return ["data=folder", "data.root=/x"]
    return []


CASES = [(k, v) for k, spec in SCHEMA.items() for v in _bad_values(spec)]


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_a_bad_value_of_a_public_key_is_refused_naming_the_key(key, value):
    cfg = compose(_base(key) + [f"{key}={value}"])
    assert OmegaConf.select(cfg, key) is not None
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and "\n" not in msg, msg


def test_every_public_key_of_the_readme_has_a_schema_entry():
    for key in ("data.resolution", "data.batch_size", "data.num_workers", "data.max_bad_fraction", "data.target",
                "data.max_objects", "data.background", "data.object_scale", "data.seed", "data.val_fraction",
                "trainer.max_steps", "trainer.val_every", "trainer.ckpt_every", "trainer.mixed_precision",
                "trainer.grad_accum", "trainer.seed", "codebook.n_embed", "codebook.embed_dim", "codebook.ema",
                "codebook.beta", "codebook.dead_after", "first_stage.loss.disc_start", "first_stage.learning_rate",
                "first_stage.loss.disc_pretrain_steps", "first_stage.loss.disc_ramp_steps", "data.max_image_pixels",
                "logger.tracking_uri", "logger.experiment_name", "logger.flush_timeout", "logger.finish_timeout"):
        assert key in SCHEMA, key


@pytest.mark.parametrize("args,needle", [
    (["trainer.max_steps=abc"], "error: trainer.max_steps='abc' must be an integer >= 1"),
    (["first_stage.learning_rate=-1"], "error: first_stage.learning_rate=-1 must be > 0"),
    (["codebook.ema=maybe"], "error: codebook.ema='maybe' must be true or false"),
    (["data=folder", "data.root=/does/not/exist"], "error: data.root: directory '/does/not/exist' does not exist"),
    (["data=captions", "data.root=/does/not/exist"], "error: data.root: directory '/does/not/exist' does not exist"),
    (["data=captions", "data.root=.", "data.captions_file=nope.jsonl"],
     "error: data.captions_file: file 'nope.jsonl' does not exist"),
    (["trainer.resume=/does/not/exist"], "error: trainer.resume=/does/not/exist: no checkpoint there"),
])
def test_a_config_error_exits_2_in_one_line_and_leaves_no_directory_and_no_run(tmp_path, args, needle):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_train(args + [f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(needle), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "outputs").exists()


# -- 10: checkpoints that are not plain data ------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_checkpoint_is_refused_in_one_line_without_suggesting_the_unsafe_path(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"step": 1, "x": _Payload(marker)}, evil)
    with pytest.raises(ckpt_io.CheckpointError) as e:
        ckpt_io.load(evil)
    msg = str(e.value)
    assert msg == (f"checkpoint '{evil}' is refused: it contains code or objects that are not safe to load "
                   "(posix.system) (only tensors, numbers, strings, lists and dicts are read, and Lightning's callback "
                   "and OmegaConf entries as plain data)")
    assert not marker.exists()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_train(TINY + [f"trainer.resume={evil}", f"logger.tracking_uri={uri}",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2
    lines = _error_lines(r.stderr)
    assert lines == [f"error: {msg}"], lines
    assert "weights_only=False" not in r.stderr + r.stdout and not marker.exists()
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
