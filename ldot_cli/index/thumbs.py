"""Thumbnails of indexed images: made once, cached beside the index, removed with the image.

``<index>/thumbs/<hash[:2]>/<content hash>.jpg``, keyed by content hash like the vectors, so moved or
copied files share one; made only from bytes checked against that hash, so a thumbnail cannot go stale. The EXIF orientation is applied (as the detector sees the photo), so region boxes,
which are fractions of the oriented image's width and height, line up with the thumbnail.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from models.core.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from PIL import Image

THUMBS_DIR = "thumbs"
THUMB_SIZE = 320  # longest side, pixels
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}


def thumb_path(index_dir: Path, content_hash: str) -> Path:
    if len(content_hash) != 64 or not all(c in "0123456789abcdef" for c in content_hash):
        raise ValueError(f"not a content hash: {content_hash!r}")
    return index_dir / THUMBS_DIR / content_hash[:2] / f"{content_hash}.jpg"


def _oriented(data: bytes, name: str) -> Image.Image:
    from PIL import Image

    from feature_extraction.images.decode import load_image_bytes

    return Image.fromarray(load_image_bytes(data, name))


def cached_thumbnail(index_dir: Path, content_hash: str) -> bytes | None:
    """The cached thumbnail of a content, or None when none was made yet."""
    try:
        return thumb_path(index_dir, content_hash).read_bytes()
    except FileNotFoundError:
        return None


def thumbnail(index_dir: Path, content_hash: str, read: Callable[[], bytes], name: str = "image",
              size: int = THUMB_SIZE) -> bytes:
    """The JPEG thumbnail of an indexed image, cached under its content hash. Made on first use from
    ``read()``, which must return the indexed bytes themselves: they are checked against ``content_hash``
    (ValueError otherwise), so a cached thumbnail always shows the content its name says. Nothing is cached
    when the index folder is gone (removed while the thumbnail was being made)."""
    import hashlib

    cached = cached_thumbnail(index_dir, content_hash)
    if cached is not None:
        return cached
    data = read()
    if hashlib.sha256(data).hexdigest() != content_hash:
        raise ValueError(f"{name}: its bytes are not the indexed content {content_hash[:12]}")
    image = _oriented(data, name)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    thumb = buffer.getvalue()
    target = thumb_path(index_dir, content_hash)
    try:  # no parents=True: a removed index (`ldot index rm`) is never re-created by a late thumbnail
        (index_dir / THUMBS_DIR).mkdir(exist_ok=True)
        target.parent.mkdir(exist_ok=True)
        atomic_write_bytes(target, thumb)
    except FileNotFoundError:
        pass
    return thumb


def browser_image(data: bytes, name: str = "image") -> tuple[bytes, str]:
    """The full photo as a browser shows it: the file's bytes when a browser reads its format (and no EXIF
    rotation is pending), else a JPEG of the oriented pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=list(BROWSER_FORMATS)) as probe:
            kind = BROWSER_FORMATS.get(probe.format or "")
            orientation = probe.getexif().get(0x0112, 1) if kind == "image/jpeg" else 1
    except (OSError, ValueError):
        kind, orientation = None, 1  # HEIC, TIFF...: decoded as the indexer does, sent as JPEG
    if kind and orientation in (1, None):
        return data, kind
    buffer = io.BytesIO()
    _oriented(data, name).save(buffer, "JPEG", quality=92)
    return buffer.getvalue(), "image/jpeg"


def oriented_size(source: str | bytes | os.PathLike[str]) -> tuple[int, int]:
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
