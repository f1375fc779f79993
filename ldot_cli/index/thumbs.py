"""Thumbnails of indexed images: made once, cached beside the index, removed with the image.

``<index>/thumbs/<hash[:2]>/<content hash>.jpg``, keyed by content hash like the vectors, so moved or
copied files share one. The EXIF orientation is applied (as the detector sees the photo), so region boxes,
which are fractions of the oriented image's width and height, line up with the thumbnail.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from models.core.fileio import atomic_write_bytes

THUMBS_DIR = "thumbs"
THUMB_SIZE = 320  # longest side, pixels
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}


def thumb_path(index_dir: Path, content_hash: str) -> Path:
    if len(content_hash) != 64 or not all(c in "0123456789abcdef" for c in content_hash):
        raise ValueError(f"not a content hash: {content_hash!r}")
    return index_dir / THUMBS_DIR / content_hash[:2] / f"{content_hash}.jpg"


def _oriented(path: str | os.PathLike[str]) -> object:
    from PIL import Image

    from feature_extraction.images.decode import load_image

    return Image.fromarray(load_image(path))


def thumbnail(index_dir: Path, content_hash: str, source: str | os.PathLike[str], size: int = THUMB_SIZE) -> bytes:
    """The JPEG thumbnail of an indexed image (made from ``source`` on first use, then cached)."""
    target = thumb_path(index_dir, content_hash)
    try:
        return target.read_bytes()
    except FileNotFoundError:
        pass
    image = _oriented(source)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    data = buffer.getvalue()
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data)
    return data


def browser_image(source: str | os.PathLike[str]) -> tuple[bytes, str]:
    """The full photo as a browser shows it: the file itself when a browser reads its format (and no EXIF
    rotation is pending), else a JPEG of the oriented pixels."""
    from PIL import Image

    with Image.open(source) as probe:
        kind = BROWSER_FORMATS.get(probe.format or "")
        orientation = probe.getexif().get(0x0112, 1) if kind == "image/jpeg" else 1
    if kind and orientation in (1, None):
        return Path(source).read_bytes(), kind
    buffer = io.BytesIO()
    _oriented(source).save(buffer, "JPEG", quality=92)
    return buffer.getvalue(), "image/jpeg"


def oriented_size(source: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of a photo as displayed (EXIF orientation applied), read from its header only."""
    from PIL import Image

    with Image.open(source) as probe:
        width, height = probe.size
        if probe.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def collect_thumbnails(index_dir: Path, live: set[str]) -> int:
    """Delete the cached thumbnails of contents no longer in the index (``live``: its content hashes); swept
    on every `ldot index` run, so a run killed half-way leaves nothing behind for long. Returns how many."""
    root = index_dir / THUMBS_DIR
    if not root.is_dir():
        return 0
    removed = 0
    for path in root.glob("*/*.jpg"):
        if path.stem not in live:
            path.unlink(missing_ok=True)
            removed += 1
    for tmp in root.glob("*/.*"):  # temp files of an interrupted write
        try:
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink()
        except OSError:
            pass
    return removed
