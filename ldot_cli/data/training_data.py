"""Training data from the files users have: UNITER text/image DBs and Karpathy split files -> `TrainData`.

Captions come from the benchmark readers (`ldot_cli.data.retrieval_sets`: Karpathy files; `ldot_cli.data.uniter_text_db`:
UNITER text DBs); region features from `feature_extraction.uniter_db.UniterImageDB`, whose records already hold
``soft_labels`` background FIRST, as `models.training.data.FeatureLookup` expects.

Layouts:
- fine-tuning (Flickr30k, COCO): a UNITER text DB ``itm_<set>_train*.db`` (+ ``itm_<set>_val*.db``) or the
  Karpathy file (train split, COCO also ``restval``; validation: ``val``), and the UNITER image DB(s) (COCO's
  Karpathy train split spans ``coco_train2014`` and ``coco_val2014``: every image DB found is searched).
- pre-training: any UNITER text DBs (``--txt-db``, repeatable; e.g. ``pretrain_caption_coco_train_base-cased.db``)
  and their image DBs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from feature_extraction.uniter_db import (
    UNITER_FEATURE_DB,
    ImageRecord,
    UniterImageDB,
    is_image_db,
    subdirs,
)
from ldot_cli.data import retrieval_sets
from ldot_cli.data.uniter_text_db import read_uniter_text_db
from models.core.errors import LdotError, option

if TYPE_CHECKING:
    import numpy as np
    import torch

    from models.core.progress import ProgressFn
    from models.nn.tokenizer import Tokenizer
    from models.training.data import FeatureLookup, PairSet, PixelRecord, TrainData
    from models.training.dual import DualTokenizer


class TrainDataError(LdotError):
    """Training data is missing or does not fit together (the message names the file)."""


@dataclass(frozen=True)
class DataSpec:
    """Where the training data is: explicit paths win over what is found under ``data``."""

    dataset: str = "flickr30k"  # flickr30k | coco | custom (pre-training: any text DBs)
    data: Path | None = None  # folder to search
    karpathy: Path | None = None  # dataset_<set>.json
    txt_dbs: tuple[Path, ...] = ()  # training UNITER text DBs
    val_txt_db: Path | None = None  # validation UNITER text DB
    img_dbs: tuple[Path, ...] = ()  # UNITER image DB folders (each holding feat_th0.2_max100_min10/)
    val_images: int | None = None  # keep only the first N validation images (and their captions)
    no_val: bool = False  # train without validation (keep the last model)


class MultiImageDB:
    """Several UNITER image DBs behind one ``lookup[key]`` (the first DB holding the key answers)."""

    def __init__(self, dbs: Sequence[UniterImageDB]) -> None:
        self.dbs = list(dbs)
        self._where: dict[str, UniterImageDB] = {}

    def __contains__(self, key: str) -> bool:
        return self._find(key) is not None

    def _find(self, key: str) -> UniterImageDB | None:
        db = self._where.get(key)
        if db is None:
            db = next((d for d in self.dbs if key in d), None)
            if db is not None:
                self._where[key] = db
        return db

    def __getitem__(self, key: str) -> ImageRecord:
        db = self._find(key)
        if db is None:
            raise KeyError(key)
        return db[key]


def _image_dbs(spec: DataSpec) -> list[Path]:
    if spec.img_dbs:
        bad = [p for p in spec.img_dbs if not is_image_db(p)]
        if bad:
            raise TrainDataError(f"{bad[0]} is not a UNITER image DB (expected {bad[0] / UNITER_FEATURE_DB}/data.mdb)")
        return list(spec.img_dbs)
    if spec.data is None:
        raise TrainDataError(f"no image features: pass {option('data')} or {option('img_db')} (a UNITER image DB folder)")
    found = [p for p in [spec.data, *subdirs(spec.data), *(q for p in subdirs(spec.data) for q in subdirs(p))]
             if is_image_db(p)]
    if not found:
        raise TrainDataError(f"no UNITER image DB under {spec.data} (a folder holding {UNITER_FEATURE_DB}/): "
                             f"extract features first, or pass {option('img_db')}")
    return found


def _has_image_db(data: Path) -> bool:
    return any(is_image_db(p) for p in [data, *subdirs(data), *(q for p in subdirs(data) for q in subdirs(p))])


def _pairs_from_text_dbs(dbs: Sequence[Path]) -> PairSet:
    from models.training.data import PairSet

    keys: dict[str, int] = {}
    token_ids, caption_image = [], []
    for db in dbs:
        names, rows, _ = read_uniter_text_db(db)
        for _, _, image, ids in rows:
            caption_image.append(keys.setdefault(names[image], len(keys)))
            token_ids.append(tuple(ids))
    return PairSet(token_ids, caption_image, list(keys))


def _pairs_from_karpathy(path: Path, dataset: str, splits: Sequence[str],
                         tokenizer: Tokenizer | DualTokenizer) -> PairSet:
    from models.training.data import PairSet

    files: list[str] = []
    texts: list[str] = []
    images: list[int] = []
    for split in splits:
        try:
            split_files, captions = retrieval_sets.read_karpathy(path, split)
        except LdotError:
            if split == "restval":  # COCO only
                continue
            raise
        offset = len(files)
        files.extend(split_files)
        texts.extend(c[1] for c in captions)
        images.extend(offset + c[2] for c in captions)
    keys = [retrieval_sets.uniter_image_key(dataset, f) for f in files]
    return PairSet.from_texts(texts, images, keys, tokenizer)


def _first_images(pairs: PairSet, n: int | None) -> PairSet:
    from models.training.data import PairSet

    if n is None or n >= len(pairs.image_keys):
        return pairs
    keep = [i for i, img in enumerate(pairs.caption_image) if img < n]
    return PairSet([pairs.token_ids[i] for i in keep], [pairs.caption_image[i] for i in keep], pairs.image_keys[:n])


def check_training_data(spec: DataSpec) -> None:
    """The file-level checks of :func:`open_training_data` (folders, caption source, image DBs), without reading
    any caption: run before anything is loaded or downloaded, so that a wrong --data fails at once."""
    train_dbs, _, karpathy = _locate_captions(spec)
    if not _extracts_features(spec, train_dbs, karpathy):
        _image_dbs(spec)


def _features_from_image_files(spec: DataSpec, karpathy: Path, device: str,
                               progress: ProgressFn | None) -> list[Path]:
    """Region features of the Karpathy train/restval/val images found as files under ``spec.data`` (e.g. a split
    fetched by `ldot data get`), extracted once into the feature cache like `ldot eval` does."""
    from ldot_cli.data.features import ensure_features
    from ldot_cli.data.retrieval_sets import EvalImage, RetrievalSet, find_image_folder

    files = _karpathy_training_files(karpathy)
    assert spec.data is not None
    root = find_image_folder(spec.data, spec.dataset, files[0])
    if root is None:
        raise TrainDataError(f"no UNITER image DB and no image files under {spec.data} (e.g. {files[0]}): fetch them "
                             f"with `ldot data get {spec.dataset} --split train`, or pass {option('img_db')}")
    images = [EvalImage(f, retrieval_sets.uniter_image_key(spec.dataset, f)) for f in dict.fromkeys(files)]
    rset = RetrievalSet(spec.dataset, "train", images, [], image_root=root)
    return [ensure_features(rset, device=device, progress=progress)]




def _locate_captions(spec: DataSpec) -> tuple[list[Path], Path | None, Path | None]:
    """(training text DBs, validation text DB, Karpathy file): where the captions come from, or a one-line error."""
    if spec.data is not None and not spec.data.is_dir():
        raise TrainDataError(f"{option('data')} {spec.data} is not a folder")
    missing = [p for p in (*spec.txt_dbs, spec.val_txt_db, spec.karpathy) if p is not None and not p.exists()]
    if missing:
        raise TrainDataError(f"{missing[0]} does not exist")
    train_dbs = list(spec.txt_dbs)
    val_db = spec.val_txt_db
    karpathy = spec.karpathy
    if not train_dbs and karpathy is None and spec.data is not None and spec.dataset in ("flickr30k", "coco"):
        found = retrieval_sets.find_text_db(spec.data, spec.dataset, "train")
        if found is not None:
            train_dbs = [found]
        else:
            karpathy = retrieval_sets.find_karpathy(spec.data, spec.dataset)
    if not train_dbs and karpathy is None:
        raise TrainDataError(f"no training captions for {spec.dataset}: expected a UNITER text DB "
                             f"itm_{spec.dataset}_train*.db or dataset_{spec.dataset}.json under {option('data')}, "
                             f"or pass {option('txt_db')} / {option('karpathy')}")
    if not train_dbs and spec.dataset not in ("flickr30k", "coco"):
        raise TrainDataError(f"a Karpathy split file needs {option('dataset')} flickr30k or coco (its images' feature keys "
                             "follow the dataset's naming)")
    return train_dbs, val_db, karpathy


def _extracts_features(spec: DataSpec, train_dbs: Sequence[Path], karpathy: Path | None) -> bool:
    """A Karpathy file with image files but no UNITER image DB (a split fetched by `ldot data get`): the images'
    region features are extracted into the feature cache."""
    return (not spec.img_dbs and karpathy is not None and not train_dbs and spec.data is not None
            and not _has_image_db(spec.data))


class PixelLookup:
    """``lookup[key]`` -> the image file's pixels as a model that reads pixels takes them (`PixelRecord`): decoded by
    ldot (EXIF rotation, CMYK, 16-bit, HEIC), preprocessed by ``prepare`` (the model's image processor)."""

    def __init__(self, files: dict[str, Path], prepare: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.files = files
        self.prepare = prepare

    def __contains__(self, key: str) -> bool:
        return key in self.files and self.files[key].is_file()

    def __getitem__(self, key: str) -> PixelRecord:
        from feature_extraction.errors import ImageLoadError
        from feature_extraction.images.decode import load_image
        from models.training.data import PixelRecord

        try:
            return PixelRecord(self.prepare(load_image(self.files[key])))
        except ImageLoadError as exc:
            raise TrainDataError(f"cannot read training image {exc.path}: {exc.reason}") from None


def _karpathy_training_files(karpathy: Path) -> list[str]:
    """The image files of a Karpathy split file's train, restval (when it has one) and val splits."""
    files: list[str] = []
    for split in ("train", "restval", "val"):
        try:
            files += retrieval_sets.read_karpathy(karpathy, split)[0]
        except LdotError:
            if split != "restval":
                raise
    return files


def _image_files(spec: DataSpec, karpathy: Path | None) -> dict[str, Path] | None:
    """Feature key -> image file of every Karpathy train/restval/val image found as a file under ``spec.data`` (None
    when the captions do not come from a Karpathy file or the files are not there)."""
    if karpathy is None or spec.data is None:
        return None
    files = _karpathy_training_files(karpathy)
    root = retrieval_sets.find_image_folder(spec.data, spec.dataset, files[0]) if files else None
    if root is None:
        return None
    return {retrieval_sets.uniter_image_key(spec.dataset, f): retrieval_sets.resolve_image_file(root, f)
            for f in dict.fromkeys(files)}


def open_training_data(spec: DataSpec, tokenizer: Tokenizer | DualTokenizer, device: str = "auto",
                       progress: ProgressFn | None = None,
                       pixels: Callable[[np.ndarray], torch.Tensor] | None = None) -> TrainData:
    """Read the training (and validation) pairs and open the image features: a `models.training.data.TrainData`.

    With a Karpathy file and image files but no UNITER image DB (a split fetched by `ldot data get`), the images'
    region features are extracted once into the feature cache (``device``, ``progress``) and read from there.
    ``pixels`` (a model's image preprocessing, for a model that reads pixels): the images are read from their files
    instead, as `PixelRecord`s; no detector runs. The image files, when there are, are in ``image_files`` (what a
    teacher that reads pixels scores)."""
    from models.training.data import TrainData

    train_dbs, val_db, karpathy = _locate_captions(spec)
    if pixels is not None and train_dbs:
        raise TrainDataError("a model that reads pixels trains on image files with their Karpathy split file, not "
                             "on UNITER text and image DBs")
    if train_dbs:
        train = _pairs_from_text_dbs(train_dbs)
        if val_db is None and spec.data is not None and spec.dataset in ("flickr30k", "coco"):
            val_db = retrieval_sets.find_text_db(spec.data, spec.dataset, "val")
        val = _pairs_from_text_dbs([val_db]) if val_db is not None and not spec.no_val else None
        described = ", ".join(str(p) for p in train_dbs)
    else:
        assert karpathy is not None  # `_locate_captions` gives text DBs or a Karpathy file
        splits = ("train", "restval") if spec.dataset == "coco" else ("train",)
        train = _pairs_from_karpathy(karpathy, spec.dataset, splits, tokenizer)
        val = None if spec.no_val else _pairs_from_karpathy(karpathy, spec.dataset, ("val",), tokenizer)
        described = str(karpathy)
    if val is not None:
        val = _first_images(val, spec.val_images)
    files = _image_files(spec, karpathy)
    if pixels is not None:
        if files is None:
            raise TrainDataError(f"this model reads pixels: it trains from a Karpathy split file and the image files "
                                 f"under {option('data')} (`ldot data get {spec.dataset} --split train`), not from "
                                 "region features")
        assert spec.data is not None
        pixel_lookup = PixelLookup(files, pixels)
        _check_features(train, val, pixel_lookup, [spec.data])
        return TrainData(train, pixel_lookup, val, description=f"captions: {described}; images: files under "
                         f"{spec.data}", image_files=files)
    if _extracts_features(spec, train_dbs, karpathy):
        assert karpathy is not None
        img_dirs = _features_from_image_files(spec, karpathy, device, progress)
    else:
        img_dirs = _image_dbs(spec)
    try:
        lookup = MultiImageDB([UniterImageDB(d, "uniter") for d in img_dirs])
    except Exception as exc:  # the reader's ImageDBError, lmdb errors
        raise TrainDataError(f"cannot open the image DB(s) {', '.join(map(str, img_dirs))}: {exc}") from None
    _check_features(train, val, lookup, img_dirs)
    return TrainData(train, lookup, val, description=f"captions: {described}; images: "
                     + ", ".join(str(d) for d in img_dirs), image_files=files)


def _check_features(train: PairSet, val: PairSet | None, lookup: FeatureLookup, img_dirs: Sequence[Path]) -> None:
    for name, pairs in (("training", train), ("validation", val)):
        if pairs is None:
            continue
        missing = [k for k in pairs.image_keys if k not in lookup]
        if missing:
            raise TrainDataError(f"{len(missing)} of the {len(pairs.image_keys)} {name} images have no features in "
                                 f"{', '.join(map(str, img_dirs))} (first: {missing[0]}): extract them, or pass the "
                                 f"right {option('img_db')}")
