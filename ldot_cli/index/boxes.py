"""Which boxes of an image drive its bi-encoder score for a query (`models.nn.attribution` over the index's
region features, with the bi-encoder's image tower): what ``--regions`` shows and `ldot serve` draws."""

from __future__ import annotations

from typing import Any

import numpy as np

from ldot_cli.index.hits import Hit
from ldot_cli.index.region_features import RegionFeatures


class BoxExplainer:
    """Finds the boxes behind scores; loads the image tower of ``model_source`` on first use."""

    def __init__(self, model_source: str, regions: RegionFeatures) -> None:
        self.model_source = model_source
        self.regions = regions
        self._image_tower: Any = None

    @property
    def image_tower(self) -> Any:
        if self._image_tower is None:
            from models.hub.load import load_bi_encoder

            self._image_tower = load_bi_encoder(self.model_source, device="cpu", towers=("image",))
        return self._image_tower

    def explain(self, hits: list[Hit], vector: np.ndarray, max_boxes: int = 3, budget: int | None = None) -> None:
        """Set on each hit the ``max_boxes`` boxes that most drive its score for the query ``vector`` and the size of
        its photo as shown (``budget``: removal passes shared by these hits, default the attribution's own)."""
        from ldot_cli.index.thumbs import oriented_size
        from models.nn.attribution import region_weights

        records = self.regions.records([h.vector_id for h in hits])
        queries = np.repeat(np.asarray(vector, np.float32).reshape(1, -1), len(hits), axis=0)
        extra = {} if budget is None else {"budget": budget}
        _, boxes = region_weights(self.image_tower, queries, records, max_boxes=max_boxes, **extra)
        for hit, found in zip(hits, boxes):
            hit.regions = [(*b.box, b.weight) for b in found]
            try:
                hit.size = oriented_size(hit.path)
            except OSError:
                hit.size = None  # the file went away: fractions only
