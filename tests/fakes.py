"""A deterministic fake detector: every output is a function of the image's own pixels.

So a stored vector can be checked against the file it claims to come from: decode the file
again, run the fake again, compare. Importable by worker processes (tests/ is on sys.path).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time

import numpy as np
import torch

from feature_extraction.types import RegionFeatures, normalize_boxes

PIXEL_MEANS_BGR = np.array([102.9801, 115.9465, 122.7717], dtype=np.float32)
HANG_PIXEL = (1, 2, 3)  # misbehaving_preprocess hangs on images whose top-left pixel is this
CRASH_PIXEL = (3, 2, 1)  # ... and segfaults its process on this one


def fake_preprocess(rgb: np.ndarray) -> tuple[torch.Tensor, float]:
    """(H, W, 3) uint8 RGB -> ((3, h, w) float32 BGR minus means, scale); longest side <= 64."""
    step = max(1, -(-max(rgb.shape[:2]) // 64))
    small = rgb[::step, ::step, ::-1].astype(np.float32) - PIXEL_MEANS_BGR  # (h, w, 3) BGR
    return torch.from_numpy(np.ascontiguousarray(small.transpose(2, 0, 1))), 1.0 / step


def misbehaving_preprocess(rgb: np.ndarray) -> tuple[torch.Tensor, float]:
    pixel = tuple(int(v) for v in rgb[0, 0])
    if pixel == HANG_PIXEL:
        time.sleep(3600)
    if pixel == CRASH_PIXEL:
        os.kill(os.getpid(), signal.SIGSEGV)
    return fake_preprocess(rgb)


def fake_regions(pixels: np.ndarray, size: tuple[int, int], preset: str, with_soft_labels: bool,
                 dim: int = 2048) -> RegionFeatures:
    """Region features seeded by a hash of the preprocessed pixels (3, h, w)."""
    seed = int.from_bytes(hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    confident = seed % 60
    n = 36 if preset == "lxmert36" else min(100, max(10, confident))
    conf = np.where(np.arange(n) < confident, rng.uniform(0.3, 1.0, n), rng.uniform(0.0, 0.19, n))
    h, w = size
    x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + w / 4, y1 + h / 4], axis=1).astype(np.float32)  # (n, 4)
    soft = None
    if with_soft_labels:
        soft = rng.random((n, 1601), dtype=np.float32)
        soft = (soft / soft.sum(1, keepdims=True)).astype(np.float16)  # (n, 1601), background last
    return RegionFeatures(
        features=rng.standard_normal((n, dim)).astype(np.float16), boxes=boxes,
        norm_bb=normalize_boxes(boxes, h, w), conf=conf.astype(np.float32),
        object_ids=rng.integers(0, 1600, n), attr_ids=rng.integers(0, 400, n),
        attr_conf=rng.uniform(0, 1, n).astype(np.float32), image_size=(h, w), soft_labels=soft,
    )


class FakeDetector:
    """Implements the pipeline's RegionDetector protocol without any network.

    Args:
        delay_s: sleep per extract call (to widen the window for kill tests).
        fail_keys: images (by their top-left pixel) on which extract raises.
        raise_after: raise KeyboardInterrupt at the start of this call number (1-based).
        broken: return garbage for every call (tests the give-up path).
    """

    preprocess = staticmethod(fake_preprocess)

    def __init__(self, delay_s: float = 0.0, fail_pixels: tuple[tuple[int, int, int], ...] = (),
                 raise_after: int | None = None, broken: bool = False) -> None:
        self.delay_s = delay_s
        self.fail_pixels = set(fail_pixels)
        self.raise_after = raise_after
        self.broken = broken
        self.calls: list[int] = []

    def extract(self, batch, preset, with_soft_labels=False):
        self.calls.append(len(batch))
        if self.raise_after is not None and len(self.calls) >= self.raise_after:
            raise KeyboardInterrupt("injected interruption")
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        out = []
        for tensor, scale, size in batch:
            pixels = tensor.numpy()
            first = tuple(int(round(v)) for v in pixels[::-1, 0, 0] + PIXEL_MEANS_BGR[::-1])
            if first in self.fail_pixels:
                raise RuntimeError(f"fake failure on {first}")
            out.append(fake_regions(pixels, size, preset, with_soft_labels))
        return out


def expected_record(path: str, preset: str = "uniter", with_soft_labels: bool = False) -> RegionFeatures:
    """What the fake detector yields for the file at ``path`` (decoded afresh)."""
    from feature_extraction.images.decode import load_image

    rgb = load_image(path)
    tensor, _ = fake_preprocess(rgb)
    return fake_regions(tensor.numpy(), rgb.shape[:2], preset, with_soft_labels)
