"""extract_to_db end to end with a fake detector: broken files, worker faults, resume after
an injected exception and after kill -9, locking, skipping of done and known-bad files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fakes import (
    CRASH_PIXEL,
    HANG_PIXEL,
    FakeDetector,
    expected_record,
    misbehaving_preprocess,
)
from imagegen import save, truncate, write_png_bomb

from feature_extraction.errors import DBLockedError, DetectorError
from feature_extraction.pipeline import (
    ExtractReport,
    RegionDetector,
    extract_to_db,
)
from feature_extraction.uniter_db import (
    UniterImageDB,
    UniterImageDBWriter,
    soft_labels_to_uniter,
)
from models.core.progress import Progress

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BAD = {"zero.jpg": "empty file", "broken/truncated.jpg": "truncated", "bomb.png": "image too large",
       "notes.jpg": "not a recognised image format"}


def _photo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(24, 90)), int(rng.integers(24, 90))
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_photos(root: Path, n_good: int = 14, first_pixels: dict[int, tuple[int, int, int]] | None = None) -> dict[str, Path]:
    """A folder of good images (keys -> paths) plus the broken ones in BAD and things never offered."""
    good: dict[str, Path] = {}
    for i in range(n_good):
        arr = _photo(i)
        if first_pixels and i in first_pixels:
            arr[0, 0] = first_pixels[i]
        sub = ["", "album/", "album/2019/"][i % 3]
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
        if first_pixels and i in first_pixels:
            fmt, ext = "PNG", "png"  # lossless: the magic pixel must survive
        path = root / f"{sub}img{i:02d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        save(arr, path, fmt=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        good[f"{sub}img{i:02d}.{ext}"] = path
    good["really_a_png.jpg"] = save(_photo(99), root / "really_a_png.jpg", fmt="PNG")  # wrong extension
    (root / "zero.jpg").write_bytes(b"")
    (root / "broken").mkdir()
    truncate(save(_photo(100), root / "broken" / "truncated.jpg", fmt="JPEG"), 0.4)
    write_png_bomb(root / "bomb.png", 9000, 9000, full=False)
    (root / "notes.jpg").write_text("not an image")
    (root / "._img00.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble junk")
    (root / "README.txt").write_text("hello")
    os.mkfifo(root / "pipe.jpg")
    return good


def assert_db_matches(out: Path, good: dict[str, Path], preset: str = "uniter", soft: bool = False) -> None:
    """Exactly the good keys, every record intact and computed from its own file."""
    db = UniterImageDB(out, preset)
    try:
        assert sorted(db.keys()) == sorted(good)
        assert db.verify() == []
        stamps = db.sources()
        for key, path in good.items():
            assert stamps[key].path == str(path)
            exp = expected_record(str(path), preset, soft)
            rec = db[key]
            n = rec.num_boxes
            assert n == (36 if preset == "lxmert36" else min(100, max(10, int((exp.conf > 0.2).sum()))))
            np.testing.assert_array_equal(rec.features, exp.features[:n].astype(np.float32))
            np.testing.assert_array_equal(rec.norm_bb, exp.norm_bb[:n].astype(np.float16).astype(np.float32))
            if soft:
                np.testing.assert_array_equal(rec.soft_labels, soft_labels_to_uniter(exp.soft_labels[:n]).astype(np.float32))
    finally:
        db.close()


def failed_keys(report: ExtractReport) -> dict[str, str]:
    return {f.key: f.reason for f in report.failures}


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LDOT_HOME", str(tmp_path / "ldot-home"))
    return tmp_path / "ldot-home"


def test_protocol_is_structural() -> None:
    assert isinstance(FakeDetector(), RegionDetector)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_broken_files_among_good_ones(tmp_path: Path, home: Path, num_workers: int) -> None:
    good = make_photos(tmp_path / "photos")
    events: list[Progress] = []
    report = extract_to_db([tmp_path / "photos"], tmp_path / "out", FakeDetector(), batch_size=4,
                           num_workers=num_workers, progress=events.append)
    assert report.written == len(good) == 15 and report.candidates == 19
    failed = failed_keys(report)
    assert sorted(failed) == sorted(BAD)
    for key, fragment in BAD.items():
        assert fragment in failed[key], (key, failed[key])
    assert [(Path(i.path).name, i.reason) for i in report.walk_issues] == [("pipe.jpg", "not a regular file")]
    assert_db_matches(tmp_path / "out", good)
    dones = [e.done for e in events]
    assert dones == sorted(dones) and events[-1].done == events[-1].total == 19 and events[-1].info["written"] == 15
    sidecar = (tmp_path / "out" / "feat_th0.2_max100_min10.failed.json").read_text()
    assert "truncated.jpg" in sidecar and "_img00" not in sidecar


def test_rerun_skips_done_and_known_bad_and_notices_changes(tmp_path: Path, home: Path) -> None:
    good = make_photos(tmp_path / "photos", n_good=5)
    out = tmp_path / "out"
    extract_to_db([tmp_path / "photos"], out, FakeDetector(), batch_size=4, num_workers=0)
    again = extract_to_db([tmp_path / "photos"], out, FakeDetector(), batch_size=4, num_workers=0)
    assert (again.written, again.skipped_existing, again.skipped_known_bad, again.failed) == (0, 6, 4, 0)
    retried = extract_to_db([tmp_path / "photos"], out, FakeDetector(), num_workers=0, retry_failed=True)
    assert (retried.written, retried.failed) == (0, 4)
    # one image changes, the truncated one gets fixed
    save(_photo(1234), good["img00.png"], fmt="PNG")
    os.utime(good["img00.png"], ns=(1, 10**18))
    fixed = tmp_path / "photos" / "broken" / "truncated.jpg"
    save(_photo(4321), fixed, fmt="JPEG")
    good["broken/truncated.jpg"] = fixed
    third = extract_to_db([tmp_path / "photos"], out, FakeDetector(), num_workers=0)
    assert third.written == 2 and third.skipped_existing == 5 and third.skipped_known_bad == 3
    assert_db_matches(out, good)
    assert str(fixed) not in UniterImageDB(out).failures()


def test_resume_after_injected_interruption(tmp_path: Path, home: Path) -> None:
    good = make_photos(tmp_path / "photos")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        extract_to_db([tmp_path / "photos"], out, FakeDetector(raise_after=3), batch_size=4, num_workers=2)
    db = UniterImageDB(out)
    partial = db.keys()
    assert len(partial) == 8 and db.verify() == []  # batches 1-2 committed, batch 3 lost whole
    db.close()
    report = extract_to_db([tmp_path / "photos"], out, FakeDetector(), batch_size=4, num_workers=2)
    assert report.skipped_existing == 8 and report.written == len(good) - 8
    assert_db_matches(out, good)


def test_progress_callback_exception_stops_cleanly(tmp_path: Path, home: Path) -> None:
    good = make_photos(tmp_path / "photos", n_good=8)

    def stop_after_first_commit(p: Progress) -> None:
        if p.info["written"]:
            raise RuntimeError("user pressed stop")

    with pytest.raises(RuntimeError, match="user pressed stop"):
        extract_to_db([tmp_path / "photos"], tmp_path / "out", FakeDetector(), batch_size=3, num_workers=0,
                      progress=stop_after_first_commit)
    extract_to_db([tmp_path / "photos"], tmp_path / "out", FakeDetector(), batch_size=3, num_workers=0)
    assert_db_matches(tmp_path / "out", good)


_KILL_SCRIPT = """
    import sys
    from fakes import FakeDetector
    from feature_extraction.pipeline import extract_to_db

    def progress(p):
        print(p.info["written"], flush=True)

    extract_to_db([sys.argv[1]], sys.argv[2], FakeDetector(delay_s=0.15), batch_size=2, num_workers=1,
                  progress=progress)
    print("done", flush=True)
"""


def _run_until_killed(photos: Path, out: Path, kill_at: int) -> int:
    """Run an extraction in a subprocess and SIGKILL it once it reports ``kill_at`` written."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_KILL_SCRIPT), str(photos), str(out)],
                            stdout=subprocess.PIPE, text=True, env=env)
    written = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "done":
                break
            written = int(line)
            if written >= kill_at:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(60)
    return written


def test_resume_after_kill_9(tmp_path: Path, home: Path) -> None:
    good = make_photos(tmp_path / "photos")
    out = tmp_path / "out"
    seen = []
    for kill_at in (2, 8):
        seen.append(_run_until_killed(tmp_path / "photos", out, kill_at))
        db = UniterImageDB(out)
        keys = db.keys()
        assert len(keys) >= seen[-1] and set(keys) <= set(good) and db.verify() == []
        db.close()
    assert seen[0] < len(good)
    report = extract_to_db([tmp_path / "photos"], out, FakeDetector(), batch_size=4, num_workers=2)  # lock was freed
    assert report.written + report.skipped_existing == len(good)
    assert report.skipped_existing >= seen[-1]
    assert_db_matches(out, good)


def test_hanging_and_crashing_decoders_are_isolated(tmp_path: Path, home: Path) -> None:
    good = make_photos(tmp_path / "photos", n_good=9, first_pixels={2: HANG_PIXEL, 4: CRASH_PIXEL})
    hang, crash = [k for k in good if k.endswith("img02.png")][0], [k for k in good if k.endswith("img04.png")][0]
    started = time.monotonic()
    report = extract_to_db([tmp_path / "photos"], tmp_path / "out", FakeDetector(), batch_size=3, num_workers=2,
                           preprocess=misbehaving_preprocess, decode_timeout_s=3)
    assert time.monotonic() - started < 60
    failed = failed_keys(report)
    assert failed[hang] == "decoding took longer than 3 s: stopped"
    assert failed[crash] == "decoder process died (killed by SIGSEGV)"
    del good[hang], good[crash]
    assert_db_matches(tmp_path / "out", good)


def test_detector_failure_on_one_image_spares_the_batch(tmp_path: Path, home: Path) -> None:
    bad_pixel = (9, 9, 9)
    good = make_photos(tmp_path / "photos", n_good=6, first_pixels={3: bad_pixel})
    bad_key = [k for k in good if k.endswith("img03.png")][0]
    report = extract_to_db([tmp_path / "photos"], tmp_path / "out", FakeDetector(fail_pixels=(bad_pixel,)),
                           batch_size=4, num_workers=0)
    failure = next(f for f in report.failures if f.key == bad_key)
    assert failure.reason.startswith("detector failed (RuntimeError: fake failure") and not failure.permanent
    del good[bad_key]
    assert_db_matches(tmp_path / "out", good)
    again = extract_to_db([tmp_path / "photos"], tmp_path / "out", FakeDetector(), num_workers=0)
    assert again.written == 1  # not sticky: retried and now stored


def test_broken_detector_gives_up_and_nothing_sticks(tmp_path: Path, home: Path) -> None:
    make_photos(tmp_path / "photos", n_good=14)
    with pytest.raises(DetectorError, match="3 batches in a row"):
        extract_to_db([tmp_path / "photos"], tmp_path / "out", FakeDetector(broken=True), batch_size=2, num_workers=0)
    db = UniterImageDB(tmp_path / "out")
    assert db.keys() == [] and all(not f.permanent for p, f in db.failures().items() if "img" in p)
    db.close()
    report = extract_to_db([tmp_path / "photos"], tmp_path / "out", FakeDetector(), num_workers=0)
    assert report.written == 15


def test_second_concurrent_writer_refused(tmp_path: Path, home: Path) -> None:
    make_photos(tmp_path / "photos", n_good=2)
    with UniterImageDBWriter(tmp_path / "out", "uniter"):
        with pytest.raises(DBLockedError):
            extract_to_db([tmp_path / "photos"], tmp_path / "out", FakeDetector(), num_workers=0)


def test_lxmert36_with_soft_labels(tmp_path: Path, home: Path) -> None:
    good = make_photos(tmp_path / "photos", n_good=4)
    report = extract_to_db([tmp_path / "photos"], tmp_path / "out", FakeDetector(), "lxmert36",
                           with_soft_labels=True, num_workers=0)
    assert report.db_path.name == "feat_numbb36" and report.written == 5
    assert_db_matches(tmp_path / "out", good, preset="lxmert36", soft=True)


def test_own_folders_inside_the_scanned_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos = tmp_path / "photos"
    good = make_photos(photos, n_good=3)
    monkeypatch.setenv("LDOT_HOME", str(photos / "ldot-home"))
    save(_photo(7), (photos / "ldot-home").mkdir() or photos / "ldot-home" / "cached.png", fmt="PNG")
    (photos / "features").mkdir()
    save(_photo(8), photos / "features" / "stray.png", fmt="PNG")
    report = extract_to_db([photos], photos / "features", FakeDetector(), num_workers=0)
    assert report.written == len(good)
    assert_db_matches(photos / "features", good)
    assert extract_to_db([photos], photos / "features", FakeDetector(), num_workers=0).written == 0


def test_later_run_on_another_root_never_overwrites_a_live_file(tmp_path: Path, home: Path) -> None:
    a = save(_photo(1), (tmp_path / "A").mkdir() or tmp_path / "A" / "img.png", fmt="PNG")
    b = save(_photo(2), (tmp_path / "B").mkdir() or tmp_path / "B" / "img.png", fmt="PNG")
    out = tmp_path / "out"
    extract_to_db([tmp_path / "A"], out, FakeDetector(), num_workers=0)
    report = extract_to_db([tmp_path / "B"], out, FakeDetector(), num_workers=0)
    (b_key,) = [k for k in UniterImageDB(out).keys() if k != "img.png"]
    assert report.written == 1 and b_key.startswith("img~")
    assert_db_matches(out, {"img.png": a, b_key: b})
    assert extract_to_db([tmp_path / "B"], out, FakeDetector(), num_workers=0).skipped_existing == 1
    a.unlink()  # A's file is gone: B's may now take the plain name
    c = save(_photo(3), (tmp_path / "C").mkdir() or tmp_path / "C" / "img.png", fmt="PNG")
    extract_to_db([tmp_path / "C"], out, FakeDetector(), num_workers=0)
    assert_db_matches(out, {"img.png": c, b_key: b})
