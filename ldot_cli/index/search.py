"""Answer queries over a named index: one dot product per image, optional cross-encoder re-ranking.

A `Searcher` keeps the text tower, the FAISS index and the re-ranker loaded between queries (the
interactive prompt reuses one). It notices when a concurrent `ldot index` has written a newer vector
file and reloads it; vectors added since the last file write are searched exactly from SQLite.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldot_cli.index.hits import Hit
from ldot_cli.index.layout import IndexStoreError, IndexUnrecorded, index_path
from ldot_cli.index.store import IndexStore
from models.core.errors import LdotError, LdotWarning, option

DEFAULT_RERANK_K = 50
RERANKER_CACHE = 2  # cross-encoders kept loaded at once (least recently used dropped): each is ~0.5-1 GB


class QueryError(LdotError):
    """A query that cannot be answered as given (empty, unreadable image…)."""


@dataclass
class QueryTimings:
    encode_ms: float = 0.0
    search_ms: float = 0.0
    rerank_ms: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Request:
    """One query, as `ldot search` and `ldot serve` take it: text, or an image (a file, an indexed image's id
    or content hash), with its options."""

    text: str | None = None
    image_path: str | None = None
    vector_id: int | None = None
    image_sha256: str | None = None
    k: int = 10
    rerank_k: int | None = None  # re-rank the top M (text queries only)
    reranker: str | None = None
    min_score: str | float | None = None  # a number or "auto"
    regions: bool = False


@dataclass
class Answer:
    hits: list[Hit]
    min_score: float | None  # the level applied (auto resolved), None when none
    timings: QueryTimings
    below: int = 0  # results dropped by min_score

    @property
    def no_match(self) -> bool:
        return self.min_score is not None and not self.hits


def query_encoder_for_cpu(encoder: Any) -> Any:
    """A loaded query encoder (of any kind that is a torch module) in the precision queries run in on the CPU:
    int8 linear layers with ``LDOT_QUERY_PRECISION=int8``, else as loaded (`models.nn.quantize`)."""
    import torch

    from models.nn.quantize import int8_linears, query_precision

    if query_precision() == "int8" and isinstance(encoder, torch.nn.Module):
        return int8_linears(encoder)
    return encoder


def check_model(store: IndexStore, model: str | None) -> str:
    """The model to use with this index: its own, or ``model`` if it has the same fingerprint."""
    recorded = store.meta.model
    if recorded is None:
        raise IndexStoreError(f"index {store.name!r} holds no vectors yet: run `ldot index FOLDER --name {store.name}`")
    if model is None or model == recorded:
        return recorded
    from models.hub.load import fingerprint  # imports torch: only when another model is named

    want = store.meta.model_fingerprint
    got = fingerprint(model)
    if got != want:
        raise IndexStoreError(f"index {store.name!r} was built with model {recorded!r} (fingerprint {want}); "
                          f"{model!r} is another model ({got}): search without {option('model')}, or rebuild the index "
                          f"with `ldot index FOLDER --name {store.name} --model {model} --reindex`")
    return model


class Searcher:
    """Loaded state for answering queries over one index."""

    def __init__(self, name: str = "default", model: str | None = None, device: str = "auto") -> None:
        self.store = IndexStore(index_path(name))
        self.model_source = check_model(self.store, model)
        self.device = device
        self._encoder: Any = None
        self._faiss: tuple[Any, int] | None = None
        self._faiss_sha: str | None = None
        self._rerankers: OrderedDict[str, Any] = OrderedDict()  # resolved location -> model, LRU order
        self._regions: Any = None  # the index's region store, opened on the first --rerank or --regions
        self._image_tower: Any = None  # the bi-encoder's image tower, loaded on the first --regions
        self._pixels: bool | None = None
        self.last_vector: np.ndarray | None = None  # the (1, D) vector of the last query
        self.timings = QueryTimings()

    def close(self) -> None:
        if self._regions is not None:
            self._regions.close()
            self._regions = None
        self.store.close()

    # -- loading -------------------------------------------------------------------------------
    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from models.hub.load import load_bi_encoder

            self._encoder = load_bi_encoder(self.model_source, device="cpu", towers=("text",))
            self._encoder = query_encoder_for_cpu(self._encoder)
        return self._encoder

    @property
    def pixels(self) -> bool:
        """The index's model reads pixels (a dual encoder): no detector, no region boxes to explain scores."""
        if self._pixels is None:
            from models.hub.load import model_inputs

            self._pixels = model_inputs(self.model_source) == "pixels"
        return self._pixels

    def _vector_index(self) -> tuple[Any, int] | None:
        """The FAISS index (reloaded when a writer replaced it), or None when there is no file yet."""
        sha = self.store.vector_token()
        if sha != self._faiss_sha:
            try:
                self._faiss = self.store.read_faiss()
            except IndexStoreError as exc:
                self._faiss = self._repair(upgrade=isinstance(exc, IndexUnrecorded))
            self._faiss_sha = self.store.vector_token()
        return self._faiss

    def _repair(self, upgrade: bool = False) -> tuple[Any, int] | None:
        """A damaged vector file: rebuild it from SQLite when no writer is busy; else search SQLite only.
        ``upgrade``: files an older ldot wrote without a checksum, rewritten and recorded once (no warning)."""
        from ldot_cli.index.lock import writer_lock

        with writer_lock(self.store.dir, wait=False) as held:
            if not held:
                return None  # the writer will rewrite it; meanwhile every vector is searched from SQLite
            if not upgrade:
                warnings.warn(LdotWarning(f"the vector file of index {self.store.name!r} was damaged; "
                                          "rebuilt it from the index database"), stacklevel=2)
            self.store.sync_faiss()  # only the damaged parts of an approximate index, all of an exact one
            try:
                return self.store.read_faiss()
            except IndexStoreError:
                self.store.sync_faiss(rebuild=True)
                return self.store.read_faiss()

    # -- queries -------------------------------------------------------------------------------
    def text_vector(self, query: str) -> np.ndarray:
        if not query or not query.strip():
            raise QueryError("empty query: give some words to search for, e.g. `ldot search \"a dog on a beach\"`")
        start = time.perf_counter()
        encoder = self.encoder
        pieces, limit = encoder.text_tokens(query)  # special tokens not counted
        if pieces > limit:
            unit = "tokens" if getattr(encoder, "inputs", "regions") == "pixels" else "word-pieces"
            warnings.warn(LdotWarning(f"the query is {pieces} {unit} long and the model reads at most "
                                      f"{limit}: only its first {limit} are searched for"), stacklevel=2)
        vector = encoder.encode_text([query]).numpy()
        self.timings.encode_ms = 1000 * (time.perf_counter() - start)
        self.last_vector = vector
        return vector

    def indexed_vector(self, vector_id: int) -> np.ndarray:
        """The stored vector of an indexed image (``similar images`` of a result)."""
        ids, vectors = self.store.vectors(ids=[int(vector_id)])
        if not len(ids):
            raise QueryError(f"no indexed image has id {vector_id} (removed from the index?)")
        self.timings.encode_ms = 0.0
        self.last_vector = vectors
        return vectors

    def vector_for_hash(self, content_hash: str) -> int | None:
        return self.store.vector_for_hash(content_hash)

    def image_vector(self, path: str | Path) -> np.ndarray:
        """The vector of an image: its stored one when its content is indexed, else detector + image tower."""
        import stat

        from ldot_cli.index.indexer import encode_image_file
        from models.core.fileio import sha256_file

        path = Path(path)
        try:
            info = path.stat()
        except OSError as exc:
            raise QueryError(f"{path} is not a readable file ({exc.strerror or exc})") from None
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0 or str(path.resolve()).startswith(("/proc/", "/sys/")):
            raise QueryError(f"{path} is not a regular image file: give a photo (JPEG, PNG, ...)")
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise QueryError(f"{path} could not be read as an image file ({exc.strerror or exc})") from None
        vid = self.store.vector_for_hash(digest)
        if vid is not None:
            return self.indexed_vector(vid)
        start = time.perf_counter()
        if self.pixels:  # the dual encoder already loaded for text queries reads the image too
            from feature_extraction.errors import ImageLoadError
            from feature_extraction.images.decode import load_image

            try:
                rgb = load_image(path)
            except ImageLoadError as exc:
                raise QueryError(f"{path} could not be read as an image ({exc.reason})") from None
            pixels, _ = self.encoder.pixel_preprocess(rgb)
            vector = self.encoder.encode_images([pixels.numpy()]).numpy()[0]
        else:
            vector = encode_image_file(path, self.store, device=self.device)
        self.timings.encode_ms = 1000 * (time.perf_counter() - start)
        self.last_vector = vector[None]
        return vector[None]

    def search_vector(self, vector: np.ndarray, k: int = 10) -> list[Hit]:
        from models.core import ann

        start = time.perf_counter()
        loaded = self._vector_index()
        index, max_id = loaded if loaded is not None else (None, 0)
        extra_ids, extra = self.store.vectors(min_id=max_id)
        want = k + 8
        while True:
            scores, ids = ann.search(index, vector, want, extra_ids, extra)
            hits = self._to_hits(scores[0], ids[0], k)
            exhausted = (ids[0] >= 0).sum() < want
            if len(hits) >= k or exhausted:
                break
            want *= 4  # many results were removed files or duplicates: look deeper
        self.timings.search_ms = 1000 * (time.perf_counter() - start)
        return hits

    def _to_hits(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[Hit]:
        valid = [(float(s), int(i)) for s, i in zip(scores, ids) if i >= 0]
        paths = self.store.paths_for_vectors([i for _, i in valid])
        hits: list[Hit] = []
        for score, vid in valid:
            for path in paths.get(vid, []):
                hits.append(Hit(len(hits) + 1, path, score, vid))
                if len(hits) == k:
                    return hits
        return hits

    def search(self, query: str, k: int = 10, rerank_k: int | None = None, reranker: str | None = None) -> list[Hit]:
        """Top-k images for a text query; with ``rerank_k`` the top M are re-scored by a cross-encoder."""
        if k < 1:
            raise QueryError(f"{option('k')} must be at least 1 (got {k})")
        if rerank_k is not None and rerank_k < 1:
            raise QueryError(f"{option('rerank_k')} must be at least 1 (got {rerank_k}): it is how many top results are "
                             "re-scored")
        vector = self.text_vector(query)
        if not rerank_k:
            return self.search_vector(vector, k)
        hits = self.search_vector(vector, max(k, rerank_k))
        return self.rerank(query, hits[:rerank_k], reranker)[:k]

    def answer(self, request: Request) -> Answer:
        """Answer one `Request`: the results `ldot search` prints and `ldot serve` returns."""
        if request.k < 1:
            raise QueryError(f"{option('k')} must be at least 1 (got {request.k})")
        if request.text is None and isinstance(request.min_score, str) and request.min_score.strip().lower() == "auto":
            raise QueryError(f"{option('min_score')} auto is calibrated on text-image pairs: give a number for "
                             "image queries")
        level = self._level(request)
        self.timings = QueryTimings()
        sources = sum(x is not None for x in (request.text, request.image_path, request.vector_id,
                                              request.image_sha256))
        if sources != 1:
            raise QueryError("give either a text query or an image")
        if request.text is not None:
            hits = self.search(request.text, request.k, rerank_k=request.rerank_k, reranker=request.reranker)
        else:
            if request.rerank_k:
                raise QueryError(f"{option('rerank')} needs a text query (the cross-encoder scores text-image pairs)")
            hits = self.search_vector(self.query_vector(request), request.k)
        kept = hits if level is None else [h for h in hits if h.score >= level]
        for rank, hit in enumerate(kept, 1):
            hit.rank = rank
        if request.regions and kept:
            if self.has_boxes:
                self.explain(kept)
            else:
                warnings.warn(LdotWarning(self.no_boxes_reason()), stacklevel=2)
        return Answer(kept, level, self.timings, len(hits) - len(kept))

    def query_vector(self, request: Request) -> np.ndarray:
        """The (1, D) vector of a request's query: its text encoded, or an image's (a file, an id, a hash)."""
        if request.text is not None:
            return self.text_vector(request.text)
        if request.image_path is not None:
            return self.image_vector(request.image_path)
        if request.vector_id is not None:
            return self.indexed_vector(request.vector_id)
        if request.image_sha256 is None:
            raise QueryError("give either a text query or an image")
        vid = self.store.vector_for_hash(str(request.image_sha256))
        if vid is None:
            raise QueryError("that image is not in the index")
        return self.indexed_vector(vid)

    def regions_of(self, request: Request, vector_ids: list[int], of: int | None = None) -> list[Hit]:
        """The boxes driving the scores of some indexed images for a request's query, asked for after its
        results (`ldot serve` draws them on demand: they cost seconds per image on a CPU). One hit per id that
        still has a file (rank: its place in ``vector_ids``; score: the query's bi-encoder score).

        ``of``: how many results these are a part of (default: just these). Each image gets the share of the
        attribution budget it has when all ``of`` are explained together, so asking for a grid's boxes a few
        at a time (or for one opened photo) finds the same boxes at the same cost per image."""
        from models.nn.attribution import REMOVAL_BUDGET

        self.timings = QueryTimings()
        vector_ids = list(dict.fromkeys(vector_ids))
        share = max(1, REMOVAL_BUDGET * len(vector_ids) // max(of or 0, len(vector_ids), 1))
        vector = self.query_vector(request)
        paths = self.store.paths_for_vectors(vector_ids)
        ids, stored = self.store.vectors(ids=[v for v in vector_ids if paths.get(v)])
        scores = dict(zip(ids.tolist(), (stored @ vector[0]).tolist()))
        hits = [Hit(rank, paths[v][0], scores[v], v) for rank, v in enumerate(vector_ids, 1) if v in scores]
        return self.explain(hits, vector, budget=share)

    # -- thresholds ------------------------------------------------------------------------------
    def model_dir(self) -> Path | None:
        from models.hub.load import resolve_source

        try:
            path = resolve_source(self.model_source)
        except LdotError:
            return None
        return path if path.is_dir() else None

    def auto_min_score(self) -> float:
        """The model's calibrated ``--min-score auto`` level (see `models.training.calibration`)."""
        from models.training.calibration import CalibrationError, auto_threshold

        directory = self.model_dir()
        if directory is None:
            raise CalibrationError(f"model {self.model_source!r} is not a model dir: it has no score calibration")
        # scores are cosines for a dual encoder (CLIP's matching pairs mostly 0.2-0.35), raw dot products otherwise
        return auto_threshold(directory, self.model_source, "0.25" if self.pixels else "5.0")

    def _level(self, request: Request) -> float | None:
        """``request.min_score`` resolved; an uncalibrated ``auto`` for a text query suggests a number taken from
        how this query scores over the index itself (a model's scores can be ~0.05 or ~50: no fixed example fits)."""
        from models.training.calibration import CalibrationError

        try:
            return self.min_score(request.min_score)
        except CalibrationError as exc:
            if request.text is None or not request.text.strip():
                raise
            hint = self.suggest_min_score(request.text)
            if hint is None:
                raise
            raise CalibrationError(f"{exc.args[0]}: {hint}") from None

    def suggest_min_score(self, text: str, sample: int = 2000, keep: float = 0.1) -> str | None:
        """A ``--min-score`` for ``text`` from the index's own score spread: its scores against up to ``sample``
        stored vectors, and the level that keeps about the top ``keep`` of them (None for an empty index)."""
        _, vectors = self.store.sample_vectors(sample)
        if not len(vectors):
            return None
        scores = vectors @ self.text_vector(text)[0]
        low, median, high = np.quantile(scores, [0.0, 0.5, 1.0])
        level = float(np.quantile(scores, 1.0 - keep))
        return (f"this query scores {low:.3g} to {high:.3g} (median {median:.3g}) over {len(scores):,} images of "
                f"index {self.store.name!r}: e.g. {option('min_score')} {level:.3g} keeps about the top "
                f"{100 * keep:g}%")

    def min_score(self, value: str | float | None) -> float | None:
        """``--min-score``: None, a number, or ``auto``."""
        if value is None or value == "":
            return None
        if isinstance(value, str) and value.strip().lower() == "auto":
            return self.auto_min_score()
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise QueryError(f"{option('min_score')} must be a number or 'auto' (got {value!r})") from None
        if not np.isfinite(number):
            raise QueryError(f"{option('min_score')} must be a finite number (got {value!r})")
        return number

    # -- regions ---------------------------------------------------------------------------------
    @property
    def has_boxes(self) -> bool:
        """Whether results can show the boxes that drive their scores: a region model's index that keeps its
        region features (a dual encoder reads whole images: its scores come from no box)."""
        return not self.pixels and self.has_regions

    def no_boxes_reason(self) -> str:
        if self.pixels:
            return (f"index {self.store.name!r} uses {self.model_source}, which reads whole images: there are no "
                    "region boxes to show (results are listed without them)")
        return (f"index {self.store.name!r} keeps no region features (built with {option('no_regions')}): results "
                "are listed without boxes")

    def region_store(self) -> Any:
        from feature_extraction.uniter_db import FeatureStore
        from ldot_cli.index.layout import REGIONS_DIR

        regions_dir = self.store.dir / REGIONS_DIR
        if not self.store.meta.keeps_regions or not regions_dir.is_dir():
            raise IndexStoreError(f"index {self.store.name!r} keeps no region features (built with "
                                  f"{option('no_regions')}): re-index without it to use {option('rerank')} or "
                                  f"{option('regions')}")
        if self._regions is None:
            self._regions = FeatureStore(regions_dir, self.preset)
        return self._regions

    def region_records(self, vector_ids: list[int]) -> list[Any]:
        """The stored region features of indexed images (the store is reopened once when a concurrent
        `ldot index` added records since it was opened)."""
        from feature_extraction.errors import ImageDBError

        hashes = self.store.content_hashes(vector_ids)
        missing = [v for v in vector_ids if v not in hashes]
        if missing:
            raise QueryError(f"image {missing[0]} left the index meanwhile: search again")
        try:
            return [self.region_store().get(hashes[v]) for v in vector_ids]
        except ImageDBError:
            if self._regions is not None:
                self._regions.close()
                self._regions = None
        try:
            return [self.region_store().get(hashes[v]) for v in vector_ids]
        except ImageDBError as exc:
            from ldot_cli.index.indexer import damaged_regions

            raise damaged_regions(self.store.name, exc) from None

    @property
    def image_tower(self) -> Any:
        if self._image_tower is None:
            from models.hub.load import load_bi_encoder

            self._image_tower = load_bi_encoder(self.model_source, device="cpu", towers=("image",))
        return self._image_tower

    def explain(self, hits: list[Hit], vector: np.ndarray | None = None, max_boxes: int = 3,
                budget: int | None = None) -> list[Hit]:
        """Add to each hit the boxes that most drive its bi-encoder score (`models.nn.attribution`)."""
        from ldot_cli.index.thumbs import oriented_size
        from models.nn.attribution import region_weights

        if not hits:
            return hits
        vector = self.last_vector if vector is None else vector
        if vector is None:
            raise QueryError("no query to explain the results of")
        start = time.perf_counter()
        records = self.region_records([h.vector_id for h in hits])
        queries = np.repeat(np.asarray(vector, np.float32).reshape(1, -1), len(hits), axis=0)
        extra = {} if budget is None else {"budget": budget}  # removal passes shared by these hits
        _, boxes = region_weights(self.image_tower, queries, records, max_boxes=max_boxes, **extra)
        for hit, found in zip(hits, boxes):
            hit.regions = [(*b.box, b.weight) for b in found]
            try:
                hit.size = oriented_size(hit.path)
            except OSError:
                hit.size = None  # the file went away: fractions only
        self.timings.extra["regions_ms"] = 1000 * (time.perf_counter() - start)
        return hits

    # -- re-ranking ------------------------------------------------------------------------------
    @property
    def preset(self) -> str:
        """The box preset the index's region features were extracted with."""
        return self.store.meta.box_preset

    @property
    def has_regions(self) -> bool:
        """Whether the index keeps region features (what UNITER and LXMERT re-rank; ViLT reads the photos)."""
        from ldot_cli.index.layout import REGIONS_DIR

        return self.store.meta.keeps_regions and (self.store.dir / REGIONS_DIR).is_dir()

    def reranker_name(self, name: str | None) -> str:
        """The re-ranker asked for, else the best one present for this index (`default_reranker`)."""
        from models.hub.cache import default_reranker

        if name:
            return name
        if self.has_regions:
            return default_reranker(regions=True)
        try:
            return default_reranker(regions=False)
        except LdotError:
            raise IndexStoreError(f"index {self.store.name!r} keeps no region features (built with "
                                  f"{option('no_regions')}) and no re-ranker that reads the photos is in the cache: "
                                  "run `ldot models download vilt-flickr30k` (it re-ranks any index), or re-index "
                                  f"without {option('no_regions')} for UNITER or LXMERT") from None

    def reranker(self, name: str | None) -> Any:
        """The cross-encoder ``name`` (default: the best present for this index), loaded once: the last
        `RERANKER_CACHE` used stay loaded, keyed by where they resolve to (``/x``, ``/x/`` and ``//x`` are one)."""
        from models.hub.load import load_reranker, resolve_source

        name = self.reranker_name(name)
        key = str(resolve_source(name).resolve())
        if key in self._rerankers:
            self._rerankers.move_to_end(key)
            return self._rerankers[key]
        model = load_reranker(name, device=self.device)
        self._rerankers[key] = model
        while len(self._rerankers) > RERANKER_CACHE:
            self._rerankers.popitem(last=False)
        return model

    def rerank(self, query: str, hits: list[Hit], reranker: str | None = None) -> list[Hit]:
        """Re-score (query, image) pairs with the cross-encoder and sort by its score.

        A region cross-encoder (UNITER, LXMERT) reads the index's region features; one that reads pixels (ViLT)
        reads the photos themselves, so it re-ranks any index: a photo gone or unreadable since indexing is left out
        of the results, with a warning saying why."""
        if not hits:
            return hits
        from models.nn.regions import stack_regions

        model = self.reranker(reranker)
        start = time.perf_counter()
        if getattr(model, "inputs", "regions") == "pixels":
            hits, scores = self._pixel_scores(model, query, hits)
        else:
            self.region_store()  # a clear error when the index keeps none
            feat, bb, mask, _ = stack_regions(self.region_records([h.vector_id for h in hits]))
            scores = model.score([query] * len(hits), feat, bb, mask).numpy()
        self.timings.rerank_ms = 1000 * (time.perf_counter() - start)
        order = np.argsort(-scores, kind="stable")
        out = []
        for rank, i in enumerate(order, 1):
            hit = hits[i]
            out.append(Hit(rank, hit.path, hit.score, hit.vector_id, float(scores[i])))
        return out

    def _pixel_scores(self, model: Any, query: str, hits: list[Hit]) -> tuple[list[Hit], np.ndarray]:
        """Scores of a cross-encoder that reads pixels, from the hits' files (another copy of the same photo when
        the hit's own file is gone); hits whose photo cannot be read are dropped, each with a warning."""
        import os
        import stat

        from feature_extraction.errors import ImageLoadError
        from feature_extraction.images.decode import load_image
        from ldot_cli.index.hits import display_path
        from models.core.fileio import sha256_file

        if model.truncates(query):
            warnings.warn(LdotWarning(f"the query is longer than the re-ranker reads ({model.max_text_tokens} "
                                      "word-pieces with [CLS] and [SEP]): it scores the first ones only"), stacklevel=3)
        copies = self.store.paths_for_vectors([h.vector_id for h in hits])
        indexed = self.store.content_hashes([h.vector_id for h in hits])
        kept, pixels = [], []
        for hit in hits:
            reason = None
            for path in [hit.path, *(p for p in copies.get(hit.vector_id, []) if p != hit.path)]:
                try:  # the photo as it was indexed: a regular file whose bytes still have the indexed content hash
                    if not stat.S_ISREG(os.stat(path).st_mode):
                        reason = reason or "not a regular file"
                        continue
                    if sha256_file(os.fsdecode(path)) != indexed.get(hit.vector_id):
                        reason = reason or "its content changed"
                        continue
                    pixels.append(model.prepare(load_image(os.fsdecode(path))))
                except ImageLoadError as exc:
                    reason = reason or exc.reason
                    continue
                except OSError as exc:
                    reason = reason or ("file not found" if isinstance(exc, FileNotFoundError)
                                        else f"cannot read it: {exc.strerror or exc}")
                    continue
                kept.append(hit)
                break
            else:
                warnings.warn(LdotWarning(f"left out of the re-ranked results: {display_path(hit.path)} ({reason}; "
                                          "gone or changed since indexing? `ldot index` again to update the index)"),
                              stacklevel=3)
        scores = model.score_pixels([query] * len(kept), pixels).numpy() if kept else np.empty(0, np.float32)
        return kept, scores
