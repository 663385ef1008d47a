"""``captions``: images with captions, for text-to-image training (``conditioning=text``).

``data.layout`` says where the captions are:

* ``folder``: every image under ``data.root`` (recursive, any format the ``folder`` dataset reads)
  with a same-name ``.txt`` beside it (``cat.png`` -> ``cat.txt``), one caption per line;
* ``filelist``: ``data.captions_file``, JSONL (one ``{"file": ..., "caption": ...}`` per line, the
  caption a string or a list of strings) or CSV (``.csv``, header ``file,caption``, one caption a
  row); ``file`` relative to ``data.root`` (or absolute); rows naming the same file add captions;
* ``coco``: ``data.captions_file``, a COCO captions JSON (``images`` ``[{id, file_name}]`` and
  ``annotations`` ``[{image_id, caption}]``), ``file_name`` relative to ``data.root``;
* ``auto`` (default): ``data.captions_file`` given: ``.json`` -> coco, else filelist. Not given:
  folder when any image has a ``.txt`` beside it, else the one captions file at the top of
  ``data.root`` (``*.jsonl``, ``*.csv``, ``*.json``, or ``annotations/*.json``).

Items are those of the ``folder`` dataset (:class:`~vqtransformer.data.images.ImagePaths`: ``image``
in [-1, 1], ``index``, ``class_label`` for class subfolders in the folder layout; the same transforms
and bad-image handling) plus ``caption``, a str. Whitespace runs in a caption become one space.

**One of several captions.** A training item draws one of its image's captions per epoch: epoch
``e`` of an image with ``n`` captions takes position ``e mod n`` of a permutation of its captions
seeded by (``data.seed``, the image's path relative to ``data.root``, ``e // n``), so every caption
is used once every ``n`` epochs, in a random but reproducible order. The epoch is the one the
training loop gives :meth:`CaptionedImages.set_epoch` before each pass (its resumable position, so
a resumed run draws what an uninterrupted one would). Validation items always take their first caption.

**Bad inputs** are found when the dataset is built (never mid-epoch): an image without a caption
file / annotation, one whose captions are all empty (whitespace-only lines are ignored), one whose
caption file is not UTF-8 is skipped; the skips are counted in one warning naming examples (up to
20 of the non-UTF-8 files); with ``data.skip_missing_captions=false`` any of them is an error. A caption line
that is not UTF-8 in a file that has other captions is dropped with a warning. An image that a
captions file names but that does not exist, a malformed captions file and no usable item at all
are errors naming the key (``data.captions_file``, ``data.root``) and the file.

**Split**: as ``data=folder``: ``data.train_dir`` / ``data.val_dir`` (folder layout), else the
hashed, class-stratified hold-out of ``data.val_fraction`` (:func:`vqtransformer.data.splits.holdout`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from vqtransformer.data.images import DataError, ImagePaths, folder_dataset, list_images, safe_name
from vqtransformer.data.splits import holdout

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "folder", "filelist", "coco")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_SHOWN = 5  # example names per skip reason in messages (non-UTF-8 files: up to _SHOWN_UNDECODABLE)
_SHOWN_UNDECODABLE = 20
_warned: set[str] = set()  # one message per process (train, validation and the vocabulary scan alike)


def _warn_once(message: str, level: int = logging.WARNING) -> None:
    if message not in _warned:
        _warned.add(message)
        log.log(level, "%s", message)


def clean_caption(text: str) -> str:
    """Runs of whitespace (newlines included) as one space, stripped."""
    return " ".join(text.split())


def _utf8(text: str) -> bool:
    """False for text decoded with ``surrogateescape`` from bytes that are not UTF-8 (or with lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _decode(raw: bytes) -> str:
    """UTF-8 (a BOM dropped); bytes that are not UTF-8 kept as surrogates, found by :func:`_utf8`."""
    return raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")


@dataclass
class _Entry:
    """The captions found for one image, and what was wrong with the others."""
    captions: list[str] = field(default_factory=list)
    empty: int = 0
    undecodable: list[str] = field(default_factory=list)  # where: "x.txt line 2", "captions.jsonl line 7"
    where: str = ""  # where the image is named (a captions file line), for messages

    def add(self, text, where: str) -> None:
        if text is None:
            self.empty += 1
        elif not _utf8(text):
            self.undecodable.append(where)
        elif not clean_caption(text):
            self.empty += 1
        elif clean_caption(text) not in self.captions:  # a repeated caption is one
            self.captions.append(clean_caption(text))


@dataclass
class Scan:
    """Usable images and their captions, in a fixed order, and the skip counts."""
    paths: list[Path]
    captions: list[tuple[str, ...]]
    labels: list[int] | None
    classes: list[str] | None
    missing: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # non-UTF-8 captions dropped from images that are kept
    missing_what: str = "no caption"  # what a missing image lacks, for messages

    def skipped(self) -> int:
        return len(self.missing) + len(self.empty) + len(self.undecodable)


def _examples(names: list[str], n: int = _SHOWN) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _collect(images: list[tuple[Path, str, _Entry | None]], labels=None, classes=None,
             missing_what: str = "no caption") -> Scan:
    """Images with their entries -> a :class:`Scan` of those with at least one usable caption."""
    out = Scan([], [], [] if labels is not None else None, classes, missing_what=missing_what)
    for k, (path, name, entry) in enumerate(images):
        if entry is None:
            out.missing.append(name)
        elif entry.captions:
            out.paths.append(path)
            out.captions.append(tuple(entry.captions))
            if labels is not None:
                out.labels.append(labels[k])
            out.dropped += entry.undecodable
        elif entry.undecodable:  # one name per image
            bad = entry.undecodable
            out.undecodable.append(bad[0] if len(bad) == 1 else f"{name} ({', '.join(bad)})")
        else:
            out.empty.append(name)
    return out


def _skip_summary(scan: Scan) -> str:
    parts = []
    if scan.missing:
        parts.append(f"{len(scan.missing)} with {scan.missing_what} (e.g. {_examples(scan.missing)})")
    if scan.empty:
        parts.append(f"{len(scan.empty)} whose captions are all empty (e.g. {_examples(scan.empty)})")
    if scan.undecodable:
        parts.append(f"{len(scan.undecodable)} whose captions are not UTF-8 text "
                     f"({_examples(scan.undecodable, _SHOWN_UNDECODABLE)})")
    return "; ".join(parts)


# -- the three layouts ---------------------------------------------------------------------------------

def _rel(path: Path, root: Path) -> str:
    try:
        return safe_name(path.relative_to(root).as_posix())
    except ValueError:
        return safe_name(path)


def scan_folder(root: Path, key: str = "data.root") -> Scan:
    """Images under ``root`` (the ``folder`` dataset's scan and class subfolders) with a ``.txt`` beside each."""
    base = folder_dataset(root, 8, False, key=key)  # listing and classes only: no image is opened
    images = []
    for path in base.paths:
        txt = path.with_suffix(".txt")
        name = _rel(path, root)
        if not txt.is_file():
            images.append((path, name, None))
            continue
        entry, where = _Entry(), _rel(txt, root)
        lines = _LINE_BREAK.split(_decode(txt.read_bytes()))
        for n, line in enumerate(lines, 1):
            entry.add(line, f"{where} line {n}" if len(lines) > 1 else where)
        if entry.undecodable and not entry.captions:
            entry.undecodable = [where]  # the whole file is skipped: name it once
        images.append((path, name, entry))
    return _collect(images, base.labels, base.classes, "no .txt beside it")


def _resolve(file: str, root: Path) -> Path:
    p = Path(file).expanduser()
    return p if p.is_absolute() else root / p


def _captions_of(value, where: str, source: str) -> list:
    if value is None or isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
        return value or [None]
    raise DataError(f"data.captions_file: {source} {where}: 'caption' must be a string or a list of strings, "
                    f"not {type(value).__name__}")


def scan_filelist(captions_file: Path, root: Path) -> Scan:
    """JSONL (``{"file", "caption"}`` per line) or, for ``.csv``, CSV with a ``file,caption`` header."""
    text = _decode(captions_file.read_bytes())
    source = f"'{safe_name(captions_file)}'"
    entries: dict[Path, _Entry] = {}

    def add(file, caption, n: int) -> None:
        if not isinstance(file, str) or not file.strip():
            raise DataError(f"data.captions_file: {source} line {n} has no 'file' (the image path, relative to "
                            "data.root)")
        path = _resolve(file.strip(), root)
        entry = entries.setdefault(path, _Entry(where=f"line {n}"))
        for c in _captions_of(caption, f"line {n}", source):
            entry.add(c, f"{captions_file.name} line {n} ({safe_name(file.strip())})")

    if captions_file.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        names = [(f or "").strip() for f in (reader.fieldnames or [])]
        if "file" not in names or "caption" not in names:
            raise DataError(f"data.captions_file: CSV {source} has the columns {names}; it needs a header "
                            "row with the columns file,caption")
        reader.fieldnames = names
        for row in reader:
            add(row.get("file"), row.get("caption"), reader.line_num)
    else:
        for n, line in enumerate(_LINE_BREAK.split(text), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"data.captions_file: {source} line {n} is not JSON ({e.msg}); each line must be "
                                '{"file": "path/to/image.png", "caption": "..."} (a .csv file is read as CSV)') from None
            if not isinstance(obj, dict):
                raise DataError(f"data.captions_file: {source} line {n} is not a JSON object with 'file' and 'caption'")
            add(obj.get("file"), obj.get("caption"), n)
    return _checked([(p, _rel(p, root), e) for p, e in entries.items()], captions_file, root)


def scan_coco(captions_file: Path, root: Path) -> Scan:
    """A COCO captions JSON: ``images`` [{id, file_name}], ``annotations`` [{image_id, caption}]."""
    source = f"'{safe_name(captions_file)}'"
    try:
        data = json.loads(_decode(captions_file.read_bytes()))
    except json.JSONDecodeError as e:
        raise DataError(f"data.captions_file: {source} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise DataError(f"data.captions_file: {source} is not a COCO captions JSON: it needs the lists 'images' "
                        "([{id, file_name}]) and 'annotations' ([{image_id, caption}]); for JSONL or CSV set "
                        "data.layout=filelist")
    by_id: dict = {}
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"data.captions_file: {source} images[{k}] has no 'id' and 'file_name'")
        by_id[im["id"]] = im["file_name"]
    entries: dict = {}
    unknown = 0
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise DataError(f"data.captions_file: {source} annotations[{k}] has no 'image_id'")
        if ann["image_id"] not in by_id:
            unknown += 1
            continue
        entry = entries.setdefault(ann["image_id"], _Entry(where=f"image id {ann['image_id']}"))
        for c in _captions_of(ann.get("caption"), f"annotations[{k}]", source):
            entry.add(c, f"{safe_name(by_id[ann['image_id']])} (annotations[{k}])")
    if unknown:
        _warn_once(f"data.captions_file: {source}: {unknown} annotations name an image id that 'images' does not "
                   "list; they are ignored")
    merged: dict[Path, tuple[str, _Entry | None]] = {}
    for image_id, file_name in by_id.items():
        path = _resolve(file_name, root)
        name, entry = merged.get(path, (_rel(path, root), None))
        new = entries.get(image_id)
        if new is not None:
            if entry is None:
                entry = new
            else:
                for c in new.captions:
                    entry.add(c, new.where)
                entry.empty += new.empty
                entry.undecodable += new.undecodable
        merged[path] = (name, entry)
    return _checked([(p, name, e) for p, (name, e) in merged.items()], captions_file, root,
                    "no annotation in data.captions_file")


def _checked(images: list[tuple[Path, str, _Entry | None]], captions_file: Path, root: Path,
             missing_what: str = "no caption") -> Scan:
    """Refuse images that a captions file names (with a usable caption) but that do not exist."""
    scan = _collect(images, missing_what=missing_what)
    where = {p: e.where for p, _, e in images if e is not None}
    absent = [p for p in scan.paths if not p.is_file()]
    if absent:
        shown = ", ".join(f"'{_rel(p, root)}' ({where.get(p, '')})" for p in absent[:_SHOWN])
        more = f", ... ({len(absent) - _SHOWN} more)" if len(absent) > _SHOWN else ""
        raise DataError(f"data.captions_file: '{safe_name(captions_file)}' names {len(absent)} "
                        f"{'images that do' if len(absent) > 1 else 'image that does'} not exist under "
                        f"data.root='{safe_name(root)}': "
                        f"{shown}{more}; fix data.root (file names are relative to it) or the captions file")
    return scan


# -- layout detection ---------------------------------------------------------------------------------

def _candidates(root: Path) -> list[Path]:
    found = [p for pattern in ("*.jsonl", "*.csv", "*.json") for p in sorted(root.glob(pattern)) if p.is_file()]
    return found + sorted(p for p in (root / "annotations").glob("*.json") if p.is_file())


def _file_layout(path: Path) -> str:
    return "coco" if path.suffix.lower() == ".json" else "filelist"


def resolve_layout(cfg: DictConfig, root: Path) -> tuple[str, Path | None]:
    """(layout, captions file or None) from ``data.layout`` and ``data.captions_file``."""
    layout = str(cfg.get("layout") or "auto")
    if layout not in LAYOUTS:
        raise DataError(f"data.layout={layout} is unknown; choose {', '.join(LAYOUTS)}")
    file = cfg.get("captions_file")
    if file:
        path = Path(str(file)).expanduser()
        if not path.is_absolute() and not path.is_file() and (root / path).is_file():
            path = root / path  # relative to the working directory, else to data.root
        if not path.is_file():
            raise DataError(f"data.captions_file: '{safe_name(path)}' does not exist (a relative path is looked for "
                            f"in the working directory, then in data.root='{safe_name(root)}')")
        if layout == "folder":
            raise DataError(f"data.layout=folder reads the .txt beside each image; data.captions_file='{file}' is "
                            "for data.layout=filelist or coco (or auto)")
        return (_file_layout(path) if layout == "auto" else layout), path
    if layout in ("filelist", "coco"):
        raise DataError(f"data.layout={layout} needs data.captions_file (a "
                        f"{'JSONL or CSV file' if layout == 'filelist' else 'COCO captions JSON'})")
    if layout == "folder" or not root.is_dir():
        return "folder", None
    candidates = _candidates(root)
    if not candidates or any(p.with_suffix(".txt").is_file() for p in list_images(root)):
        if candidates:
            _warn_once(f"data.layout=auto: using the .txt beside the images under {safe_name(root)} (set "
                       f"data.captions_file={safe_name(candidates[0])} to read that file instead)", logging.INFO)
        return "folder", None
    if len(candidates) > 1:
        raise DataError(f"data.layout=auto: data.root='{safe_name(root)}' has no .txt captions beside its images "
                        f"and several captions files ({', '.join(_rel(p, root) for p in candidates)}); set "
                        "data.captions_file to one of them")
    _warn_once(f"data.layout=auto: captions from {safe_name(candidates[0])}", logging.INFO)
    return _file_layout(candidates[0]), candidates[0]


_LOOKED_FOR = {
    "folder": "a non-empty UTF-8 .txt of the same name beside each image (x.png -> x.txt, one caption per line)",
    "filelist": 'lines {"file": ..., "caption": ...} (JSONL) or rows file,caption (CSV) naming images under data.root',
    "coco": "'images' [{id, file_name}] with 'annotations' [{image_id, caption}] naming images under data.root",
}


def scan(cfg: DictConfig, root: Path, key: str = "data.root") -> tuple[Scan, str]:
    """The usable captioned images of ``cfg`` under ``root``, skips reported (or refused), and the layout."""
    root = Path(root).expanduser()
    layout, captions_file = resolve_layout(cfg, root)
    if layout != "folder" and not root.is_dir():
        raise DataError(f"{key}: directory '{safe_name(root)}' does not exist; set {key}=/path/to/images (the "
                        "captions file's image paths are relative to it)")
    if layout == "folder":
        result = scan_folder(root, key)
    elif layout == "filelist":
        result = scan_filelist(captions_file, root)
    else:
        result = scan_coco(captions_file, root)
    where = f"{key}='{safe_name(root)}'" + (f", data.captions_file='{safe_name(captions_file)}'" if captions_file else "")
    given = str(cfg.get("layout") or "auto")
    what = f"data.layout={layout}" + (" (auto)" if given == "auto" else "")
    if result.dropped:
        _warn_once(f"data=captions ({what}, {where}): dropped {len(result.dropped)} caption(s) that are not UTF-8 "
                   f"text (their images keep their other captions): {_examples(result.dropped, _SHOWN_UNDECODABLE)}")
    if result.skipped():
        total = result.skipped() + len(result.paths)
        summary = f"data=captions ({what}, {where}): {result.skipped()} of {total} images have no usable caption: " \
                  f"{_skip_summary(result)}"
        if not cfg.get("skip_missing_captions", True):
            raise DataError(f"{summary} (data.skip_missing_captions=false; set it to true to skip them)")
        if result.paths:
            _warn_once(f"{summary}; skipped")
    if not result.paths:
        also = (" (data.layout=auto also looks for one captions file at the top of data.root: *.jsonl, *.csv, "
                "COCO *.json or annotations/*.json)") if given == "auto" and layout == "folder" else ""
        skipped = f": {_skip_summary(result)}" if result.skipped() else ""
        raise DataError(f"data=captions ({what}, {where}): no usable captioned image; looked for "
                        f"{_LOOKED_FOR[layout]}{also}{skipped}")
    return result, layout


# -- the dataset -------------------------------------------------------------------------------------

def draw(n: int, key: bytes, seed: int, epoch: int) -> int:
    """Which of ``n`` captions epoch ``epoch`` takes: position ``epoch mod n`` of a permutation seeded by
    (seed, key, epoch // n), so each caption once every ``n`` epochs (see the module docstring)."""
    if n <= 1:
        return 0
    cycle, pos = divmod(int(epoch), n)
    order = list(range(n))
    random.Random(b"%d\0%s\0%d" % (int(seed), key, cycle)).shuffle(order)
    return order[pos]


class CaptionedImages(ImagePaths):
    """:class:`ImagePaths` whose items also carry ``caption``: one of the image's captions (see the module
    docstring for how a training item draws one per epoch; validation: the first)."""

    def __init__(self, paths: list[Path], captions: list[tuple[str, ...]], resolution: int, train: bool,
                 root: Path | None = None, labels: list[int] | None = None, classes: list[str] | None = None, **kw):
        if len(captions) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(captions)} caption tuples")
        if any(not c for c in captions):
            raise ValueError("every image needs at least one caption")
        self.captions = [tuple(c) for c in captions]
        self.root = Path(root) if root is not None else None
        super().__init__(paths, resolution, train, labels, classes, **kw)
        self.epoch = 0  # set by the training loop before each pass (DataLoader workers start from a copy)

    @property
    def paths(self) -> list[Path]:
        return self._paths

    @paths.setter
    def paths(self, paths: list[Path]) -> None:
        ImagePaths.paths.fset(self, paths)  # the shared bad-file bitmap
        self._keys = [os.fsencode(_rel(p, self.root) if self.root is not None else str(p)) for p in self._paths]

    def set_epoch(self, epoch: int) -> None:
        """Draw the captions of training epoch ``epoch`` from now on."""
        self.epoch = int(epoch)

    def all_captions(self, index: int) -> tuple[str, ...]:
        return self.captions[index]

    def caption(self, index: int) -> str:
        """The caption item ``index`` has now (training: this epoch's draw), without reading the image."""
        caps = self.captions[index]
        if not self.train:
            return caps[0]
        return caps[draw(len(caps), self._keys[index], self.seed, self.epoch)]

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        i = int(item["index"])  # a bad image is replaced by the next readable one: its own caption
        item["caption"] = self.caption(i)
        return item


def captioned_dataset(cfg: DictConfig, train: bool, **common) -> CaptionedImages:
    """``data=captions``: the training or validation side (``common``: the crop / flip / bad-file options)."""
    if not cfg.get("root"):
        raise DataError("data.root is not set; point it at the directory of the captioned images")
    root = Path(str(cfg.root)).expanduser()
    seed = int(cfg.get("seed", 0))
    sub = cfg.get("train_dir" if train else "val_dir")
    if cfg.get("val_dir") or cfg.get("train_dir"):
        if cfg.get("layout", "auto") not in ("auto", "folder") or cfg.get("captions_file"):
            raise DataError("data.train_dir / data.val_dir are folders of data.layout=folder; with a captions file "
                            "the validation split is the hashed hold-out of data.val_fraction (unset them)")
    if sub:
        key = f"data.{'train' if train else 'val'}_dir"
        found, layout = scan(cfg, root / sub, key)
        ds = CaptionedImages(found.paths, found.captions, cfg.resolution, train, root / sub, found.labels,
                             found.classes, seed=seed, **common)
        ds.split_rule, ds.layout = f"{key}, layout={layout}", layout
        return ds
    found, layout = scan(cfg, root)
    fraction = cfg.get("val_fraction", 0.02)
    train_idx, val_idx = holdout(found.paths, root, fraction, seed, found.labels)
    keep = train_idx if train else val_idx
    labels = [found.labels[i] for i in keep] if found.labels is not None else None
    ds = CaptionedImages([found.paths[i] for i in keep], [found.captions[i] for i in keep], cfg.resolution, train,
                         root, labels, found.classes, seed=seed, **common)
    ds.split_rule = (f"hashed holdout val_fraction={fraction} seed={seed}{' per class' if labels is not None else ''}"
                     f", layout={layout}")
    ds.layout = layout
    return ds
