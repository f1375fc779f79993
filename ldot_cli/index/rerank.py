"""Re-ranking a query's top results with a cross-encoder: which one (asked for, else the best present for the
index), the few kept loaded between queries, and how each scores: a region cross-encoder (UNITER, LXMERT) from
the index's region features, one that reads pixels (ViLT) from the photos themselves."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import numpy as np

from ldot_cli.index.hits import Hit, display_path
from ldot_cli.index.layout import IndexStoreError
from ldot_cli.index.region_features import RegionFeatures
from ldot_cli.index.store import IndexStore
from models.core.errors import LdotError, LdotWarning, option

RERANKER_CACHE = 2  # cross-encoders kept loaded at once (least recently used dropped): each is ~0.5-1 GB


class Rerankers:
    """The cross-encoders of one index's searches, loaded on demand (the last `RERANKER_CACHE` used stay)."""

    def __init__(self, store: IndexStore, regions: RegionFeatures, device: str = "auto") -> None:
        self.store = store
        self.regions = regions
        self.device = device
        self.loaded: OrderedDict[str, Any] = OrderedDict()  # resolved location -> model, least recently used first

    def name(self, name: str | None) -> str:
        """The re-ranker asked for, else the best one present for this index (`default_reranker`)."""
        from models.hub.installed import default_reranker

        if name:
            return name
        if self.regions.kept:
            return default_reranker(regions=True)
        try:
            return default_reranker(regions=False)
        except LdotError:
            raise IndexStoreError(f"index {self.store.name!r} keeps no region features (built with "
                                  f"{option('no_regions')}) and no re-ranker that reads the photos is in the cache: "
                                  "run `ldot models download vilt-flickr30k` (it re-ranks any index), or re-index "
                                  f"without {option('no_regions')} for UNITER or LXMERT") from None

    def get(self, name: str | None) -> Any:
        """The cross-encoder ``name`` (default: the best present for this index), loaded once: the last
        `RERANKER_CACHE` used stay loaded, keyed by where they resolve to (``/x``, ``/x/`` and ``//x`` are one)."""
        from models.hub.load import load_reranker, resolve_source

        name = self.name(name)
        key = str(resolve_source(name).resolve())
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        model = load_reranker(name, device=self.device)
        self.loaded[key] = model
        while len(self.loaded) > RERANKER_CACHE:
            self.loaded.popitem(last=False)
        return model

    def rerank(self, model: Any, query: str, hits: list[Hit]) -> list[Hit]:
        """Re-score (query, image) pairs with the cross-encoder ``model`` and sort by its score (new hits, ranked
        from 1). A photo gone or unreadable since indexing is left out when ``model`` reads pixels, with a warning
        saying why."""
        from models.nn.regions import stack_regions

        if getattr(model, "inputs", "regions") == "pixels":
            hits, scores = self._pixel_scores(model, query, hits)
        else:
            self.regions.open()  # a clear error when the index keeps none
            feat, bb, mask, _ = stack_regions(self.regions.records([h.vector_id for h in hits]))
            scores = model.score([query] * len(hits), feat, bb, mask).numpy()
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
        from models.core.fileio import sha256_file

        if model.truncates(query):
            warnings.warn(LdotWarning(f"the query is longer than the re-ranker reads ({model.max_text_tokens} "
                                      "word-pieces with [CLS] and [SEP]): it scores the first ones only"), stacklevel=4)
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
                              stacklevel=4)
        scores = model.score_pixels([query] * len(kept), pixels).numpy() if kept else np.empty(0, np.float32)
        return kept, scores
