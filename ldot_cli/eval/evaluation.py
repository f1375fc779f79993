"""Recall@K of a bi-encoder on a retrieval benchmark, with optional cross-encoder re-ranking and timings.

Semantics (the official LightningDOT ``eval_model_on_dataloader`` / UNITER ``itm_eval``):

- text -> image: a caption is a hit at K when its image is among its K best images; averaged over captions.
- image -> text: an image is a hit at K when ANY of its captions is among its K best captions; averaged over
  images. Images may have any number of captions.
- RSUM: the sum of the six recalls (in %).
- COCO 1K (``fold_size=1000``): consecutive blocks of 1,000 images with their captions, each evaluated on
  its own; every figure is the mean over the folds.
- Re-ranking with top M (the official ``rerank.py``): the cross-encoder re-scores each query's M best
  candidates, which are re-sorted by that score (ties keep the bi-encoder's order); candidates beyond M keep
  their bi-encoder ranks.

Scores are raw dot products searched exactly with FAISS ``IndexFlatIP``. No typer/rich here: the CLI passes
a `models.core.progress.ProgressFn`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeGuard

import numpy as np

from feature_extraction.uniter_db import FeatureStore
from ldot_cli.data.errors import DatasetError
from ldot_cli.data.features import ensure_features
from ldot_cli.data.retrieval_sets import DataPaths, RetrievalSet, locate
from models.core import ann
from models.core.errors import LdotError, ModelError, option
from models.core.progress import Progress, ProgressFn, report
from models.hub.catalogue import DEFAULT_EVAL_MODELS, RERANKERS
from models.hub.installed import default_reranker
from models.nn.regions import RegionRecord, stack_regions
from models.training.metrics import KS, Recalls, recalls_from_rankings

if TYPE_CHECKING:
    import torch

    from feature_extraction.images.pool import DecodedImage

# The official LightningDOT README's table (R@1/5/10 in %): (dataset, checkpoint) -> row.
PUBLISHED: dict[tuple[str, str], dict[str, Any]] = {
    ("flickr30k", "lightningdot"): {"setting": "Flickr30k zero-shot (pre-trained), official README",
                                    "text_to_image": (53.32, 80.58, 88.04), "image_to_text": (68.2, 89.1, 94.0)},
    ("flickr30k", "flickr-ft"): {"setting": "Flickr30k fine-tuned, official README",
                                 "text_to_image": (69.9, 91.1, 95.18), "image_to_text": (83.9, 97.2, 98.6)},
    ("coco", "coco-ft"): {"setting": "COCO 5K fine-tuned, official README",
                          "text_to_image": (45.77, 74.53, 83.79), "image_to_text": (60.04, 85.16, 91.72)},
}
OFFICIAL_FILES = {"LightningDot.pt": "lightningdot", "flickr-ft.pt": "flickr-ft", "coco-ft.pt": "coco-ft"}


# vectors or scores as a model (a tensor) or a planted test double (an array) gives them
Numbers: TypeAlias = "torch.Tensor | np.ndarray"


class Encoder(Protocol):
    """What evaluation needs of a bi-encoder (`models.BiEncoder`, or a planted test double)."""

    def encode_text(self, texts: Sequence[str], batch_size: int = ...) -> Numbers: ...

    def encode_token_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Numbers: ...

    def encode_images(self, records: Sequence[RegionRecord], batch_size: int = ...,
                      progress: ProgressFn | None = None) -> Numbers: ...


class Reranker(Protocol):
    """What re-ranking needs of a cross-encoder (`models.load_reranker`): ``score`` over region features, or, when
    its ``inputs`` is ``"pixels"`` (ViLT), ``prepare(rgb)`` and ``score_pixels(texts, images)`` over the image files."""

    def score(self, texts: Sequence[str], features: torch.Tensor, norm_bb: torch.Tensor,
              mask: torch.Tensor | None = None) -> Numbers: ...


class PixelReranker(Protocol):
    """A `Reranker` whose ``inputs`` is ``"pixels"``: it scores (text, preprocessed image) pairs."""

    def prepare(self, rgb: np.ndarray) -> torch.Tensor: ...

    def score_pixels(self, texts: Sequence[str], images: Sequence[torch.Tensor]) -> Numbers: ...


def _reads_pixels(reranker: object) -> TypeGuard[PixelReranker]:
    """Whether a re-ranker reads the image files (ViLT) rather than region features."""
    return getattr(reranker, "inputs", "regions") == "pixels"


class ImageInputs:
    """What a cross-encoder reads of a benchmark's images: region features from the image DB, or (a re-ranker that
    reads pixels) the image files, decoded by ldot and preprocessed by the model, the last few kept in memory."""

    def __init__(self, store: FeatureStore | None, files: dict[str, Path] | None = None, keep: int = 64) -> None:
        self.store = store
        self.files = files
        self.keep = keep
        self._pixels: dict[str, torch.Tensor] = {}

    def regions(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.store is None:
            raise DatasetError("this re-ranker reads region features, and this benchmark's are not extracted")
        feat, bb, mask, _ = stack_regions([self.store.get(k) for k in keys])  # (B, N, dim), (B, N, 6), (B, N)
        return feat, bb, mask

    def pixels(self, keys: Sequence[str], prepare: Callable[[np.ndarray], torch.Tensor]) -> list[torch.Tensor]:
        from feature_extraction.errors import ImageLoadError
        from feature_extraction.images.decode import load_image

        if self.files is None:
            raise DatasetError("this re-ranker reads the image files, and this benchmark's images come from a UNITER "
                               f"image DB: pass {option('images')} (the folder of the image files)")
        out = []
        for key in keys:
            if key not in self._pixels:
                try:
                    self._pixels[key] = prepare(load_image(self.files[key]))
                except ImageLoadError as exc:
                    raise DatasetError(f"cannot read benchmark image {exc.path}: {exc.reason}") from None
                if len(self._pixels) > self.keep:
                    self._pixels.pop(next(iter(self._pixels)))
            out.append(self._pixels[key])
        return out


# ------------------------------------------------------------------------------------------ report
@dataclass
class EvalTimings:
    """Seconds spent per stage (summed over folds for COCO 1K)."""

    feature_extraction_s: float = 0.0  # detector on image files (0 when features were there)
    feature_loading_s: float = 0.0  # reading region features from the image DB
    image_encoding_s: float = 0.0  # image tower
    text_encoding_s: float = 0.0  # text tower
    index_build_s: float = 0.0  # FAISS IndexFlatIP over images and over captions
    search_s: float = 0.0  # both directions
    rerank_s: dict[int, float] = field(default_factory=dict)  # M -> cross-encoder on the top M, both directions
    rerank_pairs: dict[int, int] = field(default_factory=dict)  # M -> pairs scored
    cross_sample_pairs: int = 0  # pairs timed to estimate the full cross-encoder matrix
    cross_per_pair_s: float | None = None
    full_matrix_pairs: int = 0  # captions x images (per fold, summed)
    cross_full_matrix_s: float | None = None  # extrapolated: the cross-encoder alone on every pair

    @property
    def bi_encoder_s(self) -> float:
        """Everything the bi-encoder evaluation needs: both towers, index, search."""
        return self.image_encoding_s + self.text_encoding_s + self.index_build_s + self.search_s

    def speedup(self, rerank_k: int | None = None) -> float | None:
        """Full cross-encoder time / our time (bi-encoder, plus re-ranking the top ``rerank_k``)."""
        if self.cross_full_matrix_s is None:
            return None
        ours = self.bi_encoder_s + (self.rerank_s.get(rerank_k, 0.0) if rerank_k else 0.0)
        return self.cross_full_matrix_s / ours if ours > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"feature_extraction_s": self.feature_extraction_s, "feature_loading_s": self.feature_loading_s,
                "image_encoding_s": self.image_encoding_s, "text_encoding_s": self.text_encoding_s,
                "index_build_s": self.index_build_s, "search_s": self.search_s, "bi_encoder_s": self.bi_encoder_s,
                "rerank_s": {str(m): s for m, s in self.rerank_s.items()},
                "rerank_pairs": {str(m): n for m, n in self.rerank_pairs.items()},
                "cross_sample_pairs": self.cross_sample_pairs, "cross_per_pair_s": self.cross_per_pair_s,
                "full_matrix_pairs": self.full_matrix_pairs, "cross_full_matrix_s": self.cross_full_matrix_s,
                "speedup": self.speedup(),
                "rerank_speedup": {str(m): self.speedup(m) for m in self.rerank_s}}


@dataclass
class EvalReport:
    """Every figure of one evaluation."""

    dataset: str
    split: str  # test | val | 1k
    lang: str | None
    num_images: int
    num_captions: int
    fold_size: int | None  # COCO 1K: 1000
    recalls: Recalls  # bi-encoder alone (mean over folds)
    reranked: dict[int, Recalls]  # M -> after re-ranking the top M (mean over folds)
    fold_recalls: list[Recalls]
    fold_reranked: list[dict[int, Recalls]]
    timings: EvalTimings
    text_input: str  # "token-ids" (from the text DB) or "raw-text" (tokenized by the model)
    sources: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    reranker: str | None = None
    published: dict[str, Any] | None = None  # the official README row, for official checkpoints
    calibration: dict[str, Any] | None = None  # score distributions of matching / non-matching pairs (summary)
    text_vectors: np.ndarray | None = field(default=None, repr=False)  # (n_txt, D)
    image_vectors: np.ndarray | None = field(default=None, repr=False)  # (n_img, D)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, object] = {
            "dataset": self.dataset, "split": self.split, "lang": self.lang, "model": self.model,
            "reranker": self.reranker, "num_images": self.num_images, "num_captions": self.num_captions,
            "folds": len(self.fold_recalls), "fold_size": self.fold_size, "text_input": self.text_input,
            "sources": self.sources, "recall": self.recalls.to_dict(),
            "rerank": {str(m): r.to_dict() for m, r in self.reranked.items()},
            "timing": self.timings.to_dict(), "published": None, "calibration": self.calibration}
        if len(self.fold_recalls) > 1:
            out["fold_recall"] = [r.to_dict() for r in self.fold_recalls]
            out["fold_rerank"] = [{str(m): r.to_dict() for m, r in f.items()} for f in self.fold_reranked]
        if self.published is not None:
            pub = self.published
            row = Recalls(dict(zip(KS, pub["text_to_image"])), dict(zip(KS, pub["image_to_text"])))
            out["published"] = {"setting": pub["setting"], "checkpoint": pub["checkpoint"], **row.to_dict()}
        return out


# ------------------------------------------------------------------------------------------ evaluation
def _numpy(x: Numbers) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _tick(progress: ProgressFn | None, stage: str, total: int, unit: str = "items") -> Callable[[int], None]:
    """A counter for work done in pieces: ``advance(k)`` reports ``k`` more units of ``stage`` done."""
    done = [0]

    def advance(k: int) -> None:
        done[0] += k
        report(progress, stage, done[0], total, unit)

    report(progress, stage, 0, total, unit)
    return advance


def encode_image_set(encoder: Encoder, store: FeatureStore, keys: Sequence[str], batch_size: int = 64,
                     progress: ProgressFn | None = None, timings: EvalTimings | None = None) -> np.ndarray:
    """Image vectors (n, D) of the images stored under ``keys``, read and encoded chunk by chunk."""
    timings = timings or EvalTimings()
    missing = store.missing(keys)
    if missing:
        raise DatasetError(f"image DB {store.img_dir} has no features for {len(missing)} of the {len(keys)} images "
                           f"(first: {missing[0]})")
    report(progress, "encoding images", 0, len(keys), "images")
    chunk = max(256, 8 * batch_size)
    out = []
    for start in range(0, len(keys), chunk):
        t0 = time.perf_counter()
        records = [store.get(k) for k in keys[start:start + chunk]]
        t1 = time.perf_counter()

        def within(p: Progress, offset: int = start) -> None:  # the chunk's count, as a count of the whole set
            report(progress, "encoding images", offset + p.done, len(keys), "images")

        out.append(_numpy(encoder.encode_images(records, batch_size=batch_size, progress=within)))
        timings.feature_loading_s += t1 - t0
        timings.image_encoding_s += time.perf_counter() - t1
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def reads_pixels(encoder: object) -> bool:
    """The model's image tower reads pixels (a dual encoder: CLIP, SigLIP), not region features."""
    return getattr(encoder, "inputs", "regions") == "pixels"


def encode_image_files(encoder: Any, paths: Sequence[Path], batch_size: int = 64, progress: ProgressFn | None = None,
                       timings: EvalTimings | None = None, num_workers: int = 2) -> np.ndarray:
    """Image vectors (n, D) of image files, for a model that reads pixels: decoded by ldot (EXIF, CMYK, 16-bit,
    HEIC) and preprocessed by the model's own image processor in worker processes, encoded in batches."""
    from feature_extraction.images.pool import DecodeFailure, iter_decoded

    timings = timings or EvalTimings()
    advance = _tick(progress, "encoding images", len(paths), "images")
    out: np.ndarray | None = None
    pending: list[DecodedImage] = []
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal out, pending
        if not pending:
            return
        vectors = _numpy(encoder.encode_images([item.pixels for item in pending], batch_size=len(pending)))
        if out is None:
            out = np.zeros((len(paths), vectors.shape[1]), np.float32)
        out[[item.index for item in pending]] = vectors
        advance(len(pending))
        pending = []

    for item in iter_decoded([str(p) for p in paths], encoder.pixel_preprocess, num_workers=num_workers,
                             max_in_flight=2 * batch_size):
        if isinstance(item, DecodeFailure):
            raise DatasetError(f"{paths[item.index]} could not be read ({item.reason}): every image of the benchmark "
                               "is needed")
        pending.append(item)
        if len(pending) >= batch_size:
            flush()
    flush()
    timings.image_encoding_s += time.perf_counter() - t0
    return out if out is not None else np.zeros((0, 0), np.float32)


def _text_mode(rset: RetrievalSet, encoder: Encoder, text_input: str) -> str:
    if reads_pixels(encoder):  # a text DB's ids are BERT word-pieces: a dual encoder reads the raw captions
        if text_input == "token-ids":
            raise DatasetError("a model that reads pixels (CLIP, SigLIP) tokenizes the raw captions itself")
        return "raw-text"
    has_ids = rset.text_meta is not None and all(c.token_ids is not None for c in rset.captions)
    if text_input == "raw-text" or not has_ids:
        if text_input == "token-ids":
            raise DatasetError("these captions carry no token ids (only a UNITER text DB has them)")
        return "raw-text"
    if text_input == "token-ids":
        return "token-ids"
    vocab = getattr(getattr(getattr(encoder, "config", None), "text", None), "vocab_size", None)
    if vocab is None:
        return "token-ids"
    v_range = (rset.text_meta or {}).get("v_range")
    max_id = max((max(c.token_ids) for c in rset.captions if c.token_ids), default=0)
    fits = max_id < vocab and (not isinstance(v_range, (list, tuple)) or len(v_range) != 2 or v_range[1] == vocab)
    return "token-ids" if fits else "raw-text"


def encode_captions(encoder: Encoder, rset: RetrievalSet, mode: str = "raw-text", batch_size: int = 64,
                    progress: ProgressFn | None = None, timings: EvalTimings | None = None) -> np.ndarray:
    """Caption vectors (n_txt, D), in caption order; batches of similar lengths.

    ``token-ids``: the text DB's word-pieces as ``[CLS] ids [SEP]`` (the official ``combine_inputs``);
    ``raw-text``: the captions tokenized by the model's own tokenizer.
    """
    timings = timings or EvalTimings()
    captions = rset.captions
    advance = _tick(progress, "encoding captions", len(captions), "captions")
    vectors: dict[int, np.ndarray] = {}
    t0 = time.perf_counter()
    if mode == "token-ids":
        from models.nn.tokenizer import pad_ids

        meta = rset.text_meta or {}
        cfg = getattr(getattr(encoder, "config", None), "text", None)
        max_len = getattr(cfg, "max_position_embeddings", 512)
        rows: list[list[int]] = []
        for c in captions:
            if c.token_ids is None:  # `_text_mode` chose token ids: never
                raise DatasetError("these captions carry no token ids (only a UNITER text DB has them)")
            rows.append([meta["CLS"], *c.token_ids[: max_len - 2], meta["SEP"]])
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad_ids([rows[i] for i in idx], int(meta.get("PAD", 0)))
            for i, vec in zip(idx, _numpy(encoder.encode_token_ids(ids, mask))):
                vectors[i] = vec
            advance(len(idx))
    else:
        if any(not c.text for c in captions):
            raise DatasetError("some captions have no raw text to tokenize (a text DB without 'raw' fields, "
                               "and a model whose vocabulary differs from the DB's)")
        order = sorted(range(len(captions)), key=lambda i: len(captions[i].text))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out = _numpy(encoder.encode_text([captions[i].text for i in idx], batch_size=len(idx)))
            for i, vec in zip(idx, out):
                vectors[i] = vec
            advance(len(idx))
    timings.text_encoding_s += time.perf_counter() - t0
    return np.stack([vectors[i] for i in range(len(captions))]) if captions else np.zeros((0, 0), np.float32)


def search_both(text_vectors: np.ndarray, image_vectors: np.ndarray, depth: int,
                timings: EvalTimings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search both ways: (images per caption (n_txt, k), captions per image (n_img, k))."""
    timings = timings or EvalTimings()
    t0 = time.perf_counter()
    image_index, text_index = ann.flat(image_vectors), ann.flat(text_vectors)
    t1 = time.perf_counter()
    _, ranked_images = ann.search(image_index, text_vectors, depth)
    _, ranked_texts = ann.search(text_index, image_vectors, depth)
    t2 = time.perf_counter()
    timings.index_build_s += t1 - t0
    timings.search_s += t2 - t1
    return ranked_images, ranked_texts


def score_pairs(reranker: Reranker, images: ImageInputs, texts: Sequence[str], keys: Sequence[str],
                chunk: int = 128, advance: Callable[[int], None] | None = None) -> np.ndarray:
    """Cross-encoder scores (n,) of the pairs (texts[i], image keys[i]); batched by image."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    out = np.empty(len(keys), np.float32)
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        batch_texts = [texts[i] for i in idx]
        if _reads_pixels(reranker):
            scores = reranker.score_pixels(batch_texts, images.pixels([keys[i] for i in idx], reranker.prepare))
        else:
            scores = reranker.score(batch_texts, *images.regions([keys[i] for i in idx]))
        out[idx] = _numpy(scores).reshape(-1)
        if advance is not None:
            advance(len(idx))
    return out


def rerank(ranked: np.ndarray, ms: Sequence[int], pair: Callable[[int, int], tuple[str, str]],
           reranker: Reranker, store: ImageInputs, progress: ProgressFn | None = None,
           stage: str = "re-ranking") -> dict[int, tuple[np.ndarray, float, int]]:
    """Re-rank each row's top M for every M: M -> (new ranked ids, cumulative seconds, pairs scored).

    Candidates are scored once, in bands of rank (0..M1, M1..M2, …), so each M's time is exact and
    nothing is scored twice. ``pair(query, candidate)`` -> (text, image key).
    """
    n, depth = ranked.shape
    scores = np.full((n, depth), -np.inf, np.float32)
    out: dict[int, tuple[np.ndarray, float, int]] = {}
    lo, seconds, pairs_done = 0, 0.0, 0
    total = n * min(max(ms), depth)
    advance = _tick(progress, stage, total)
    for m in sorted(set(ms)):
        hi = min(m, depth)
        if hi > lo:
            qs, rs = np.nonzero(ranked[:, lo:hi] >= 0)
            rs = rs + lo
            pairs = [pair(int(q), int(ranked[q, r])) for q, r in zip(qs, rs)]
            t0 = time.perf_counter()
            if pairs:
                scores[qs, rs] = score_pairs(reranker, store, [p[0] for p in pairs], [p[1] for p in pairs],
                                             advance=advance)
            seconds += time.perf_counter() - t0
            pairs_done += len(pairs)
            lo = hi
        order = np.argsort(-scores[:, :hi], axis=1, kind="stable")
        new = ranked.copy()
        new[:, :hi] = np.take_along_axis(ranked[:, :hi], order, axis=1)
        out[m] = (new, seconds, pairs_done)
    return out


def _folds(n_images: int, fold_size: int | None) -> list[np.ndarray]:
    if fold_size is None:
        return [np.arange(n_images)]
    if n_images < fold_size or n_images % fold_size:
        raise DatasetError(f"folds of {fold_size} images need a multiple of {fold_size} images; this set has "
                           f"{n_images} (COCO's 5K test split makes five 1K folds)")
    return [np.arange(s, s + fold_size) for s in range(0, n_images, fold_size)]


def time_cross_encoder(reranker: Reranker, store: ImageInputs, rset: RetrievalSet, sample: int,
                       timings: EvalTimings, seed: int = 0, progress: ProgressFn | None = None) -> None:
    """Time the cross-encoder on ``sample`` random pairs; extrapolate to ``timings.full_matrix_pairs``."""
    n_txt, n_img = len(rset.captions), len(rset.images)
    count = int(min(sample, n_txt * n_img))
    if count <= 0:
        return
    rng = np.random.default_rng(seed)
    qs, js = rng.integers(0, n_txt, count), rng.integers(0, n_img, count)
    texts = [rset.captions[q].text for q in qs]
    keys = [rset.images[j].key for j in js]
    warm = min(4, count)
    score_pairs(reranker, store, texts[:warm], keys[:warm])  # first call: lazy init, allocations
    t0 = time.perf_counter()
    score_pairs(reranker, store, texts, keys, advance=_tick(progress, "timing the cross-encoder", count))
    per_pair = (time.perf_counter() - t0) / count
    timings.cross_sample_pairs = count
    timings.cross_per_pair_s = per_pair
    timings.cross_full_matrix_s = per_pair * timings.full_matrix_pairs


def evaluate(rset: RetrievalSet, encoder: Encoder, *, reranker: Reranker | None = None,
             rerank_ks: Sequence[int] = (), fold_size: int | None = None, batch_size: int = 64,
             cross_sample: int = 256, text_input: str = "auto", progress: ProgressFn | None = None,
             seed: int = 0, workers: int = 2) -> EvalReport:
    """Recall@1/5/10 both ways (optionally re-ranked) and a timing breakdown for ``rset``.

    ``rset.image_db`` must hold every image's features (`ensure_features`). ``text_input``: ``auto`` uses
    a text DB's token ids when they fit the model's vocabulary, else the raw captions.
    """
    if rerank_ks and reranker is None:
        raise ModelError("re-ranking needs a cross-encoder (reranker=)")
    if any(m < 1 for m in rerank_ks):
        raise LdotError(f"{option('rerank_k')} must be positive (got {', '.join(map(str, rerank_ks))})")
    pixels = reads_pixels(encoder)
    region_reranker = reranker is not None and getattr(reranker, "inputs", "regions") != "pixels"
    if rset.image_db is None and (not pixels or region_reranker):
        raise DatasetError("the benchmark's image features are not extracted yet (call ensure_features first)")
    if pixels and rset.image_root is None:
        raise DatasetError("a model that reads pixels (CLIP, SigLIP) needs the benchmark's image files, not only a "
                           f"UNITER image DB: give them ({option('images')}, or {option('data')} holding them)")
    ms = sorted(set(rerank_ks))
    timings = EvalTimings()
    store = FeatureStore(rset.image_db) if rset.image_db is not None else None
    files = ({im.key: path for im, path in zip(rset.images, rset.image_paths())} if rset.image_root is not None
             else None)
    inputs = ImageInputs(store, files)
    if reranker is not None and getattr(reranker, "inputs", "regions") == "pixels" and files is None:
        if store is not None:
            store.close()
        raise DatasetError("the re-ranker reads the image files, and this benchmark's images come from a UNITER image "
                           f"DB: pass {option('images')} (the folder of the image files) or {option('data')} without "
                           "the image DB")
    try:
        if pixels:
            image_vectors = encode_image_files(encoder, rset.image_paths(), batch_size, progress, timings, workers)
        else:
            assert store is not None  # an encoder that reads regions: the image DB was checked above
            image_vectors = encode_image_set(encoder, store, [im.key for im in rset.images], batch_size, progress,
                                             timings)
        mode = _text_mode(rset, encoder, text_input)
        text_vectors = encode_captions(encoder, rset, mode, batch_size, progress, timings)
        if not (np.isfinite(image_vectors).all() and np.isfinite(text_vectors).all()):
            raise ModelError("the model produced non-finite vectors (NaN/inf): the checkpoint or the features "
                             "are broken")
        caption_image = np.asarray(rset.caption_images)
        fold_recalls, fold_reranked = [], []
        folds = _folds(len(rset.images), fold_size)
        for n_fold, img_idx in enumerate(folds):
            label = f" (fold {n_fold + 1}/{len(folds)})" if len(folds) > 1 else ""
            base, reranked = _evaluate_fold(rset, img_idx, caption_image, text_vectors, image_vectors, ms,
                                            reranker, inputs, timings, progress, label)
            fold_recalls.append(base)
            fold_reranked.append(reranked)
        if reranker is not None and cross_sample > 0:
            time_cross_encoder(reranker, inputs, rset, cross_sample, timings, seed, progress)
    finally:
        if store is not None:
            store.close()
    return EvalReport(rset.dataset, "1k" if fold_size else rset.split, rset.lang, len(rset.images),
                      len(rset.captions), fold_size, Recalls.mean(fold_recalls),
                      {m: Recalls.mean([f[m] for f in fold_reranked]) for m in ms}, fold_recalls, fold_reranked,
                      timings, mode, dict(rset.sources), text_vectors=text_vectors, image_vectors=image_vectors)


def _evaluate_fold(rset: RetrievalSet, img_idx: np.ndarray, caption_image: np.ndarray, text_vectors: np.ndarray,
                   image_vectors: np.ndarray, ms: Sequence[int], reranker: Reranker | None, store: ImageInputs,
                   timings: EvalTimings, progress: ProgressFn | None, label: str) -> tuple[Recalls, dict[int, Recalls]]:
    position = np.full(len(rset.images), -1)
    position[img_idx] = np.arange(len(img_idx))
    txt_idx = np.nonzero(position[caption_image] >= 0)[0]
    local_image = position[caption_image[txt_idx]]  # (n_txt_fold,) image row of each caption in this fold
    timings.full_matrix_pairs += len(txt_idx) * len(img_idx)
    depth = max([*KS, *ms])
    ranked_images, ranked_texts = search_both(np.ascontiguousarray(text_vectors[txt_idx]),
                                              np.ascontiguousarray(image_vectors[img_idx]), depth, timings)
    base = recalls_from_rankings(ranked_images, ranked_texts, local_image)
    if not ms or reranker is None:
        return base, {}

    def t2i_pair(q: int, c: int) -> tuple[str, str]:
        return rset.captions[txt_idx[q]].text, rset.images[img_idx[c]].key

    def i2t_pair(q: int, c: int) -> tuple[str, str]:
        return rset.captions[txt_idx[c]].text, rset.images[img_idx[q]].key

    t2i = rerank(ranked_images, ms, t2i_pair, reranker, store, progress, "re-ranking text->image" + label)
    i2t = rerank(ranked_texts, ms, i2t_pair, reranker, store, progress, "re-ranking image->text" + label)
    out = {}
    for m in ms:
        out[m] = recalls_from_rankings(t2i[m][0], i2t[m][0], local_image)
        timings.rerank_s[m] = timings.rerank_s.get(m, 0.0) + t2i[m][1] + i2t[m][1]
        timings.rerank_pairs[m] = timings.rerank_pairs.get(m, 0) + t2i[m][2] + i2t[m][2]
    return base, out


# ------------------------------------------------------------------------------------------ the whole run
def official_checkpoint(source: str | Path) -> str | None:
    """``lightningdot`` / ``flickr-ft`` / ``coco-ft`` when ``source`` is one of the official checkpoints."""
    from models.core.home import models_dir
    from models.hub.catalogue import find_entry

    names = set(OFFICIAL_FILES.values())
    entry = find_entry(str(source))
    if entry is not None and entry.name in names:
        return entry.name
    path = Path(source).expanduser()
    if not path.exists():
        path = models_dir() / str(source)
    if path.is_file():
        return OFFICIAL_FILES.get(path.name)
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        try:
            meta = json.loads(config.read_text())
        except (OSError, ValueError):
            return None
        origin = meta.get("source") if isinstance(meta, dict) else None
        if isinstance(origin, dict) and origin.get("file") in OFFICIAL_FILES:
            return OFFICIAL_FILES[origin["file"]]
        if path.name in names and isinstance(origin, dict) and str(origin.get("format", "")).startswith("lightningdot"):
            return path.name
    return None


def published_row(dataset: str, split: str, checkpoint: str | None) -> dict[str, Any] | None:
    """The official README row for this benchmark and checkpoint, if there is one."""
    if checkpoint is None or split != "test":
        return None
    row = PUBLISHED.get((dataset, checkpoint))
    return None if row is None else {**row, "checkpoint": checkpoint}


@dataclass(frozen=True)
class EvalOptions:
    """One `ldot eval` run."""

    dataset: str  # flickr30k | coco | multi30k
    paths: DataPaths  # --data and the explicit inputs
    split: str = "test"  # test | val | 1k (COCO: mean over five 1K folds)
    lang: str = "de"  # Multi30K caption language
    model: str | None = None  # bi-encoder: registry name, model dir or checkpoint (default per dataset)
    tokenizer: str | None = None  # tokenizer path overriding the model's own
    rerank_ks: tuple[int, ...] = ()  # re-rank the top M for each M
    reranker: str | None = None  # cross-encoder (default: the best present when re-ranking, uniter-base first)
    batch_size: int = 64  # images / captions per forward pass
    device: str = "auto"  # auto | cpu | cuda
    cross_sample: int = 256  # pairs timed to extrapolate the full cross-encoder matrix (0: skip)
    save_embeddings: Path | None = None  # write the vectors and their ids here
    workers: int = 2  # image-decoding processes (a model that reads pixels; 0: in this process)


def check_request(dataset: str, split: str, model: str | None) -> str:
    """What can be refused before reading (or fetching) anything; returns the bi-encoder's name."""
    if split == "1k" and dataset != "coco":
        raise DatasetError(f"{option('split')} 1k is COCO's five 1K folds; Flickr30k and Multi30K test sets have 1,000 "
                           f"images already (use {option('split')} test)")
    if dataset == "multi30k" and model is None:
        raise ModelError(f"Multi30K needs a bi-encoder with a text tower for its language: pass {option('model')} "
                         "(e.g. one trained with `ldot train` on the base-multilingual preset)")
    return model or DEFAULT_EVAL_MODELS[dataset]


def run(opts: EvalOptions, progress: ProgressFn | None = None) -> EvalReport:
    """Locate the benchmark, load the models, extract missing features, evaluate, save embeddings."""
    import models

    check_request(opts.dataset, opts.split, opts.model)
    fold_size, split = (1000, "test") if opts.split == "1k" else (None, opts.split)
    rset = locate(opts.dataset, opts.paths, split, opts.lang)
    model_name = opts.model or DEFAULT_EVAL_MODELS[opts.dataset]
    encoder = models.load_bi_encoder(model_name, tokenizer=opts.tokenizer, device=opts.device)
    reranker_name = opts.reranker or (_default_reranker(regions=not reads_pixels(encoder)) if opts.rerank_ks else None)
    reranker = models.load_reranker(reranker_name, device=opts.device) if reranker_name else None
    if reranker is not None:
        _rerank_time_note(reranker, str(reranker_name), rset, opts, progress)
    t0 = time.perf_counter()
    had_features = rset.image_db is not None
    if not reads_pixels(encoder) or getattr(reranker, "inputs", "pixels") != "pixels":  # a dual encoder runs no
        # detector, nor does ViLT: region features only for a region model or a region re-ranker
        ensure_features(rset, device=opts.device, progress=progress)
    extraction_s = 0.0 if had_features or rset.image_db is None else time.perf_counter() - t0
    report = evaluate(rset, encoder, reranker=reranker, rerank_ks=opts.rerank_ks, fold_size=fold_size,
                      batch_size=opts.batch_size, cross_sample=opts.cross_sample, progress=progress,
                      workers=opts.workers)
    report.timings.feature_extraction_s = extraction_s
    report.model, report.reranker = str(model_name), reranker_name
    report.published = published_row(opts.dataset, opts.split, official_checkpoint(model_name))
    report.calibration = record_calibration(report, rset, model_name)
    if opts.save_embeddings is not None:
        save_embeddings(report, rset, opts.save_embeddings)
    return report


def _default_reranker(regions: bool = True) -> str:
    """The best re-ranker present (for a region model any kind fits: the benchmark has region features and image
    files; for a model that reads pixels, one that reads pixels too, so that no detector runs), else the first
    of the catalogue's that fits, whose loading then says how to get it."""
    try:
        return default_reranker(regions=regions)
    except LdotError:
        from models.hub.catalogue import REGION_RERANKER_KINDS, get_entry

        return next(n for n in RERANKERS if regions or get_entry(n).kind not in REGION_RERANKER_KINDS)


def _rerank_time_note(reranker: object, name: str, rset: RetrievalSet, opts: EvalOptions,
                      progress: ProgressFn | None) -> None:
    """On a CPU, say before it starts how long the cross-encoder's part will take (its measured range per pair)."""
    device = getattr(reranker, "device", None)
    per_pair = getattr(reranker, "cpu_seconds_per_pair", None)
    if device is None or getattr(device, "type", "cpu") != "cpu" or per_pair is None:
        return
    depth = max(opts.rerank_ks, default=0)
    pairs = (len(rset.captions) * min(depth, len(rset.images)) + len(rset.images) * min(depth, len(rset.captions))
             + min(opts.cross_sample, len(rset.captions) * len(rset.images)))
    lo, hi = (pairs * t for t in per_pair)
    reads = "reading the image files" if getattr(reranker, "inputs", "") == "pixels" else "on region features"
    report(progress, "re-ranking", 0, None, "pairs", event="note",
           text=f"re-ranking with {name} ({reads}) on the CPU (no GPU): {pairs:,} pairs, expect roughly "
                f"{_duration(lo)} to {_duration(hi)}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{max(1, round(seconds))} s"
    if seconds < 7200:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def record_calibration(report: EvalReport, rset: RetrievalSet, model_name: str | Path) -> dict[str, Any] | None:
    """Score distributions of the evaluated pairs; stored in the model dir (``--min-score auto`` reads them)."""
    from models.hub.load import resolve_source
    from models.training.calibration import (
        CalibrationError,
        calibrate,
        save_calibration,
    )

    if report.text_vectors is None or report.image_vectors is None:
        return None
    source = f"ldot eval {rset.dataset} {report.split}" + (f" [{rset.lang}]" if rset.lang else "")
    try:
        data = calibrate(report.text_vectors, report.image_vectors, rset.caption_images, source)
    except CalibrationError:
        return None
    saved = None
    try:
        directory = resolve_source(model_name)
    except LdotError:
        directory = None
    if directory is not None and directory.is_dir():
        saved = str(save_calibration(directory, data))
    auto = data["auto"]
    return {"auc": data["auc"], "auto_quantile": auto["quantile"], "auto_threshold": auto["threshold"],
            "match_pass_rate": auto["match_pass_rate"], "non_match_pass_rate": auto["non_match_pass_rate"],
            "pairs": data["pairs"], "saved_to": saved}


def save_embeddings(report: EvalReport, rset: RetrievalSet, directory: Path) -> Path:
    """Write ``text_vectors.npy`` (n_txt, D), ``image_vectors.npy`` (n_img, D) float32 and ``embeddings.json``
    (ids, captions, the image row of every caption, dataset and model)."""
    if report.text_vectors is None or report.image_vectors is None:
        raise LdotError("this report holds no vectors to save")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "text_vectors.npy", report.text_vectors.astype(np.float32))
        np.save(directory / "image_vectors.npy", report.image_vectors.astype(np.float32))
        meta = {"format": "ldot-eval-embeddings", "format_version": 1, "dataset": report.dataset,
                "split": report.split, "lang": report.lang, "model": report.model,
                "dim": int(report.text_vectors.shape[1]), "text_input": report.text_input,
                "text_ids": [c.id for c in rset.captions], "texts": [c.text for c in rset.captions],
                "text_image": [c.image for c in rset.captions],
                "image_ids": [im.file for im in rset.images], "image_keys": [im.key for im in rset.images]}
        (directory / "embeddings.json").write_text(json.dumps(meta, ensure_ascii=False))
    except OSError as exc:
        raise LdotError(f"cannot write embeddings to {directory}: {exc}") from None
    return directory
