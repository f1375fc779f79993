"""Answer queries over a named index: one dot product per image, optional cross-encoder re-ranking.

A `Searcher` keeps the text tower, the vector index and the re-rankers loaded between queries (the interactive
prompt and `ldot serve` reuse one). It composes the parts that can each be read alone: the live vector index
(`live_index`: reloaded when a concurrent `ldot index` wrote a newer vector file, vectors added since searched
exactly from SQLite), the region features (`region_features`), the boxes behind scores (`boxes`), re-ranking
(`rerank`) and ``--min-score`` levels (`score_levels`).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ldot_cli.index import score_levels
from ldot_cli.index.boxes import BoxExplainer
from ldot_cli.index.hits import Answer, Hit, QueryTimings
from ldot_cli.index.layout import IndexStoreError, index_path
from ldot_cli.index.live_index import LiveVectorIndex
from ldot_cli.index.query import QueryError, Request
from ldot_cli.index.region_features import RegionFeatures
from ldot_cli.index.rerank import Rerankers
from ldot_cli.index.store import IndexStore
from models.core.errors import LdotWarning, option

DEFAULT_RERANK_K = 50


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
        self._pixels: bool | None = None
        self.vectors = LiveVectorIndex(self.store)
        self.region_features = RegionFeatures(self.store)  # opened on the first --rerank or --regions
        self.boxes = BoxExplainer(self.model_source, self.region_features)
        self.rerankers = Rerankers(self.store, self.region_features, device)
        self.last_vector: np.ndarray | None = None  # the (1, D) vector of the last query
        self.timings = QueryTimings()

    def close(self) -> None:
        self.region_features.close()
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
        start = time.perf_counter()
        hits = self.vectors.search(vector, k)
        self.timings.search_ms = 1000 * (time.perf_counter() - start)
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
    def auto_min_score(self) -> float:
        """The model's calibrated ``--min-score auto`` level (see `models.training.calibration`)."""
        return score_levels.auto_min_score(self.model_source, self.pixels)

    def min_score(self, value: str | float | None) -> float | None:
        """``--min-score``: None, a number, or ``auto``."""
        return score_levels.parse_min_score(value, self.auto_min_score)

    def suggest_min_score(self, text: str, sample: int = 2000, keep: float = 0.1) -> str | None:
        """A ``--min-score`` for ``text`` from the index's own score spread (`score_levels.suggest_min_score`)."""
        return score_levels.suggest_min_score(self.store, lambda: self.text_vector(text), sample, keep)

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

    # -- regions ---------------------------------------------------------------------------------
    @property
    def has_regions(self) -> bool:
        """Whether the index keeps region features (what UNITER and LXMERT re-rank; ViLT reads the photos)."""
        return self.region_features.kept

    @property
    def preset(self) -> str:
        """The box preset the index's region features were extracted with."""
        return self.region_features.preset

    def region_records(self, vector_ids: list[int]) -> list[Any]:
        return self.region_features.records(vector_ids)

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

    @property
    def image_tower(self) -> Any:
        return self.boxes.image_tower

    def explain(self, hits: list[Hit], vector: np.ndarray | None = None, max_boxes: int = 3,
                budget: int | None = None) -> list[Hit]:
        """Add to each hit the boxes that most drive its bi-encoder score (`BoxExplainer`); ``vector``: the
        query's, by default the last one's."""
        if not hits:
            return hits
        vector = self.last_vector if vector is None else vector
        if vector is None:
            raise QueryError("no query to explain the results of")
        start = time.perf_counter()
        self.boxes.explain(hits, vector, max_boxes, budget)
        self.timings.extra["regions_ms"] = 1000 * (time.perf_counter() - start)
        return hits

    # -- re-ranking ------------------------------------------------------------------------------
    def reranker_name(self, name: str | None) -> str:
        """The re-ranker asked for, else the best one present for this index (`default_reranker`)."""
        return self.rerankers.name(name)

    def reranker(self, name: str | None) -> Any:
        """The cross-encoder ``name`` (default: the best present for this index), loaded once (`Rerankers.get`)."""
        return self.rerankers.get(name)

    def rerank(self, query: str, hits: list[Hit], reranker: str | None = None) -> list[Hit]:
        """Re-score (query, image) pairs with the cross-encoder and sort by its score (`Rerankers.rerank`)."""
        if not hits:
            return hits
        model = self.reranker(reranker)
        start = time.perf_counter()
        out = self.rerankers.rerank(model, query, hits)
        self.timings.rerank_ms = 1000 * (time.perf_counter() - start)
        return out
