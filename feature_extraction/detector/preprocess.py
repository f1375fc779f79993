"""Image preprocessing for the BUTD detector: pure functions, safe to run in worker processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from feature_extraction.detector.config import DetectorConfig

MIN_NETWORK_SIDE = 3  # the caffe max-pool of the stem needs at least this many input rows / columns


@dataclass(frozen=True)
class ImageScale:
    """Sizes before and after the resize; maps network boxes back to original pixels."""

    original_size: tuple[int, int]  # (height, width) of the input image
    resized_size: tuple[int, int]  # (height, width) fed to the network

    def __float__(self) -> float:
        """resized / original height (``h / H``): the single ``scale`` number the pipeline records."""
        return self.resized_size[0] / self.original_size[0]

    @property
    def yx(self) -> tuple[float, float]:
        """Per-axis factors original/resized (multiply network boxes by these)."""
        return (
            float(np.float32(self.original_size[0]) / np.float32(self.resized_size[0])),
            float(np.float32(self.original_size[1]) / np.float32(self.resized_size[1])),
        )


class Preprocessed(NamedTuple):
    """A network-ready image: unpacks as ``tensor, scale``."""

    tensor: torch.Tensor  # (3, h, w) float32, BGR minus the pixel means
    scale: ImageScale


def resized_size(height: int, width: int, min_size: int = 600, max_size: int = 1000) -> tuple[int, int]:
    """Shorter side to ``min_size`` unless the longer side would exceed ``max_size``; rounds half up.

    Same arithmetic (double precision, ``int(x + 0.5)``) as the reference ResizeShortestEdge.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image has no pixels: {height}x{width}")
    scale = min_size * 1.0 / min(height, width)
    if height < width:
        new_h, new_w = float(min_size), scale * width
    else:
        new_h, new_w = scale * height, float(min_size)
    if max(new_h, new_w) > max_size:
        shrink = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def preprocess(rgb: np.ndarray, config: DetectorConfig | None = None) -> Preprocessed:
    """RGB uint8 ``(H, W, 3)`` -> BGR float, bilinear resize (no antialias), minus the BGR pixel means.

    The resize happens before the mean subtraction, as in the reference (bilinear weights sum to one,
    so the order only matters at rounding level). No padding: the C4 network needs none.
    """
    cfg = config or DetectorConfig()
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = f"{type(rgb).__name__} {getattr(rgb, 'dtype', '')} {getattr(rgb, 'shape', '')}"
        raise ValueError(f"expected an RGB uint8 array of shape (H, W, 3), got {got}")
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    new_h, new_w = resized_size(height, width, cfg.min_size, cfg.max_size)
    if min(new_h, new_w) < MIN_NETWORK_SIDE:
        raise ValueError(
            f"image too thin for the detector: {height}x{width} resizes to {new_h}x{new_w} "
            f"(each side needs >= {MIN_NETWORK_SIDE} pixels after resizing)"
        )
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1])).float()  # (H, W, 3)
    image = bgr.permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), channels-last strides like the reference
    if (new_h, new_w) != (height, width):
        image = F.interpolate(image, size=(new_h, new_w), mode="bilinear", align_corners=False)
    mean = torch.tensor(cfg.pixel_mean_bgr, dtype=torch.float32).view(1, 3, 1, 1)
    tensor = (image - mean)[0].contiguous()  # (3, h, w)
    return Preprocessed(tensor, ImageScale((height, width), (new_h, new_w)))
