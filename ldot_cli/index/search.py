"""Answer queries over a named index: one dot product per image, optional cross-encoder re-ranking.

A `Searcher` keeps the text tower, the FAISS index and the re-ranker loaded between queries (the
interactive prompt reuses one). It notices when a concurrent `ldot index` has written a newer vector
file and reloads it; vectors added since the last file write are searched exactly from SQLite.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldot_cli.index.store import IndexStore, IndexStoreError, display_path, index_path
from models.core.errors import LdotError, LdotWarning, option

DEFAULT_RERANK_K = 50


class QueryError(LdotError):
    """A query that cannot be answered as given (empty, unreadable image…)."""


@dataclass
class Hit:
    rank: int
    path: bytes
    score: float
    vector_id: int
    rerank_score: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "path": display_path(self.path), "score": round(self.score, 6)}
        if self.rerank_score is not None:
            out["rerank_score"] = round(self.rerank_score, 6)
        return out


@dataclass
class QueryTimings:
    encode_ms: float = 0.0
    search_ms: float = 0.0
    rerank_ms: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def check_model(store: IndexStore, model: str | None) -> str:
    """The model to use with this index: its own, or ``model`` if it has the same fingerprint."""
    from models.hub.load import fingerprint

    recorded = store.get_meta("model")
    if recorded is None:
        raise IndexStoreError(f"index {store.name!r} holds no vectors yet: run `ldot index FOLDER --name {store.name}`")
    if model is None or model == recorded:
        return recorded
    want = store.get_meta("model_fingerprint")
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
        self._rerankers: dict[str, Any] = {}
        self._regions: Any = None  # the index's region store, opened on the first --rerank
        self.timings = QueryTimings()

    def close(self) -> None:
        if self._regions is not None:
            self._regions.close()
        self.store.close()

    # -- loading -------------------------------------------------------------------------------
    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from models.hub.load import load_bi_encoder

            self._encoder = load_bi_encoder(self.model_source, device="cpu", towers=("text",))
        return self._encoder

    def _vector_index(self) -> tuple[Any, int] | None:
        """The FAISS index (reloaded when a writer replaced it), or None when there is no file yet."""
        sha = self.store.get_meta("faiss_sha256")
        if sha != self._faiss_sha:
            try:
                self._faiss = self.store.read_faiss()
            except IndexStoreError:
                self._faiss = self._repair()
            self._faiss_sha = self.store.get_meta("faiss_sha256")
        return self._faiss

    def _repair(self) -> tuple[Any, int] | None:
        """A damaged vector file: rebuild it from SQLite when no writer is busy; else search SQLite only."""
        from ldot_cli.index.store import writer_lock

        with writer_lock(self.store.dir, wait=False) as held:
            if not held:
                return None  # the writer will rewrite it; meanwhile every vector is searched from SQLite
            warnings.warn(LdotWarning(f"the vector file of index {self.store.name!r} was damaged; "
                                      "rebuilt it from the index database"), stacklevel=2)
            self.store.sync_faiss(rebuild=True)
            return self.store.read_faiss()

    # -- queries -------------------------------------------------------------------------------
    def text_vector(self, query: str) -> np.ndarray:
        if not query or not query.strip():
            raise QueryError("empty query: give some words to search for, e.g. `ldot search \"a dog on a beach\"`")
        start = time.perf_counter()
        vector = self.encoder.encode_text([query]).numpy()
        self.timings.encode_ms = 1000 * (time.perf_counter() - start)
        return vector

    def image_vector(self, path: str | Path) -> np.ndarray:
        """The vector of an image: its stored one when its content is indexed, else detector + image tower."""
        from ldot_cli.index.indexer import encode_image_file
        from models.core.fileio import sha256_file

        path = Path(path)
        if not path.is_file():
            raise QueryError(f"{path} is not a readable file")
        digest = sha256_file(path)
        vid = self.store.vector_for_hash(digest)
        if vid is not None:
            return self.store.vectors(ids=[vid])[1]
        start = time.perf_counter()
        vector = encode_image_file(path, self.store, device=self.device)
        self.timings.encode_ms = 1000 * (time.perf_counter() - start)
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
            raise QueryError(f"-k must be at least 1 (got {k})")
        vector = self.text_vector(query)
        if not rerank_k:
            return self.search_vector(vector, k)
        hits = self.search_vector(vector, max(k, rerank_k))
        return self.rerank(query, hits[:rerank_k], reranker)[:k]

    # -- re-ranking ------------------------------------------------------------------------------
    @property
    def preset(self) -> str:
        """The box preset the index's region features were extracted with."""
        from ldot_cli.index.indexer import DEFAULT_PRESET

        return self.store.get_meta("preset") or DEFAULT_PRESET

    def reranker(self, name: str | None) -> Any:
        from models.hub.cache import default_reranker

        name = name or default_reranker()
        if name not in self._rerankers:
            from models.hub.load import load_reranker

            self._rerankers[name] = load_reranker(name, device=self.device)
        return self._rerankers[name]

    def rerank(self, query: str, hits: list[Hit], reranker: str | None = None) -> list[Hit]:
        """Re-score (query, image) pairs with the cross-encoder and sort by its score."""
        if not hits:
            return hits
        from feature_extraction.uniter_db import FeatureStore
        from ldot_cli.index.store import REGIONS_DIR
        from models.nn.regions import stack_regions

        regions_dir = self.store.dir / REGIONS_DIR
        if self.store.get_meta("regions") == "none" or not regions_dir.is_dir():
            raise IndexStoreError(f"index {self.store.name!r} keeps no region features (built with "
                                  f"{option('no_regions')}): "
                              f"re-index without it to use {option('rerank')}")
        model = self.reranker(reranker)
        start = time.perf_counter()
        hashes = self.store.content_hashes([h.vector_id for h in hits])
        from feature_extraction.errors import ImageDBError

        try:
            if self._regions is None:
                self._regions = FeatureStore(regions_dir, self.preset)
            records = [self._regions.get(hashes[h.vector_id]) for h in hits]
        except ImageDBError as exc:
            from ldot_cli.index.indexer import damaged_regions

            raise damaged_regions(self.store.name, exc) from None
        feat, bb, mask, _ = stack_regions(records)
        scores = model.score([query] * len(hits), feat, bb, mask).numpy()
        self.timings.rerank_ms = 1000 * (time.perf_counter() - start)
        order = np.argsort(-scores, kind="stable")
        out = []
        for rank, i in enumerate(order, 1):
            hit = hits[i]
            out.append(Hit(rank, hit.path, hit.score, hit.vector_id, float(scores[i])))
        return out
