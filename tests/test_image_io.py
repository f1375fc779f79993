"""load_image: every odd file a photo folder holds -> RGB pixels or a typed ImageLoadError."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagegen import pattern, save, truncate, write_png_bomb
from PIL import Image, ImageFile, features

from feature_extraction.errors import ImageLoadError
from feature_extraction.images import decode as image_io
from feature_extraction.images.decode import is_image_candidate, load_image

REPO = Path(__file__).resolve().parents[1]


def _reason(path: Path, **kw) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(path, **kw)
    assert info.value.path == os.fspath(path)
    return info.value.reason


# ---------------------------------------------------------------- ordinary and odd formats


def test_rgb_jpeg(tmp_path: Path) -> None:
    arr = pattern(64, 32)
    out = load_image(save(arr, tmp_path / "a.jpg", quality=95, subsampling=0))
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.abs(out.astype(int) - arr).mean() < 4


# EXIF orientation -> what a viewer shows, written with numpy independently of Pillow.
_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.rot90(a.transpose(1, 0, 2), k=2),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_all_eight(tmp_path: Path, orientation: int) -> None:
    arr = pattern(32, 16, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(arr, tmp_path / "o.png", exif=exif.tobytes())
    np.testing.assert_array_equal(load_image(path), _ORIENT[orientation](arr))


def test_exif_orientation_jpeg(tmp_path: Path) -> None:
    arr = pattern(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(save(arr, tmp_path / "o.jpg", quality=95, subsampling=0, exif=exif.tobytes()))
    assert out.shape == (64, 32, 3)
    assert np.abs(out.astype(int) - np.rot90(arr, k=-1)).mean() < 4


def test_broken_exif_is_ignored(tmp_path: Path) -> None:
    arr = pattern()
    path = save(arr, tmp_path / "e.jpg", quality=95, exif=b"Exif\x00\x00MM\x00*garbage")
    assert load_image(path).shape == (16, 32, 3)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red channel
    rgba[0, 0, 3] = 0  # fully transparent -> white
    rgba[0, 1, 3] = 255  # opaque -> (200, 0, 0)
    rgba[0, 2, 3] = 128  # half -> between
    out = load_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (200, 0, 0)
    assert 220 <= out[0, 2, 0] <= 235 and 120 <= out[0, 2, 1] <= 135


def test_la_composited_on_white(tmp_path: Path) -> None:
    la = np.zeros((1, 2, 2), dtype=np.uint8)
    la[0, 0] = (10, 0)
    la[0, 1] = (10, 255)
    out = load_image(save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (10, 10, 10)


def test_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    path = save(im, tmp_path / "p.png", transparency=0)
    out = load_image(path)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (255, 0, 0)


def test_palette_without_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 0), 1)
    out = load_image(save(im, tmp_path / "p.gif"))
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 1]) == (255, 0, 0)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = np.zeros((16, 16, 4), dtype=np.uint8)
    cmyk[:, 8:, 1:3] = 255  # magenta + yellow = red on the right half
    out = load_image(save(Image.fromarray(cmyk, "CMYK"), tmp_path / "c.jpg", quality=95, subsampling=0))
    assert out.shape == (16, 16, 3)
    assert (out[4, 2] > 240).all()
    assert out[4, 12, 0] > 240 and out[4, 12, 1] < 20 and out[4, 12, 2] < 20


def test_16bit_grey_png_scaled(tmp_path: Path) -> None:
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I;16")
    out = load_image(path)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])
    assert (out[..., 0] == out[..., 2]).all()


def test_int32_and_float_tiff(tmp_path: Path) -> None:
    ints = np.array([[0, 100, 255]], dtype=np.int32)
    out = load_image(save(Image.fromarray(ints, "I"), tmp_path / "i.tif"))
    np.testing.assert_array_equal(out[0, :, 1], [0, 100, 255])
    floats = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    out = load_image(save(Image.fromarray(floats, "F"), tmp_path / "f.tif"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 0])
    wide = np.array([[-10.0, 0.0, 1000.0]], dtype=np.float32)
    out = load_image(save(Image.fromarray(wide, "F"), tmp_path / "w.tif"))
    assert out[0, 0, 0] == 0 and out[0, 2, 0] == 255


@pytest.mark.parametrize("mode", ["1", "L", "YCbCr"])
def test_simple_modes(tmp_path: Path, mode: str) -> None:
    im = Image.new(mode, (5, 4), 1 if mode == "1" else None)
    fmt = "JPEG" if mode == "YCbCr" else "PNG"
    out = load_image(save(im, tmp_path / "m.img", fmt=fmt))
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8


def _frames(n: int = 3) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    return [Image.new("RGB", (8, 8), colours[i]) for i in range(n)]


@pytest.mark.parametrize("fmt,suffix", [("GIF", ".gif"), ("PNG", ".png"), ("WEBP", ".webp")])
def test_animation_first_frame(tmp_path: Path, fmt: str, suffix: str) -> None:
    first, *rest = _frames()
    path = tmp_path / f"anim{suffix}"
    first.save(path, format=fmt, save_all=True, append_images=rest, duration=100, loop=0,
               **({"lossless": True} if fmt == "WEBP" else {}))
    assert getattr(Image.open(path), "n_frames", 1) == 3
    out = load_image(path)
    assert out[4, 4, 0] > 240 and out[4, 4, 1] < 15 and out[4, 4, 2] < 15


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")
def test_avif(tmp_path: Path) -> None:
    arr = pattern(64, 32)
    out = load_image(save(arr, tmp_path / "a.avif", quality=90))
    assert out.shape == (32, 64, 3)


def _run_py(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_heic_decoded_via_lazily_registered_pillow_heif(tmp_path: Path) -> None:
    import pillow_heif  # the test extra installs it: HEIC is advertised, so it is tested, never skipped
    pillow_heif.register_heif_opener()
    arr = pattern(64, 32)
    path = save(arr, tmp_path / "photo.heic", fmt="HEIF", quality=95, subsampling=0)
    renamed = path.rename(tmp_path / "photo.jpg")  # wrong extension on purpose
    # A fresh interpreter: nothing registered until load_image meets the file.
    res = _run_py(f"""
        from PIL import Image
        from feature_extraction.images.decode import load_image
        assert "HEIF" not in Image.ID
        out = load_image({str(renamed)!r})
        print(out.shape, int(abs(out.astype(int) - __import__('numpy').asarray(Image.open({str(renamed)!r}))).mean()))
    """)
    assert res.returncode == 0, res.stderr
    shape, err = res.stdout.rsplit(" ", 1)
    assert shape == "(32, 64, 3)" and int(err) < 6


def test_heic_without_pillow_heif_says_how_to_install(tmp_path: Path) -> None:
    path = tmp_path / "x.heic"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    res = _run_py(f"""
        import sys
        sys.modules["pillow_heif"] = None  # as if not installed
        from feature_extraction.images.decode import load_image
        from feature_extraction.errors import MissingCodecError
        try:
            load_image({str(path)!r})
        except MissingCodecError as e:
            print("permanent" if e.permanent else "retryable", e.reason)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("retryable HEIC/HEIF image needs the optional decoder")
    assert "pip install '.[heic]' in ldot's folder" in res.stdout


# ---------------------------------------------------------------- broken files


def test_zero_byte(tmp_path: Path) -> None:
    (tmp_path / "z.jpg").write_bytes(b"")
    assert _reason(tmp_path / "z.jpg") == "empty file (0 bytes)"


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("GIF", ".gif")])
def test_truncated(tmp_path: Path, fmt: str, suffix: str) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)  # incompressible: truncation bites
    path = truncate(save(noisy, tmp_path / f"t{suffix}", fmt=fmt), 0.5)
    reason = _reason(path)
    assert "truncated" in reason or "corrupt" in reason


def test_truncated_header(tmp_path: Path) -> None:
    path = truncate(save(pattern(), tmp_path / "t.png"), 0.1)
    assert _reason(path)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("hello, not an image\n")
    assert _reason(tmp_path / "notes.jpg") == "not a recognised image format"


def test_png_named_jpg_is_sniffed(tmp_path: Path) -> None:
    arr = pattern()
    path = save(arr, tmp_path / "really_png.jpg", fmt="PNG")
    np.testing.assert_array_equal(load_image(path), arr)


def test_exotic_formats_not_offered_untrusted_bytes(tmp_path: Path) -> None:
    path = tmp_path / "doc.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert _reason(path) == "not a recognised image format"


def test_directory_and_fifo(tmp_path: Path) -> None:
    (tmp_path / "d.jpg").mkdir()
    assert _reason(tmp_path / "d.jpg") == "not a regular file (directory)"
    os.mkfifo(tmp_path / "f.jpg")
    assert _reason(tmp_path / "f.jpg") == "not a regular file (named pipe)"  # and never blocks


def test_missing_and_broken_symlink(tmp_path: Path) -> None:
    assert "not found" in _reason(tmp_path / "nope.jpg")
    (tmp_path / "l.jpg").symlink_to(tmp_path / "gone.jpg")
    assert "not found" in _reason(tmp_path / "l.jpg")


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(pattern(), tmp_path / "p.png")

    def deny(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(image_io, "open", deny, raising=False)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason == "permission denied" and not info.value.permanent


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_for_real(tmp_path: Path) -> None:
    path = save(pattern(), tmp_path / "p.png")
    path.chmod(0)
    assert _reason(path) == "permission denied"


def test_corrupt_header(tmp_path: Path) -> None:
    path = tmp_path / "h.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + os.urandom(40))
    assert _reason(path)


# ---------------------------------------------------------------- decompression bombs


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9000x9000 RGB PNG: 230 KB on disk, 243 MB decoded (81 MP > the 64 MP default cap)."""
    return write_png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png", 9000, 9000)


def test_bomb_rejected_before_decode(bomb: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bomb.stat().st_size < 1_000_000

    def no_decode(self, *a, **k):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    reason = _reason(bomb)
    assert reason.startswith("image too large: 9000x9000 = 81.0 megapixels (limit 64.0")


def test_bomb_peak_memory_bounded(bomb: Path) -> None:
    """Fresh interpreters: the rejection costs almost nothing; decoding would cost 243 MB."""
    # VmHWM (peak RSS of this process image): unlike ru_maxrss, it is not inherited across exec from a
    # parent that was already big (pytest with torch loaded).
    code = """
        import sys
        from feature_extraction.images.decode import load_image
        from feature_extraction.errors import ImageLoadError
        def hwm_mb():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
        before = hwm_mb()
        try:
            load_image({path!r}, max_pixels={cap})
        except ImageLoadError as exc:
            print(exc, file=sys.stderr)
        print(hwm_mb() - before)
    """
    rejected = _run_py(code.format(path=str(bomb), cap=64_000_000))
    assert rejected.returncode == 0, rejected.stderr
    assert int(rejected.stdout) < 20, f"peak grew by {rejected.stdout} MB"
    decoded = _run_py(code.format(path=str(bomb), cap=100_000_000))  # control: the bomb is real
    assert decoded.returncode == 0, decoded.stderr
    assert int(decoded.stdout) > 100


def test_pillow_bomb_warning_and_error_become_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ok = save(pattern(40, 40), tmp_path / "ok.png")  # 1600 px: Pillow warns, our cap allows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(ok).shape == (40, 40, 3)
    big = save(pattern(48, 48), tmp_path / "big.png")  # 2304 px > 2x Pillow's limit: Pillow raises
    assert "decompression bomb" in _reason(big)


def test_header_only_giant_with_cap_disabled(tmp_path: Path) -> None:
    path = write_png_bomb(tmp_path / "giant.png", 30000, 30000, full=False)  # 900 MP announced
    assert "decompression bomb" in _reason(path, max_pixels=None)


def test_custom_cap(tmp_path: Path) -> None:
    path = save(pattern(32, 16), tmp_path / "s.png")
    assert "image too large: 32x16" in _reason(path, max_pixels=100)
    assert load_image(path, max_pixels=512).shape == (16, 32, 3)


# ---------------------------------------------------------------- fuzzing and the walker filter


_SEED_FILES: dict[str, bytes] = {}


def _seed(fmt: str) -> bytes:
    if fmt not in _SEED_FILES:
        buf = io.BytesIO()
        Image.fromarray(pattern(32, 32)).save(buf, format=fmt)
        _SEED_FILES[fmt] = buf.getvalue()
    return _SEED_FILES[fmt]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       cut=st.floats(0.05, 1.0))
def test_fuzzed_files_never_crash(tmp_path: Path, fmt: str, flips: list[tuple[int, int]], cut: float) -> None:
    data = bytearray(_seed(fmt))
    for pos, val in flips:
        data[pos % len(data)] = val
    path = tmp_path / "fuzz.bin"
    path.write_bytes(bytes(data[: max(1, int(len(data) * cut))]))
    try:
        out = load_image(path)
    except ImageLoadError as exc:
        assert exc.reason
    else:
        assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8


def test_is_image_candidate() -> None:
    assert is_image_candidate("a/b/Photo.JPG") and is_image_candidate("x.heic")
    assert not is_image_candidate("a/._Photo.jpg")
    assert not is_image_candidate("notes.txt") and not is_image_candidate("jpg")
