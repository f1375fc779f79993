"""The vector index of a named index as a searcher sees it while `ldot index` may be writing to it.

The FAISS file is loaded once and reloaded when a writer has replaced it (its recorded checksum, the token
``faiss_sha256`` meta row, changed); a damaged file is rebuilt from SQLite when no writer is busy. Vectors added since
the file was written are searched exactly from SQLite, so every indexed image is found.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ldot_cli.index.hits import Hit
from ldot_cli.index.layout import IndexStoreError, IndexUnrecorded
from ldot_cli.index.store import IndexStore
from models.core.errors import LdotWarning


class LiveVectorIndex:
    """The searchable vectors of one index: its FAISS file (kept loaded) and the vectors added since."""

    def __init__(self, store: IndexStore) -> None:
        self.store = store
        self._loaded: tuple[Any, int] | None = None  # (FAISS index, the highest vector id it holds)
        self._token: str | None = None  # the checksum of the file loaded

    def load(self) -> tuple[Any, int] | None:
        """The FAISS index and the highest vector id it holds (reloaded when a writer replaced the file), or None
        when there is no file yet."""
        token = self.store.vector_token()
        if token != self._token:
            try:
                self._loaded = self.store.read_faiss()
            except IndexStoreError as exc:
                self._loaded = self._repair(upgrade=isinstance(exc, IndexUnrecorded))
            self._token = self.store.vector_token()
        return self._loaded

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

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        """The top ``k`` files for a (1, D) query vector: one hit per file (an image indexed under several paths
        gives several), removed files left out."""
        from models.core import ann

        loaded = self.load()
        index, max_id = loaded if loaded is not None else (None, 0)
        extra_ids, extra = self.store.vectors(min_id=max_id)
        want = k + 8
        while True:
            scores, ids = ann.search(index, vector, want, extra_ids, extra)
            hits = self._to_hits(scores[0], ids[0], k)
            exhausted = (ids[0] >= 0).sum() < want
            if len(hits) >= k or exhausted:
                return hits
            want *= 4  # many results were removed files or duplicates: look deeper

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
