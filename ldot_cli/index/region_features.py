"""The region features an index keeps beside its vectors (detector boxes and their features, per content hash):
what the region cross-encoders (UNITER, LXMERT) re-rank and what explains a score by its boxes."""

from __future__ import annotations

from typing import Any

from ldot_cli.index.layout import REGIONS_DIR, IndexStoreError
from ldot_cli.index.query import QueryError
from ldot_cli.index.store import IndexStore
from models.core.errors import option


class RegionFeatures:
    """The region feature store of one index, opened on first use and reopened when a concurrent `ldot index`
    has added records since."""

    def __init__(self, store: IndexStore) -> None:
        self.store = store
        self._features: Any = None  # the open `FeatureStore`

    def close(self) -> None:
        if self._features is not None:
            self._features.close()
            self._features = None

    @property
    def kept(self) -> bool:
        """Whether the index keeps region features (what UNITER and LXMERT re-rank; ViLT reads the photos)."""
        return self.store.meta.keeps_regions and (self.store.dir / REGIONS_DIR).is_dir()

    @property
    def preset(self) -> str:
        """The box preset the index's region features were extracted with."""
        return self.store.meta.box_preset

    def open(self) -> Any:
        """The feature store; IndexStoreError saying what to do when the index keeps none."""
        from feature_extraction.uniter_db import FeatureStore

        if not self.kept:
            raise IndexStoreError(f"index {self.store.name!r} keeps no region features (built with "
                                  f"{option('no_regions')}): re-index without it to use {option('rerank')} or "
                                  f"{option('regions')}")
        if self._features is None:
            self._features = FeatureStore(self.store.dir / REGIONS_DIR, self.preset)
        return self._features

    def records(self, vector_ids: list[int]) -> list[Any]:
        """The stored region features of indexed images (the store is reopened once when a concurrent
        `ldot index` added records since it was opened)."""
        from feature_extraction.errors import ImageDBError

        hashes = self.store.content_hashes(vector_ids)
        missing = [v for v in vector_ids if v not in hashes]
        if missing:
            raise QueryError(f"image {missing[0]} left the index meanwhile: search again")
        try:
            return [self.open().get(hashes[v]) for v in vector_ids]
        except ImageDBError:
            self.close()
        try:
            return [self.open().get(hashes[v]) for v in vector_ids]
        except ImageDBError as exc:
            from ldot_cli.index.indexer import damaged_regions

            raise damaged_regions(self.store.name, exc) from None
