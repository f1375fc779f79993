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
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from feature_extraction.uniter_db import UNITER_FEATURE_DB, is_image_db, subdirs
from ldot_cli.data.errors import DatasetError, load_json
from ldot_cli.data.uniter_text_db import read_uniter_text_db
from models.core.errors import option

DATASETS = ("flickr30k", "coco", "multi30k")
MULTI30K_LANGS = ("de", "fr", "cs", "en")


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
                       f"key is unknown (pass {option('images')} to extract features from the files instead)")


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
                       f"so its image file is unknown (pass {option('img_db')} with the matching image DB)")


def _file_or_key(key: str) -> str:
    """The image file a UNITER key names, or the key itself when it follows no known naming."""
    try:
        return image_file_from_uniter_key(key)
    except DatasetError:
        return key


# ------------------------------------------------------------------------------------------ Karpathy


def read_karpathy(path: str | Path, split: str = "test") -> tuple[list[str], list[tuple[str, str, int, None]]]:
    """Image files and captions of one split of a Karpathy split file.

    Returns ``(files, captions)``: ``files[i]`` is ``filepath/filename`` (or ``filename``), and each
    caption is ``(sentid, raw text, index into files, None)``. Every listed sentence is kept.
    """
    path = Path(path)
    what = "a Karpathy split file: {images: [{filename, split, sentences: [{raw, sentid}]}]}"
    data = load_json(path, what)
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
        splits = sorted({e["split"] for e in data["images"] if isinstance(e, dict) and isinstance(e.get("split"), str)})
        raise DatasetError(f"{path} has no captioned image in split {split!r} (splits there: {', '.join(splits)})")
    return files, captions


# ------------------------------------------------------------------------------------------ UNITER text DB


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


def find_image_db(data: Path, dataset: str) -> Path | None:
    """A UNITER image DB folder in ``data`` or up to two levels below (preferring the dataset's own name)."""
    level1 = subdirs(data)
    candidates = [p for p in [data, *level1, *(q for p in level1 for q in subdirs(p))] if is_image_db(p)]
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
                       f"choose one with {option('img_db')}")


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
    for cand in [data / name, *(d / name for d in subdirs(data))]:
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
        raise DatasetError(f"{option('data')} {data} is not a folder")
    sources: dict[str, str] = {}
    meta = None
    file_names: list[str] | None = None  # image files, when the captions name files
    uniter_names: list[str] | None = None  # UNITER keys, when the captions come from a text DB
    rows: Sequence[tuple[str, str, int, tuple[int, ...] | None]]  # (id, text, file index, token ids)
    if dataset == "multi30k":
        if split != "test":
            raise DatasetError(f"Multi30K is evaluated on its 2016 test set only ({option('split')} test)")
        if lang not in MULTI30K_LANGS:
            raise DatasetError(f"unknown Multi30K language {lang!r}; choose one of {', '.join(MULTI30K_LANGS)}")
        cap = paths.captions or (_find_multi30k_file(data, f"test_2016_flickr.{lang}") if data else None)
        lst = paths.image_list or (_find_multi30k_file(data, "test_2016_flickr.txt") if data else None)
        if cap is None or lst is None:
            missing = f"test_2016_flickr.{lang}[.gz]" if cap is None else "test_2016_flickr.txt"
            raise DatasetError(f"no Multi30K {missing} under {data} (the multi30k/dataset layout: data/task1/raw/, "
                               f"data/task1/image_splits/); pass {option('captions')} / {option('image_list')}")
        file_names, rows = read_multi30k(cap, lst, lang)
        sources["captions"], sources["image_list"] = str(cap), str(lst)
    else:
        txt_db = paths.txt_db
        karpathy = paths.karpathy
        if txt_db is None and karpathy is None and data is not None:
            txt_db = find_text_db(data, dataset, split)
            karpathy = None if txt_db else find_karpathy(data, dataset)
        if txt_db is not None:
            uniter_names, rows, meta = read_uniter_text_db(txt_db)
            sources["captions"] = str(txt_db)
        elif karpathy is not None:
            file_names, rows = read_karpathy(karpathy, split)
            sources["captions"] = str(karpathy)
        else:
            raise DatasetError(f"no captions for {dataset} under {data}: expected dataset_{dataset}.json (Karpathy "
                               f"split) or a UNITER text DB itm_{dataset}_{split}*.db; or pass {option('karpathy')} "
                               f"/ {option('txt_db')}")
    img_db, images = paths.img_db, paths.images
    if img_db is None and images is None:
        if data is None:
            raise DatasetError(f"no images: pass {option('data')}, {option('images')} (image files) or {option('img_db')} (UNITER image DB)")
        img_db = find_image_db(data, dataset)
        if img_db is None:
            if file_names:
                first = file_names[0]
            elif uniter_names:
                first = image_file_from_uniter_key(uniter_names[0])
            else:
                raise DatasetError(f"the captions of {dataset} name no image")
            images = find_image_folder(data, dataset, first)
            if images is None:
                raise DatasetError(f"no images for {dataset} under {data}: expected a UNITER image DB "
                                   f"({UNITER_FEATURE_DB}/) or the image files (e.g. {first}); "
                                   f"pass {option('img_db')} or {option('images')}")
    if img_db is not None:
        if not is_image_db(img_db):
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
            raise DatasetError(f"{option('images')} {images} is not a folder")
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
