"""The walker: odd names, symlink loops, unreadable dirs, FIFOs, our own folders, stable keys."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest

from feature_extraction.images.walk import WalkIssue, collect_images, default_key


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def keys(*args, **kw) -> list[str]:
    return [s.key for s in collect_images(*args, **kw)]


def test_candidates_order_and_relative_keys(tmp_path: Path) -> None:
    for name in ["b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.webp", "notes.txt", "._a.jpg", ".hidden/e.jpg",
                 ".f.jpg", "sub/.DS_Store"]:
        touch(tmp_path / name)
    assert keys([tmp_path]) == ["a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.webp"]
    assert keys([tmp_path], include_hidden=True) == [".f.jpg", "a.PNG", "b.jpg", ".hidden/e.jpg", "sub/c.jpeg",
                                                      "sub/deeper/d.webp"]
    srcs = collect_images([tmp_path / "b.jpg", tmp_path / "notes.txt"])  # files given directly: taken as is
    assert [s.key for s in srcs] == ["b.jpg", "notes.txt"]
    assert srcs[0].path == str(tmp_path / "b.jpg") and srcs[0].size == 1 and srcs[0].mtime_ns > 0


def test_odd_names(tmp_path: Path) -> None:
    nfd = unicodedata.normalize("NFD", "café.jpg")
    touch(tmp_path / nfd)
    touch(tmp_path / "🙂 smile.jpg")
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9-latin1.jpg"  # not UTF-8
    with open(raw, "wb") as fh:
        fh.write(b"x")
    srcs = collect_images([tmp_path])
    ks = sorted(s.key for s in srcs)
    assert ks == sorted(["café.jpg", "🙂 smile.jpg", "caf\\xe9-latin1.jpg"])
    assert all(k.encode("utf-8") for k in ks)  # every key is valid UTF-8
    assert unicodedata.is_normalized("NFC", [k for k in ks if k.startswith("caf")][0])
    latin = next(s for s in srcs if "latin1" in s.key)
    assert os.fsencode(latin.path) == raw  # the path still opens the file


def test_symlink_loops_and_duplicates(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "x.jpg")
    (tmp_path / "a" / "loop").symlink_to(tmp_path)  # a -> .. -> a -> ...
    (tmp_path / "a" / "self.jpg").symlink_to(tmp_path / "a" / "self.jpg")  # ELOOP
    (tmp_path / "alias.jpg").symlink_to(tmp_path / "a" / "x.jpg")
    issues: list[WalkIssue] = []
    srcs = collect_images([tmp_path], on_issue=issues.append)
    assert [s.key for s in srcs] == ["alias.jpg"]  # each directory and each file once (first met wins)
    assert [i.reason for i in issues] == ["broken symlink"]


def test_fifo_and_special_files(tmp_path: Path) -> None:
    touch(tmp_path / "ok.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    issues: list[WalkIssue] = []
    assert keys([tmp_path], on_issue=issues.append) == ["ok.jpg"]
    assert issues == [WalkIssue(str(tmp_path / "pipe.jpg"), "not a regular file")]
    issues.clear()
    assert keys([tmp_path / "pipe.jpg"], on_issue=issues.append) == []
    assert issues[0].reason == "not a regular file"


def test_unreadable_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path / "ok" / "a.jpg")
    touch(tmp_path / "locked" / "b.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    issues: list[WalkIssue] = []
    assert keys([tmp_path], on_issue=issues.append) == ["ok/a.jpg"]
    assert issues == [WalkIssue(str(tmp_path / "locked"), "permission denied")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
def test_unreadable_dir_for_real(tmp_path: Path) -> None:
    touch(tmp_path / "locked" / "b.jpg")
    (tmp_path / "locked").chmod(0)
    try:
        issues: list[WalkIssue] = []
        assert keys([tmp_path], on_issue=issues.append) == []
        assert issues[0].reason == "permission denied"
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_own_folders_excluded(tmp_path: Path) -> None:
    touch(tmp_path / "photos" / "a.jpg")
    touch(tmp_path / "photos" / "ldot-home" / "thumb.jpg")
    touch(tmp_path / "photos" / "features" / "x.jpg")
    got = keys([tmp_path / "photos"], exclude=[tmp_path / "photos" / "ldot-home", tmp_path / "photos" / "features",
                                               tmp_path / "missing"])
    assert got == ["a.jpg"]


def test_collisions_across_roots_are_stable(tmp_path: Path) -> None:
    touch(tmp_path / "r1" / "img.jpg")
    touch(tmp_path / "r2" / "img.jpg")
    touch(tmp_path / "r2" / "noext")
    first = collect_images([tmp_path / "r1", tmp_path / "r2"])
    assert first[0].key == "img.jpg" and first[1].key.startswith("img~") and first[1].key.endswith(".jpg")
    again = collect_images([tmp_path / "r1", tmp_path / "r2"])
    assert [s.key for s in again] == [s.key for s in first]
    custom = collect_images([tmp_path / "r1", tmp_path / "r2"], key_fn=lambda p, r: "same")
    assert custom[0].key == "same" and custom[1].key.startswith("same~")


def test_long_keys_fit_lmdb(tmp_path: Path) -> None:
    deep = tmp_path
    for i in range(6):
        deep = deep / ("d" * 100 + str(i))
    touch(deep / "photo.jpg")
    (src,) = collect_images([tmp_path])
    assert len(src.key.encode("utf-8")) <= 420 and src.key.endswith(".jpg") and "/photo~" in src.key


def test_default_key() -> None:
    assert default_key("/r/a/b.jpg", "/r") == "a/b.jpg"
    assert default_key("/r/a/b.jpg", "/r/a/b.jpg") == "b.jpg"


def test_nas_thumbnail_and_trash_folders_are_not_walked(tmp_path: Path) -> None:
    from imagegen import pattern, save

    save(pattern(), tmp_path / "keep.png")
    for folder in ("@eaDir/keep.png", "#recycle", "$RECYCLE.BIN"):
        (tmp_path / folder).mkdir(parents=True)
        save(pattern(), tmp_path / folder / "thumb.png")
    found = [s.key for s in collect_images([tmp_path])]
    assert found == ["keep.png"]
