"""Image-text retrieval benchmarks on disk: Flickr30k, COCO (Karpathy split) and Multi30K.

Readers for every layout a user may have, all producing one `RetrievalSet` (captions, images, and
where the images' region features are):

Captions
- Karpathy split file ``dataset_flickr30k.json`` / ``dataset_coco.json``: ``images[*]`` with ``filename``,
  optional ``filepath`` (COCO: ``val2014``), ``split`` and ``sentences[*].{raw, tokens, sentid}``
  (`read_karpathy`).
- UNITER / LightningDOT text DB ``itm_<set>_<split>[_base-cased].db``: an LMDB of ``lz4(msgpack(dict))``
  keyed by sentence id (``input_ids`` word-pieces without [CLS]/[SEP], ``img_fname``, ``raw``), with
  ``meta.json`` (CLS/SEP ids, ``v_range``), ``id2len.json``, ``txt2img.json``, ``img2txts.json``
  (`UniterTextDB`, `read_uniter_text_db`). Every caption is kept, however long (the official evaluation
  reads the test DB with ``max_txt_len=-1``).
- Multi30K (github multi30k/dataset, task 1): ``test_2016_flickr.{de,fr,cs,en}[.gz]`` (one caption a
  line) aligned with the image list ``test_2016_flickr.txt`` (`read_multi30k`).

Images
- A UNITER image DB folder (``feat_th0.2_max100_min10`` LMDB + ``nbb_th0.2_max100_min10.json``), keyed
  by UNITER names (``flickr30k_001000092795.npz``, ``coco_val2014_000000391895.npz``: `uniter_image_key`).
- The image files: their features are extracted once with the detector into a UNITER image DB under
  ``<LDOT_HOME>/features/`` (`feature_cache_dir`, `ensure_features`), keyed by the file's relative path.

Order: images keep the order of the Karpathy file / ``img2txts.json`` / the Multi30K image list (COCO's
1K folds are consecutive blocks of it); captions keep the file's order. Images without any caption are
dropped (the official code only knows images through their captions).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from models.errors import LdotError

DATASETS = ("flickr30k", "coco", "multi30k")
MULTI30K_LANGS = ("de", "fr", "cs", "en")
UNITER_FEATURE_DB = "feat_th0.2_max100_min10"  # the UNITER/LightningDOT box cut (conf > 0.2, 10..100 boxes)
UNITER_NBB_FILE = "nbb_th0.2_max100_min10.json"


class DatasetError(LdotError):
    """A benchmark file is missing or malformed (the message names the file and what was expected)."""


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class EvalImage:
    """One image of a benchmark."""

    file: str  # path relative to the image folder, as the Karpathy file names it ("val2014/COCO_val2014_….jpg")
    key: str  # key of its region features in `RetrievalSet.image_db`


@dataclass(frozen=True)
class Caption:
    """One caption and the image it describes."""

    id: str  # sentence id: Karpathy ``sentid``, text-DB key, or ``<lang>:<line>`` for Multi30K
    text: str  # the raw caption
    image: int  # index of its image in `RetrievalSet.images`
    token_ids: tuple[int, ...] | None = None  # word-pieces without [CLS]/[SEP] (UNITER text DB only)


@dataclass
class RetrievalSet:
    """A retrieval benchmark ready to evaluate: captions, images, and where the images' features are."""

    dataset: str  # flickr30k | coco | multi30k
    split: str  # test | val
    images: list[EvalImage]
    captions: list[Caption]
    image_db: Path | None = None  # UNITER image DB with every image's features (None: extract first)
    image_root: Path | None = None  # folder of the image files, when features come from them
    text_meta: dict[str, Any] | None = None  # UNITER text DB meta.json (CLS, SEP, v_range) for token ids
    lang: str | None = None  # Multi30K caption language
    sources: dict[str, str] = field(default_factory=dict)  # what was read, for reports

    @property
    def caption_images(self) -> list[int]:
        """Image index of every caption, in caption order."""
        return [c.image for c in self.captions]

    def image_paths(self) -> list[Path]:
        """The image files (raw layout only)."""
        if self.image_root is None:
            raise DatasetError("this benchmark reads its features from a UNITER image DB: it has no image files")
        return [resolve_image_file(self.image_root, im.file) for im in self.images]


def _captioned(files: Sequence[str], captions: Sequence[tuple[str, str, int, tuple[int, ...] | None]],
               key_of: Callable[[str], str]) -> tuple[list[EvalImage], list[Caption]]:
    """Drop images without captions and renumber: (files, (id, text, file index, ids)) -> records."""
    used = sorted({c[2] for c in captions})
    new_index = {old: new for new, old in enumerate(used)}
    images = [EvalImage(files[i], key_of(files[i])) for i in used]
    return images, [Caption(cid, text, new_index[img], ids) for cid, text, img, ids in captions]


# ------------------------------------------------------------------------------------------ UNITER names
def uniter_image_key(dataset: str, file: str) -> str:
    """The UNITER image-DB key of an image file (UNITER's ``prepro.py`` naming).

    ``1000092795.jpg`` -> ``flickr30k_001000092795.npz``;
    ``val2014/COCO_val2014_000000391895.jpg`` -> ``coco_val2014_000000391895.npz``.
    """
    stem = PurePosixPath(file).stem
    try:
        if dataset in ("flickr30k", "multi30k"):
            return f"flickr30k_{int(stem):012d}.npz"
        match = re.fullmatch(r"COCO_([a-z]+\d{4})_(\d+)", stem, flags=re.IGNORECASE)
        if match:
            return f"coco_{match.group(1).lower()}_{int(match.group(2)):012d}.npz"
    except ValueError:
        pass
    raise DatasetError(f"image file name {file!r} does not follow the {dataset} naming, so its UNITER feature "
                       "key is unknown (pass --images to extract features from the files instead)")


def image_file_from_uniter_key(key: str) -> str:
    """Inverse of `uniter_image_key`: the image file a UNITER key stands for."""
    match = re.fullmatch(r"flickr30k_(\d+)\.npz", key)
    if match:
        return f"{int(match.group(1))}.jpg"
    match = re.fullmatch(r"coco_([a-z]+\d{4})_(\d+)\.npz", key)
    if match:
        split = match.group(1)
        return f"{split}/COCO_{split}_{int(match.group(2)):012d}.jpg"
    raise DatasetError(f"UNITER image name {key!r} is neither flickr30k_<id>.npz nor coco_<split>_<id>.npz, "
                       "so its image file is unknown (pass --img-db with the matching image DB)")


def _file_or_key(key: str) -> str:
    """The image file a UNITER key names, or the key itself when it follows no known naming."""
    try:
        return image_file_from_uniter_key(key)
    except DatasetError:
        return key


# ------------------------------------------------------------------------------------------ Karpathy
def _load_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist (expected {what})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}); expected {what}") from None


def read_karpathy(path: str | Path, split: str = "test") -> tuple[list[str], list[tuple[str, str, int, None]]]:
    """Image files and captions of one split of a Karpathy split file.

    Returns ``(files, captions)``: ``files[i]`` is ``filepath/filename`` (or ``filename``), and each
    caption is ``(sentid, raw text, index into files, None)``. Every listed sentence is kept.
    """
    path = Path(path)
    what = "a Karpathy split file: {images: [{filename, split, sentences: [{raw, sentid}]}]}"
    data = _load_json(path, what)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path} has no 'images' list; expected {what}")
    files: list[str] = []
    captions: list[tuple[str, str, int, None]] = []
    for n, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("split"), str):
            raise DatasetError(f"{path}: images[{n}] has no 'split'; expected {what}")
        if entry["split"] != split:
            continue
        filename, sentences = entry.get("filename"), entry.get("sentences")
        if not isinstance(filename, str) or not filename or not isinstance(sentences, list):
            raise DatasetError(f"{path}: images[{n}] lacks a 'filename' or a 'sentences' list; expected {what}")
        filepath = entry.get("filepath")
        file = f"{filepath}/{filename}" if isinstance(filepath, str) and filepath else filename
        for m, sent in enumerate(sentences):
            text = sent.get("raw") if isinstance(sent, dict) else None
            if not isinstance(text, str) and isinstance(sent, dict) and isinstance(sent.get("tokens"), list):
                text = " ".join(str(t) for t in sent["tokens"])
            if not isinstance(text, str) or not isinstance(sent.get("sentid"), (int, str)):
                raise DatasetError(f"{path}: images[{n}].sentences[{m}] lacks 'raw' text or a 'sentid'")
            captions.append((str(sent["sentid"]), text.strip(), len(files), None))
        files.append(file)
    if not captions:
        splits = sorted({e.get("split") for e in data["images"] if isinstance(e, dict)} - {None})
        raise DatasetError(f"{path} has no captioned image in split {split!r} (splits there: {', '.join(splits)})")
    return files, captions


# ------------------------------------------------------------------------------------------ UNITER text DB
class UniterTextDB:
    """Read a UNITER / LightningDOT text DB (LMDB of ``lz4(msgpack(dict))`` keyed by sentence id).

    ``db.ids`` (``id2len.json`` order), ``db[id]`` -> the record dict, ``db.meta`` (``meta.json``),
    ``db.txt2img`` / ``db.img2txts`` (the sidecars), ``db.input_ids(id)`` -> ``[CLS] ids [SEP]`` as the
    official ``combine_inputs`` builds it. Records are decoded by plain msgpack: nothing is unpickled.
    """

    def __init__(self, db_dir: str | Path) -> None:
        self.db_dir = Path(db_dir)
        if not (self.db_dir / "data.mdb").is_file():
            raise DatasetError(f"{self.db_dir} is not a UNITER text DB (no data.mdb: expected an LMDB folder "
                               "itm_<set>_<split>.db with meta.json, id2len.json, txt2img.json)")
        self.meta = self._sidecar("meta.json", dict, "the DB's meta: {CLS, SEP, v_range, ...}")
        for name in ("CLS", "SEP"):
            if not isinstance(self.meta.get(name), int):
                raise DatasetError(f"{self.db_dir / 'meta.json'} lacks the integer {name!r} token id")
        id2len = self._sidecar("id2len.json", dict, "{sentence id: number of word-pieces}")
        self.ids: list[str] = [str(k) for k in id2len]
        self.txt2img: dict[str, str] = self._sidecar("txt2img.json", dict, "{sentence id: image file name}")
        img2txts = self.db_dir / "img2txts.json"
        self.img2txts: dict[str, list[str]] | None = (
            self._sidecar("img2txts.json", dict, "{image file name: [sentence ids]}") if img2txts.exists() else None)
        self._env: Any = None

    def _sidecar(self, name: str, kind: type, what: str) -> Any:
        value = _load_json(self.db_dir / name, what)
        if not isinstance(value, kind):
            raise DatasetError(f"{self.db_dir / name} holds a {type(value).__name__}; expected {what}")
        return value

    @property
    def env(self) -> Any:
        if self._env is None:
            import lmdb

            try:
                self._env = lmdb.open(str(self.db_dir), readonly=True, create=False, lock=False, readahead=False)
            except lmdb.Error as exc:
                raise DatasetError(f"cannot open the text DB {self.db_dir}: {exc}") from None
        return self._env

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> UniterTextDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, sent_id: str) -> dict[str, Any]:
        import lz4.frame
        import msgpack

        with self.env.begin(buffers=False) as txn:
            raw = txn.get(str(sent_id).encode("utf-8"))
        if raw is None:
            raise DatasetError(f"text DB {self.db_dir} lists sentence {sent_id!r} in id2len.json but has no record")
        try:
            record = msgpack.unpackb(lz4.frame.decompress(raw), raw=False, strict_map_key=False)
        except Exception as exc:  # lz4 and msgpack raise their own types
            raise DatasetError(f"text DB {self.db_dir}: record {sent_id!r} is not lz4-compressed msgpack "
                               f"({exc})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"text DB {self.db_dir}: record {sent_id!r} is not a dict")
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in record.items()}

    def input_ids(self, sent_id: str) -> list[int]:
        """``[CLS] word-pieces [SEP]`` of a sentence, as the official ``combine_inputs``."""
        return [self.meta["CLS"], *self[sent_id]["input_ids"], self.meta["SEP"]]


def read_uniter_text_db(db_dir: str | Path) -> tuple[list[str], list[tuple[str, str, int, tuple[int, ...]]], dict]:
    """Image names (UNITER keys) and captions of a UNITER text DB, plus its meta.json.

    Images are ordered as ``img2txts.json`` lists them (then by first appearance); captions as
    ``id2len.json``. Each caption is ``(sentence id, raw text, image index, word-piece ids)``.
    """
    with UniterTextDB(db_dir) as db:
        rows = []
        for sent_id in db.ids:
            record = db[sent_id]
            ids, fname = record.get("input_ids"), record.get("img_fname") or db.txt2img.get(sent_id)
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise DatasetError(f"text DB {db.db_dir}: record {sent_id!r} has no integer 'input_ids' list")
            if not isinstance(fname, str):
                raise DatasetError(f"text DB {db.db_dir}: record {sent_id!r} names no image ('img_fname')")
            text = record.get("raw") or record.get("sent") or record.get("caption") or ""
            rows.append((sent_id, str(text).strip(), fname, tuple(ids)))
        order = list(db.img2txts or [])
    seen = {name: i for i, name in enumerate(dict.fromkeys([*order, *(r[2] for r in rows)]))}
    names = list(seen)
    if not rows:
        raise DatasetError(f"text DB {db_dir} holds no caption (id2len.json is empty)")
    return names, [(sid, text, seen[fname], ids) for sid, text, fname, ids in rows], db.meta


# ------------------------------------------------------------------------------------------ Multi30K
def _read_lines(path: Path, what: str) -> list[str]:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                text = handle.read()
        else:
            text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist (expected {what})") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path} ({exc}); expected {what}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_multi30k(captions_file: str | Path, image_list: str | Path,
                  lang: str = "de") -> tuple[list[str], list[tuple[str, str, int, None]]]:
    """Multi30K task-1 captions (one a line) aligned with their image list (one file name a line)."""
    captions_file, image_list = Path(captions_file), Path(image_list)
    texts = _read_lines(captions_file, f"Multi30K captions, one a line ({lang})")
    names = _read_lines(image_list, "the Multi30K image list, one Flickr30k file name a line")
    if len(texts) != len(names):
        raise DatasetError(f"{captions_file} has {len(texts)} lines but {image_list} lists {len(names)} images: "
                           "expected one caption per image, line by line")
    index: dict[str, int] = {}
    captions = []
    for n, (text, name) in enumerate(zip(texts, names), start=1):
        name = name.strip()
        if not name or not text.strip():
            bad = image_list if not name else captions_file
            raise DatasetError(f"{bad}: line {n} is empty; expected one caption / file name per line")
        captions.append((f"{lang}:{n}", text.strip(), index.setdefault(name, len(index)), None))
    return list(index), captions


# ------------------------------------------------------------------------------------------ locating inputs
@dataclass(frozen=True)
class DataPaths:
    """Explicit inputs, each overriding what `locate` would auto-detect under ``data``."""

    data: Path | None = None  # folder to search
    karpathy: Path | None = None  # dataset_<set>.json
    txt_db: Path | None = None  # UNITER text DB folder (itm_<set>_<split>*.db)
    images: Path | None = None  # folder of the image files
    img_db: Path | None = None  # UNITER image DB folder (holding feat_th0.2_max100_min10/)
    captions: Path | None = None  # Multi30K captions file
    image_list: Path | None = None  # Multi30K image list


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _is_image_db(path: Path) -> bool:
    return any((path / name / "data.mdb").is_file() for name in (UNITER_FEATURE_DB, UNITER_FEATURE_DB + "_compressed"))


def find_image_db(data: Path, dataset: str) -> Path | None:
    """A UNITER image DB folder in ``data`` or up to two levels below (preferring the dataset's own name)."""
    level1 = _subdirs(data)
    candidates = [p for p in [data, *level1, *(q for p in level1 for q in _subdirs(p))] if _is_image_db(p)]
    if not candidates:
        return None
    preferred = {"flickr30k": ("flickr30k",), "multi30k": ("flickr30k",), "coco": ("coco_val2014", "coco")}[dataset]
    for name in preferred:
        for cand in candidates:
            if cand.name == name:
                return cand
    if len(candidates) == 1:
        return candidates[0]
    raise DatasetError(f"several UNITER image DBs under {data} ({', '.join(str(c) for c in candidates)}): "
                       "choose one with --img-db")


def find_text_db(data: Path, dataset: str, split: str) -> Path | None:
    """``itm_<set>_<split>*.db`` in ``data``, ``data/txt_db`` or ``data/db`` (``_base-cased`` preferred)."""
    name = {"flickr30k": "flickr30k", "coco": "coco"}.get(dataset)
    if name is None:
        return None
    found = [p for d in (data, data / "txt_db", data / "db") for p in sorted(d.glob(f"itm_{name}_{split}*.db"))
             if (p / "data.mdb").is_file()]
    found.sort(key=lambda p: ("base-cased" not in p.name, len(p.name)))
    return found[0] if found else None


def find_karpathy(data: Path, dataset: str) -> Path | None:
    """``dataset_<set>.json`` in ``data`` or one level below (Karpathy's ``caption_datasets/``)."""
    name = f"dataset_{dataset}.json"
    for cand in [data / name, *(d / name for d in _subdirs(data))]:
        if cand.is_file():
            return cand
    return None


def _find_multi30k_file(data: Path, name: str) -> Path | None:
    task1 = ("data", "task1")
    for base in (data, data.joinpath(*task1), data.joinpath("multi30k", *task1), data.joinpath("dataset", *task1),
                 data / "multi30k"):
        for sub in ("", "raw", "image_splits"):
            for cand in (base / sub / name, base / sub / (name + ".gz")):
                if cand.is_file():
                    return cand
    return None


IMAGE_FOLDERS = {"flickr30k": ("flickr30k-images", "flickr30k_images", "flickr30k/flickr30k-images", "images",
                               "Images", "."),
                 "coco": (".", "images", "coco", "coco/images", "val2014", "images/val2014")}


def resolve_image_file(root: Path, file: str) -> Path:
    """``root/file``, else ``root/<basename>`` (a flat COCO folder)."""
    path = root / file
    if path.is_file() or "/" not in file:
        return path
    flat = root / PurePosixPath(file).name
    return flat if flat.is_file() else path


def find_image_folder(data: Path, dataset: str, first_file: str) -> Path | None:
    """The folder under ``data`` that holds ``first_file``."""
    for rel in IMAGE_FOLDERS["coco" if dataset == "coco" else "flickr30k"]:
        cand = data / rel
        if resolve_image_file(cand, first_file).is_file():
            return cand
    return None


def locate(dataset: str, paths: DataPaths, split: str = "test", lang: str = "de") -> RetrievalSet:
    """Find and read a benchmark's captions and images from explicit paths or under ``paths.data``.

    Captions: ``txt_db`` > ``karpathy`` > (auto) a UNITER text DB > a Karpathy file (Multi30K: its files).
    Images: ``img_db`` > ``images`` > (auto) a UNITER image DB > the image folder.
    """
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("test", "val"):
        raise DatasetError(f"unknown split {split!r} (test or val)")
    data = paths.data
    if data is not None and not data.is_dir():
        raise DatasetError(f"--data {data} is not a folder")
    sources: dict[str, str] = {}
    meta = None
    file_names: list[str] | None = None  # image files, when the captions name files
    uniter_names: list[str] | None = None  # UNITER keys, when the captions come from a text DB
    if dataset == "multi30k":
        if split != "test":
            raise DatasetError("Multi30K is evaluated on its 2016 test set only (--split test)")
        if lang not in MULTI30K_LANGS:
            raise DatasetError(f"unknown Multi30K language {lang!r}; choose one of {', '.join(MULTI30K_LANGS)}")
        cap = paths.captions or (_find_multi30k_file(data, f"test_2016_flickr.{lang}") if data else None)
        lst = paths.image_list or (_find_multi30k_file(data, "test_2016_flickr.txt") if data else None)
        if cap is None or lst is None:
            missing = f"test_2016_flickr.{lang}[.gz]" if cap is None else "test_2016_flickr.txt"
            raise DatasetError(f"no Multi30K {missing} under {data} (the multi30k/dataset layout: data/task1/raw/, "
                               "data/task1/image_splits/); pass --captions / --image-list")
        file_names, rows = read_multi30k(cap, lst, lang)
        sources["captions"], sources["image_list"] = str(cap), str(lst)
    else:
        txt_db = paths.txt_db
        karpathy = paths.karpathy
        if txt_db is None and karpathy is None and data is not None:
            txt_db = find_text_db(data, dataset, split)
            karpathy = None if txt_db else find_karpathy(data, dataset)
        if txt_db is not None:
            uniter_names, rows, meta = read_uniter_text_db(txt_db)  # type: ignore[assignment]
            sources["captions"] = str(txt_db)
        elif karpathy is not None:
            file_names, rows = read_karpathy(karpathy, split)  # type: ignore[assignment]
            sources["captions"] = str(karpathy)
        else:
            raise DatasetError(f"no captions for {dataset} under {data}: expected dataset_{dataset}.json (Karpathy "
                               f"split) or a UNITER text DB itm_{dataset}_{split}*.db; or pass --karpathy / --txt-db")
    img_db, images = paths.img_db, paths.images
    if img_db is None and images is None:
        if data is None:
            raise DatasetError("no images: pass --data, --images (image files) or --img-db (UNITER image DB)")
        img_db = find_image_db(data, dataset)
        if img_db is None:
            first = file_names[0] if file_names else image_file_from_uniter_key(uniter_names[0])  # type: ignore[index]
            images = find_image_folder(data, dataset, first)
            if images is None:
                raise DatasetError(f"no images for {dataset} under {data}: expected a UNITER image DB "
                                   f"({UNITER_FEATURE_DB}/) or the image files (e.g. {first}); "
                                   "pass --img-db or --images")
    if img_db is not None:
        if not _is_image_db(img_db):
            raise DatasetError(f"{img_db} is not a UNITER image DB (expected {img_db / UNITER_FEATURE_DB}/data.mdb)")
        if file_names is not None:
            files = file_names
            key_of: Callable[[str], str] = lambda f: uniter_image_key(dataset, f)  # noqa: E731
        else:
            files = [_file_or_key(k) for k in uniter_names or []]
            key_of = dict(zip(files, uniter_names or [])).__getitem__
        sources["images"] = str(img_db)
    else:
        assert images is not None
        if not images.is_dir():
            raise DatasetError(f"--images {images} is not a folder")
        files = file_names if file_names is not None else [image_file_from_uniter_key(k) for k in uniter_names or []]
        key_of = lambda f: f  # noqa: E731
        sources["images"] = str(images)
    eval_images, captions = _captioned(files, rows, key_of)
    rset = RetrievalSet(dataset, split, eval_images, captions, image_db=img_db, text_meta=meta,
                        image_root=images if img_db is None else None,
                        lang=lang if dataset == "multi30k" else None, sources=sources)
    if rset.image_root is not None:
        _check_files(rset)
    return rset


def _check_files(rset: RetrievalSet) -> None:
    missing = [p for p in rset.image_paths() if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of the {len(rset.images)} {rset.dataset} images are missing from "
                           f"{rset.image_root} (first: {missing[0]})")


# ------------------------------------------------------------------------------------------ region features
class FeatureStore:
    """Region features read from a UNITER image DB (a benchmark's, or an index's region store), with a
    small LRU cache and errors that say which DB and key.

    ``store.get(key)`` -> the record (``features (n, dim)`` float16, ``norm_bb (n, 6)``) cut to the DB's box count.
    """

    def __init__(self, img_dir: str | Path, preset: str = "uniter", cache_size: int = 512) -> None:
        self.img_dir = Path(img_dir)
        self.db = open_image_db(self.img_dir, preset)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self.db

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self.db]

    def get(self, key: str) -> Any:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            record = self.db[key]
        except KeyError:
            raise DatasetError(f"image DB {self.img_dir} has no features for {key!r}") from None
        except Exception as exc:  # the reader's own error types (ImageDBError …)
            hint = " (it is ldot's feature cache: delete that folder to extract again)" if _in_cache(self.img_dir) else ""
            raise DatasetError(f"image DB {self.img_dir}: cannot read {key!r} ({exc}){hint}") from None
        self._cache[key] = record
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return record

    def close(self) -> None:
        close = getattr(self.db, "close", None)
        if close is not None:
            close()


def _in_cache(img_dir: Path) -> bool:
    from models.home import features_dir

    try:
        return img_dir.resolve().is_relative_to(features_dir().resolve())
    except OSError:
        return False


def open_image_db(img_dir: Path, preset: str = "uniter") -> Any:
    """A reader of a UNITER image DB: ``key in db``, ``db[key].features`` / ``.norm_bb`` (float16)."""
    from feature_extraction.uniter_db import UniterImageDB

    try:
        return UniterImageDB(img_dir, preset, as_float32=False)
    except LdotError:
        raise
    except Exception as exc:
        raise DatasetError(f"cannot open the image DB {img_dir}: {exc}") from None


def feature_cache_dir(image_root: Path) -> Path:
    """Where the features of the image files under ``image_root`` are cached (one UNITER image DB)."""
    from models.home import features_dir

    root = image_root.resolve()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", root.name)[:40] or "images"
    return features_dir() / f"{slug}-{hashlib.sha1(os.fsencode(root)).hexdigest()[:12]}"


def ensure_features(rset: RetrievalSet, detector: Any = None, device: str = "auto",
                    progress: Callable[[str, int, int], None] | None = None, num_workers: int = 2) -> Path:
    """Make sure every image of ``rset`` has features in a UNITER image DB; returns (and sets) its folder.

    A UNITER image DB given by the user is used as it is. For image files, features are extracted once
    into `feature_cache_dir` (resumable; only new or changed files are processed), so a second run only
    re-encodes. ``detector`` defaults to the project's BUTD detector (loaded only when something is left
    to extract).
    """
    if rset.image_db is not None:
        return rset.image_db
    assert rset.image_root is not None
    cache = feature_cache_dir(rset.image_root)
    paths = rset.image_paths()
    keys = [im.key for im in rset.images]
    if not _cache_complete(cache, keys, paths):
        if detector is None:
            detector = load_default_detector(device)
        report = _extract(paths, keys, cache, detector, progress, num_workers)
        failures = getattr(report, "failures", [])
        if failures:
            first = failures[0]
            raise DatasetError(f"feature extraction failed for {len(failures)} image(s) of {rset.image_root} "
                               f"(first: {first.path}: {first.reason})")
        (cache / "ldot-source.json").write_text(json.dumps({"image_root": str(rset.image_root.resolve())}))
    missing = _missing_keys(cache, keys)
    if missing:
        raise DatasetError(f"the feature cache {cache} lacks {len(missing)} image(s) after extraction "
                           f"(first: {missing[0]})")
    rset.image_db = cache
    return cache


def _missing_keys(img_dir: Path, keys: Sequence[str]) -> list[str]:
    if not _is_image_db(img_dir):
        return list(keys)
    store = FeatureStore(img_dir)
    try:
        return store.missing(keys)
    finally:
        store.close()


def _cache_complete(img_dir: Path, keys: Sequence[str], paths: Sequence[Path]) -> bool:
    """Every key is stored, and (where the DB records it) from an unchanged file."""
    if not _is_image_db(img_dir):
        return False
    store = FeatureStore(img_dir)
    try:
        if store.missing(keys):
            return False
        sources = getattr(store.db, "sources", None)
        stamps = sources() if callable(sources) else {}
    finally:
        store.close()
    for key, path in zip(keys, paths):
        stamp = stamps.get(key)
        if stamp is None:
            continue
        st = path.stat()
        if (stamp.size, stamp.mtime_ns) != (st.st_size, st.st_mtime_ns):
            return False
    return True


def load_default_detector(device: str = "auto") -> Any:
    """The BUTD detector used to extract features of image files (downloaded on first use)."""
    from .indexer import DEFAULT_DETECTOR, ensure_model, open_detector

    ensure_model(DEFAULT_DETECTOR)
    return open_detector(DEFAULT_DETECTOR, device)


def _extract(paths: Sequence[Path], keys: Sequence[str], out_dir: Path, detector: Any,
             progress: Callable[[str, int, int], None] | None, num_workers: int) -> Any:
    """Extract region features of ``paths`` into the UNITER image DB ``out_dir``, stored under ``keys``.

    INTEGRATION POINT (feature extraction): the one call into `feature_extraction.pipeline.extract_to_db`.
    """
    from feature_extraction.pipeline import extract_to_db

    key_of = {os.path.abspath(p): k for p, k in zip(paths, keys)}

    def key_fn(path: str, root: str) -> str:
        return key_of.get(os.path.abspath(path), os.path.basename(path))

    def on_progress(p: Any) -> None:
        if progress is not None:
            progress("extracting features", p.done, p.total)

    try:
        return extract_to_db([str(p) for p in paths], out_dir, detector, "uniter", key_fn=key_fn,
                             num_workers=num_workers, progress=on_progress)
    except LdotError:
        raise
    except Exception as exc:  # the pipeline's own errors (DBLockedError, DetectorError …) and OS errors
        if isinstance(exc, OSError) or type(exc).__module__.startswith("feature_extraction"):
            raise DatasetError(f"feature extraction into {out_dir} failed: {exc}") from None
        raise
