"""Robust image loading: any photo-like file -> an (H, W, 3) uint8 RGB array, or a typed error.

``load_image`` never lets a bad file crash a run: every failure becomes an
:class:`~feature_extraction.errors.ImageLoadError` with a short human reason.

Decisions (documented for users in the README):

* **Content is sniffed, the extension is ignored** when decoding. Only an allow-list of
  photo formats is tried (``ALLOWED_FORMATS``): exotic Pillow plugins (EPS runs Ghostscript,
  FLI, PCD, SPIDER, ...) are never given untrusted bytes.
* **Decompression bombs**: the pixel count is read from the header and checked against
  ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`, 64 megapixels) before any pixel is
  decoded. Pillow's own ``DecompressionBombWarning`` is silenced (our cap governs) and its
  ``DecompressionBombError`` (above twice ``PIL.Image.MAX_IMAGE_PIXELS``, ~179 MP) becomes
  our error too; to go beyond that, raise ``PIL.Image.MAX_IMAGE_PIXELS`` as well.
* **EXIF orientation** (all 8 values) is applied; a broken EXIF block is ignored.
* **Transparency is composited on white** (RGBA, LA, PA, palette or grey/RGB with a
  transparent colour): transparent logos, stickers and scans are drawn for light
  backgrounds, and the colour under fully transparent pixels is arbitrary.
* **16-bit grey** (``I;16*``) is scaled by 1/257; ``I`` (32-bit int) and ``F`` (float) are
  mapped by their value range (0..255 as is, 0..65535 as 16-bit, floats in 0..1 times 255,
  anything else min-max stretched). ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1``, ``L`` use
  Pillow's conversion (no ICC colour management, like the OpenCV loading of the original
  feature extraction).
* **Animations** (GIF, APNG, animated WebP): the first frame.
* **HEIC/HEIF** needs the optional ``pillow-heif`` (``pip install '.[heic]' in ldot's folder``), registered
  lazily the first time such a file is met; without it the file fails with
  :class:`~feature_extraction.errors.MissingCodecError` (not permanent: retried once installed).
  AVIF is decoded by Pillow itself (>= 11.3), or by ``pillow-heif`` when it can.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from feature_extraction.errors import ImageLoadError, MissingCodecError

DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels: ~192 MB as RGB; larger photos are rare

# Pillow format ids tried on untrusted files ("HEIF" is added once pillow-heif is registered;
# multi-picture camera JPEGs (MPO) come through the JPEG opener).
ALLOWED_FORMATS: tuple[str, ...] = (
    "JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM", "ICO", "JPEG2000", "AVIF",
)

# File name extensions the directory walker treats as images (lower case, with the dot).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".webp", ".bmp", ".dib",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".jp2", ".j2k", ".jpx",
    ".heic", ".heif", ".hif", ".avif",
})

HEIC_INSTALL_HINT = "pip install '.[heic]' in ldot's folder"

# ISO-BMFF brands (bytes 8..12 of the file, after b"ftyp") of HEIF-family images.
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs",
                          b"mif1", b"msf1", b"mif2"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

_heif_registered = False


def is_image_candidate(path: str | os.PathLike[str]) -> bool:
    """True when a file name looks like an image the walker should offer to :func:`load_image`.

    Judged on the name only (cheap): a known image extension, and not a macOS AppleDouble
    ``._*`` companion file. Decoding still sniffs the content.
    """
    name = os.path.basename(os.fspath(path))
    if name.startswith("._"):
        return False
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


NOT_AN_IMAGE = "not a recognised image format"


def looks_like_image(path: str | os.PathLike[str]) -> bool:
    """An image by its name (:func:`is_image_candidate`) or by its content (a header some decoder names, HEIC
    included): what a file given by name must be to be indexed. An unreadable file counts as one (the indexer
    says why it is skipped); a text file such as ``README.md`` does not."""
    if is_image_candidate(path):
        return True
    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _open(fh, os.fspath(path)).close()
    except ImageLoadError as exc:
        return exc.reason != NOT_AN_IMAGE
    except OSError:
        return True
    return True


def load_image(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file into RGB pixels.

    Args:
        path: the file. Its content decides the format, not its extension.
        max_pixels: largest accepted width*height, checked from the header before decoding;
            ``None`` leaves only Pillow's own limit (~179 MP).

    Returns:
        ``(H, W, 3)`` uint8 RGB array, EXIF orientation applied, first frame of animations.

    Raises:
        ImageLoadError: the file cannot be read or decoded (``.reason`` says why).
        MissingCodecError: a HEIC file while ``pillow-heif`` is not installed.
    """
    path = os.fspath(path)
    _check_regular_file(path)
    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's "corrupt EXIF" & co.: never noise on stderr
            return _decode(fh, path, max_pixels)
    except PermissionError:
        raise ImageLoadError(path, "permission denied", permanent=False) from None
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found (removed during the run?)", permanent=False) from None
    except ImageLoadError:
        raise
    except OSError as exc:  # I/O error while opening or reading the file itself
        raise ImageLoadError(path, f"could not read file: {exc.strerror or exc}", permanent=False) from None


def load_image_bytes(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`load_image` for bytes already in memory (a tar member, an object-store download);
    ``name`` is what error messages call it."""
    import io

    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _decode(io.BytesIO(data), name, max_pixels)
    except ImageLoadError:
        raise
    except OSError as exc:
        raise ImageLoadError(name, f"could not read image: {exc.strerror or exc}", permanent=False) from None


def _check_regular_file(path: str) -> None:
    """Reject what is not a non-empty regular file before opening (a FIFO would block open())."""
    try:
        st = os.stat(path)
    except PermissionError:
        raise ImageLoadError(path, "permission denied", permanent=False) from None
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found (or a broken symlink)", permanent=False) from None
    except OSError as exc:
        raise ImageLoadError(path, f"cannot stat file: {exc.strerror or exc}", permanent=False) from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(path, f"not a regular file ({_file_kind(st.st_mode)})")
    if st.st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "named pipe"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _decode(fh: BinaryIO, path: str, max_pixels: int | None) -> np.ndarray:
    im = _open(fh, path)
    _check_pixels(im, path, max_pixels)
    try:
        im.load()  # decodes the first frame only
        im = _apply_exif_orientation(im)
        return _to_rgb_array(im)
    except MemoryError:
        raise ImageLoadError(path, "not enough memory to decode", permanent=False) from None
    except Exception as exc:  # any decoder failure is a property of this file
        raise ImageLoadError(path, _describe_decode_error(exc)) from None


def _open(fh: BinaryIO, path: str) -> Image.Image:
    """Identify the format and read the header (no pixel data yet)."""
    try:
        return _pil_open(fh, path)
    except UnidentifiedImageError:
        pass
    except ImageLoadError:
        raise
    except Exception as exc:  # a plugin choking on a malformed header
        raise ImageLoadError(path, f"corrupt image header ({_short(exc)})") from None
    brand = _heif_brand(fh)
    if brand is None:
        raise ImageLoadError(path, NOT_AN_IMAGE)
    _register_heif(path, brand)
    try:
        return _pil_open(fh, path)
    except Exception as exc:
        raise ImageLoadError(path, f"corrupt HEIF/AVIF image ({_short(exc)})") from None


def _pil_open(fh: BinaryIO, path: str) -> Image.Image:
    fh.seek(0)
    Image.init()  # load every plugin once so that the allow-list can be checked against them
    formats = tuple(f for f in ALLOWED_FORMATS + ("HEIF",) if f in Image.OPEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap governs
        try:
            return Image.open(fh, formats=formats)
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(path, f"image too large, refused as a decompression bomb ({exc})") from None


def _heif_brand(fh: BinaryIO) -> bytes | None:
    """The ISO-BMFF major brand when the file is a HEIF/AVIF container, else None."""
    fh.seek(0)
    head = fh.read(12)
    if len(head) < 12 or head[4:8] != b"ftyp":
        return None
    brand = head[8:12]
    return brand if brand in _HEIC_BRANDS | _AVIF_BRANDS else None


def _register_heif(path: str, brand: bytes) -> None:
    """Register pillow-heif's opener on first use, or explain how to install it."""
    global _heif_registered
    if _heif_registered:
        return
    try:
        import pillow_heif
    except ImportError:
        kind = "AVIF" if brand in _AVIF_BRANDS else "HEIC/HEIF"
        raise MissingCodecError(path, f"{kind} image needs the optional decoder: {HEIC_INSTALL_HINT}") from None
    pillow_heif.register_heif_opener()
    if "AVIF" not in Image.ID and hasattr(pillow_heif, "register_avif_opener"):
        pillow_heif.register_avif_opener()
    _heif_registered = True


def _check_pixels(im: Image.Image, path: str, max_pixels: int | None) -> None:
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(path, f"image has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            path,
            f"image too large: {width}x{height} = {width * height / 1e6:.1f} megapixels "
            f"(limit {max_pixels / 1e6:.1f}; raise max_pixels to allow)",
        )


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip by the EXIF Orientation tag (1..8); a broken EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:
        return im


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB, C-contiguous."""
    if im.mode == "RGB":
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return _composite_on_white(im)
    if im.mode in _WIDE_GREY_MODES:
        grey = _wide_grey_to_uint8(np.asarray(im), im.mode)  # (H, W) uint8
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _composite_on_white(im: Image.Image) -> np.ndarray:
    """Straight-alpha composite over an opaque white background -> (H, W, 3) uint8."""
    if im.mode == "La":
        im = im.convert("LA")  # Pillow cannot go from premultiplied La to RGBA directly
    rgba = im.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return np.ascontiguousarray(np.asarray(background, dtype=np.uint8))


def _wide_grey_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) 16-bit / int32 / float grey -> (H, W) uint8, by the rules in the module doc."""
    if mode.startswith("I;16"):
        return _from_16bit(arr)
    if mode == "F":
        arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 1.0 and mode == "F":
        return np.rint(arr * 255.0).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.rint(arr).astype(np.uint8)
    if lo >= 0 and hi <= 65535 and mode == "I":
        return _from_16bit(arr)
    return _stretch(arr, lo, hi)


def _from_16bit(arr: np.ndarray) -> np.ndarray:
    return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _stretch(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (arr.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def _describe_decode_error(exc: BaseException) -> str:
    text = str(exc)
    low = text.lower()
    if "truncated" in low or isinstance(exc, EOFError) or "broken data stream" in low:
        return "truncated or incomplete image data"
    return f"corrupt image data ({_short(exc)})"


def _short(exc: BaseException, limit: int = 120) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(size in bytes, mtime in ns) of a file, following symlinks; used to notice changed files."""
    st = Path(path).stat()
    return int(st.st_size), int(st.st_mtime_ns)
