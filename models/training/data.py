"""What training reads: (caption, image) pairs and an image-feature lookup, batched deterministically.

The contract (`FeatureLookup`): ``lookup[key]`` -> a record with ``features (n, img_dim)``, ``norm_bb (n, 6)``
and, for the MRC-kl task, ``soft_labels (n, C)`` with the background class FIRST (UNITER's image-DB order;
`feature_extraction.uniter_db.UniterImageDB` returns exactly that). Records of our own detector
(`RegionFeatures`, background LAST) go through `region_lookup`, the one place that converts.

Batches are a pure function of (seed, epoch, position), so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from models.core.errors import LdotError
from models.nn.losses import soft_labels_background_first
from models.nn.pretraining import PairBatch
from models.nn.regions import RegionRecord, stack_object_ids, stack_regions
from models.nn.tokenizer import pad_ids


class _Encoding(Protocol):
    @property
    def ids(self) -> list[int]: ...


class _Backend(Protocol):
    """The part of a `tokenizers.Tokenizer` training reads."""

    def encode_batch(self, texts: list[str], /, *, add_special_tokens: bool = ...) -> Sequence[_Encoding]: ...

    def decode_batch(self, rows: list[list[int]], /, *, skip_special_tokens: bool = ...) -> list[str]: ...


class TrainTokenizer(Protocol):
    """What training reads of a tokenizer: word-pieces (`models.nn.tokenizer.Tokenizer`), or a dual encoder's own
    seen as one (`models.training.dual.DualTokenizer`)."""

    @property
    def backend(self) -> _Backend: ...

    @property
    def cls_id(self) -> int: ...

    @property
    def sep_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def mask_id(self) -> int | None: ...

    def save(self, directory: Path) -> None: ...


class FeatureValueError(LdotError):
    """An image's stored region features hold NaN or Inf: the features are damaged, not the training settings."""


def check_finite(records: Sequence[object], keys: Sequence[str]) -> None:
    """Refuse region records holding NaN/Inf (features, boxes or soft labels), naming the image and the array:
    one would turn every loss into NaN and look like a learning-rate problem."""
    for record, key in zip(records, keys):
        for name in ("features", "norm_bb", "soft_labels"):
            value = getattr(record, name, None)
            if value is None:
                continue
            array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                bad = int((~np.isfinite(array)).sum())
                raise FeatureValueError(f"the region {name} of image {key!r} hold {bad} NaN/Inf value(s): its "
                                        "features are damaged; extract them again, or leave that image out")


class FeatureLookup(Protocol):
    """Image key -> its regions (a UNITER image DB reader, a dict, ...), or for a dual encoder its pixels (a
    (3, h, w) float32 array: the model's preprocessing of the image file)."""

    def __getitem__(self, key: str) -> RegionRecord | PixelRecord: ...

    def __contains__(self, key: str) -> bool: ...


@dataclass
class PairSet:
    """Captions and the images they describe: caption i shows image ``caption_image[i]``."""

    token_ids: list[tuple[int, ...]]  # word-pieces of each caption, without [CLS]/[SEP]
    caption_image: list[int]  # index into image_keys, per caption
    image_keys: list[str]  # feature key of each image

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.caption_image):
            raise ValueError(f"{len(self.token_ids)} captions but {len(self.caption_image)} image indices")
        bad = [i for i in self.caption_image if not 0 <= i < len(self.image_keys)]
        if bad:
            raise ValueError(f"caption image index {bad[0]} is outside the {len(self.image_keys)} images")

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def from_texts(cls, texts: Sequence[str], caption_image: Sequence[int], image_keys: Sequence[str],
                   tokenizer: TrainTokenizer) -> PairSet:
        """Tokenise raw captions (word-pieces, no [CLS]/[SEP], no length cut)."""
        encoded = tokenizer.backend.encode_batch(list(texts), add_special_tokens=False)
        return cls([tuple(e.ids) for e in encoded], list(caption_image), list(image_keys))

    def drop_long(self, max_len: int) -> PairSet:
        """Without the captions of more than ``max_len`` word-pieces (training only; evaluation keeps all)."""
        keep = [i for i, ids in enumerate(self.token_ids) if len(ids) <= max_len]
        return replace(self, token_ids=[self.token_ids[i] for i in keep],
                       caption_image=[self.caption_image[i] for i in keep])


@dataclass
class TrainData:
    """Everything a run reads."""

    train: PairSet  # training pairs (long captions are dropped by the trainer)
    features: FeatureLookup  # features of every image named by train and val (`PixelRecord`s for a pixel model)
    val: PairSet | None = None  # validation pairs, scored by mean recall (None: keep the last model)
    description: str = ""  # where the data came from, for the run's record
    image_files: Mapping[str, Path] | None = None  # image key -> its file, when the images are files (a teacher
    # that reads pixels needs them)


@dataclass
class PixelRecord:
    """An image as a model that reads pixels takes it: (3, h, w) float32, preprocessed by the model's processor."""

    pixels: torch.Tensor


@dataclass
class _Regions:
    features: np.ndarray
    norm_bb: np.ndarray
    soft_labels: np.ndarray | None


class _ConvertedLookup:
    def __init__(self, records: Mapping[str, Any]) -> None:
        self.records = records

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> _Regions:
        rec = self.records[key]
        soft = getattr(rec, "soft_labels", None)
        return _Regions(rec.features, rec.norm_bb, None if soft is None else soft_labels_background_first(soft))


def region_lookup(records: Mapping[str, Any]) -> FeatureLookup:
    """A lookup over our detector's `RegionFeatures` (soft labels background LAST, converted to FIRST)."""
    return _ConvertedLookup(records)


def region_feature_mean(features: FeatureLookup, keys: Sequence[str], limit: int = 1000) -> np.ndarray:
    """The mean region feature (img_dim,) over the regions of up to ``limit`` of the images ``keys`` (evenly
    spaced through them): what a fresh region embedding is centred on (`initialization.centre_region_embedding_`)."""
    if not keys:
        raise ValueError("no images to take the mean region feature of")
    step = max(1, len(keys) // limit)
    total: np.ndarray | None = None
    count = 0
    for key in list(keys)[::step][:limit]:
        record = features[key]
        if isinstance(record, PixelRecord):
            raise ValueError(f"image {key!r} is pixels: it has no region features to take the mean of")
        rows = np.asarray(record.features, dtype=np.float64)
        total = rows.sum(axis=0) if total is None else total + rows.sum(axis=0)
        count += len(rows)
    assert total is not None
    return (total / max(1, count)).astype(np.float32)


# -- batching --------------------------------------------------------------------------------------------
def epoch_order(n: int, seed: int, epoch: int, stream: int = 0) -> torch.Tensor:
    """The shuffled pair order of one epoch of one stream (a pure function of its arguments)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + stream * 10_007 + epoch)
    return torch.randperm(n, generator=gen)


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Full batches in an epoch (the last partial one is dropped so every batch has the same negatives);
    one batch of everything when there are fewer pairs than ``batch_size``."""
    return max(1, n // batch_size)


def batch_indices(n: int, batch_size: int, seed: int, position: int, stream: int = 0) -> list[int]:
    """Pair indices of the ``position``-th batch of a stream (epochs follow one another)."""
    per_epoch = batches_per_epoch(n, batch_size)
    epoch, index = divmod(position, per_epoch)
    order = epoch_order(n, seed, epoch, stream)
    return order[index * batch_size:(index + 1) * batch_size].tolist()


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    pad: int
    mask: int
    vocab_range: tuple[int, int]  # [lo, hi) of random replacement ids

    @classmethod
    def of(cls, tokenizer: TrainTokenizer) -> SpecialIds:
        from models.nn.losses import vocab_range_of

        if tokenizer.mask_id is None:
            raise ValueError("the tokenizer has no [MASK] token: the mlm task cannot run")
        return cls(tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id, vocab_range_of(tokenizer))


def collate(pairs: PairSet, indices: Iterable[int], features: FeatureLookup, ids: SpecialIds,
            max_positions: int = 512, soft_labels: bool = False, object_ids: bool = False) -> PairBatch:
    """A padded `PairBatch` of the given captions and their images (float32 features).

    ``object_ids``: also each region's detector class (the tags of a decomposed model), when records hold them."""
    indices = list(indices)
    image_ids = [pairs.caption_image[i] for i in indices]
    return _batch(pairs, indices, image_ids, features, ids, max_positions, soft_labels, object_ids)


def _batch(pairs: PairSet, captions: list[int], images: list[int], features: FeatureLookup, ids: SpecialIds,
           max_positions: int, soft_labels: bool, object_ids: bool) -> PairBatch:
    rows = [[ids.cls, *pairs.token_ids[i][: max_positions - 2], ids.sep] for i in captions]
    input_ids, text_mask = pad_ids(rows, ids.pad)
    keys = [pairs.image_keys[j] for j in images]
    records = [features[k] for k in keys]
    text_images = torch.tensor([pairs.caption_image[i] for i in captions], dtype=torch.long)
    pixel_records = [r for r in records if isinstance(r, PixelRecord)]
    region_records = [r for r in records if not isinstance(r, PixelRecord)]
    if pixel_records and region_records:
        raise ValueError("a batch of both pixel and region records: one feature lookup gives one kind")
    if pixel_records:  # a model that reads pixels
        from models.nn.vilt import pad_pixels

        values, pixel_mask = pad_pixels([r.pixels for r in pixel_records])
        n = len(records)
        return PairBatch(input_ids, text_mask.bool(), torch.zeros(n, 0, 0), torch.zeros(n, 0, 6),
                         torch.zeros(n, 0, dtype=torch.bool), torch.tensor(images, dtype=torch.long), None, None,
                         text_images, None, values, pixel_mask)
    check_finite(region_records, keys)
    feat, bb, valid, soft = stack_regions(region_records, soft_labels)
    classes = stack_object_ids(region_records, feat.shape[1]) if object_ids else None
    return PairBatch(input_ids, text_mask.bool(), feat, bb, valid, torch.tensor(images, dtype=torch.long), soft,
                     classes, text_images)


def collate_negatives(pairs: PairSet, captions: Sequence[int], images: Sequence[int], features: FeatureLookup,
                      ids: SpecialIds, max_positions: int = 512, object_ids: bool = False) -> PairBatch:
    """The hard negatives of a batch as one `PairBatch`: ``captions`` (B*K caption indices) in the text part,
    ``images`` (B*K image indices) in the image part; rows do NOT pair (``text_image_ids`` says whose captions
    they are, ``image_ids`` which images)."""
    return _batch(pairs, list(captions), list(images), features, ids, max_positions, False, object_ids)
