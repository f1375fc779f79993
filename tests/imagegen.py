"""Generators of ordinary and odd image files for the tests (everything made on the fly)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def pattern(width: int = 32, height: int = 16, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 of 8x8 blocks of distinct colours: no symmetry, survives JPEG roughly."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)


def save(arr_or_img: np.ndarray | Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    img = Image.fromarray(arr_or_img) if isinstance(arr_or_img, np.ndarray) else arr_or_img
    img.save(path, format=fmt, **kw)
    return path


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_png_bomb(path: Path, width: int, height: int, full: bool = True) -> Path:
    """A valid RGB PNG of zeros: tiny on disk, width*height*3 bytes once decoded.

    ``full=False`` writes only a few rows of data (the header still announces the full size).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    comp = zlib.compressobj(6)
    row = b"\x00" * (3 * width + 1)
    parts = [comp.compress(row) for _ in range(height if full else 4)]
    parts.append(comp.flush())
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
    data += _png_chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def truncate(path: Path, keep_fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path
