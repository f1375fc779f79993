"""Typed records shared by the detector, the extraction pipeline and the feature stores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RegionFeatures:
    """Bottom-Up-Attention region features of one image.

    Arrays are numpy so records are cheap to pickle between processes and to store.
    ``n`` is the number of kept regions (10..100 for the ``uniter`` preset, 36 for ``lxmert36``).
    """

    features: np.ndarray  # (n, 2048) float16: mean-pooled res5 features of each region
    boxes: np.ndarray  # (n, 4) float32: x1, y1, x2, y2 in pixels of the original image
    norm_bb: np.ndarray  # (n, 6) float32: x1/W, y1/H, x2/W, y2/H, w/W, h/H
    conf: np.ndarray  # (n,) float32: max non-background class probability
    object_ids: np.ndarray  # (n,) int64: argmax non-background class (0..1599)
    attr_ids: np.ndarray  # (n,) int64: argmax attribute (0..399)
    attr_conf: np.ndarray  # (n,) float32: its probability
    image_size: tuple[int, int]  # (height, width) of the original image, after EXIF rotation
    soft_labels: np.ndarray | None = None  # (n, 1601) float16: class distribution, background last

    @property
    def num_boxes(self) -> int:
        return int(self.features.shape[0])


def normalize_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel boxes (n, 4) -> the 6-d ``norm_bb`` layout of UNITER/LightningDOT (n, 6)."""
    boxes = np.asarray(boxes, dtype=np.float32)
    x1, y1, x2, y2 = boxes[:, 0] / width, boxes[:, 1] / height, boxes[:, 2] / width, boxes[:, 3] / height
    return np.stack([x1, y1, x2, y2, x2 - x1, y2 - y1], axis=1).astype(np.float32)
