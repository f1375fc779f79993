"""Typed records shared by the detector, the extraction pipeline and the feature stores, and the one registry of
box presets (``uniter``, ``lxmert36``): how many regions an image keeps, read by the detector's selection rules
(`feature_extraction.detector.selection`) and the feature DBs (`feature_extraction.uniter_db`) alike."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feature_extraction.errors import PresetError


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


# ------------------------------------------------------------------------------ box presets


@dataclass(frozen=True)
class BoxCut:
    """How many boxes an image keeps, and the DB name that encodes it (UNITER's naming)."""

    conf_th: float = 0.2  # keep boxes with conf > conf_th; -1 = a fixed count of num_bb boxes
    max_bb: int = 100  # at most this many boxes (threshold mode)
    min_bb: int = 10  # at least this many boxes (threshold mode)
    num_bb: int = 36  # the fixed count (conf_th == -1)

    @property
    def fixed(self) -> bool:
        return self.conf_th == -1

    @property
    def base_name(self) -> str:
        """``feat_th0.2_max100_min10`` or ``feat_numbb36``."""
        if self.fixed:
            return f"feat_numbb{self.num_bb}"
        return f"feat_th{self.conf_th}_max{self.max_bb}_min{self.min_bb}"

    def db_name(self, compress: bool = False) -> str:
        return self.base_name + ("_compressed" if compress else "")

    @property
    def nbb_name(self) -> str | None:
        """``nbb_th0.2_max100_min10.json``; None for a fixed count (the official reader needs none)."""
        if self.fixed:
            return None
        return f"nbb_th{self.conf_th}_max{self.max_bb}_min{self.min_bb}.json"

    def num_boxes(self, conf: np.ndarray) -> int:
        """Boxes kept for an image whose per-box confidences are ``conf`` ((n,) or (n, 1))."""
        if self.fixed:
            return self.num_bb
        return int(min(self.max_bb, max(self.min_bb, int((np.asarray(conf) > self.conf_th).sum()))))


BOX_PRESETS: dict[str, BoxCut] = {
    "uniter": BoxCut(conf_th=0.2, max_bb=100, min_bb=10),  # UNITER / LightningDOT: 10..100 boxes
    "lxmert36": BoxCut(conf_th=-1, num_bb=36),  # LXMERT demo setting: exactly 36 boxes
}


def box_preset(name: str) -> BoxCut:
    """The :class:`BoxCut` of a preset name; an unknown name is a :class:`PresetError` listing the presets."""
    try:
        return BOX_PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown preset {name!r}: choose {' or '.join(BOX_PRESETS)}") from None
