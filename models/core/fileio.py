"""Durable writes and file hashes, used by every store in ldot (models, runs, indexes, feature DBs).

The one rule for replacing anything on disk: write the new version beside the old one, fsync it, rename it into
place, fsync the folder. A file is replaced in one rename; a directory in two (old -> backup, new -> place), and
until the new one is in place the old one is still there (as the backup), so a crash never leaves neither.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (checksums of downloads and vector files; identity of image content)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()  # Python 3.11+, as pyproject requires


def sha256_range(path: str | os.PathLike[str], start: int, stop: int) -> str:
    """Hex sha256 of the bytes ``[start, stop)`` of a file (a segment of an append-only file); a file shorter
    than ``stop`` hashes what it has."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        left = max(0, stop - start)
        while left and (block := handle.read(min(left, 1 << 20))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def file_stamp(path: str | os.PathLike[str]) -> list[int]:
    """(size, mtime_ns, inode, device) of a file: when it equals the stamp taken when the file's sha256 last
    matched, the file is taken as unchanged and not hashed again (model files, index parts)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory (after a rename, so the new entry survives a power loss)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


PRIVATE = 0o600  # the mode of a file only its user may read: what every atomic write gives unless told otherwise
SHARED = 0o666  # the mode `open()` gives a new file: readable by others as the umask allows (e.g. dataset files)


def _temp_beside(path: Path, mode: int) -> tuple[int, Path]:
    """A new file ``.<name>.<random>.tmp`` beside ``path``, opened for writing, created with ``mode`` less the
    umask (never an existing file: it is created exclusively)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = PRIVATE) -> Iterator[BinaryIO]:
    """Write ``path`` in pieces: yields a binary handle on a temp file beside it which, when the block succeeds, is
    fsynced and renamed over ``path`` (then the folder is fsynced); when the block fails it is deleted and
    ``path`` is left as it was. ``mode``: `PRIVATE` (the default) or `SHARED`, less the umask."""
    path = Path(path)
    fd, tmp = _temp_beside(path, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = PRIVATE) -> None:
    """Write to a temp file beside ``path``, fsync it, rename it over ``path``, fsync the directory."""
    with atomic_writer(path, mode) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int = PRIVATE) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def read_json_object(path: str | os.PathLike[str], error: type[Exception], missing: str, hint: str = "") -> dict:
    """A JSON object read from ``path``; ``error`` names the file when it is absent (``missing`` says what that
    means), not JSON, or JSON of another shape. ``hint`` (what to do) ends each message."""
    path = Path(path)
    tail = f": {hint}" if hint else ""
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise error(missing) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}){tail}") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object{tail}")
    return data


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = None, mode: int = PRIVATE) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent, sort_keys=indent is not None) + "\n",
                      mode)


def replace_file(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Move a finished temp file (written beside ``path``) into place durably: fsync, rename, fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def _backup_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def replace_dir(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Put the finished directory ``tmp`` (beside ``target``) in place of ``target``.

    The old ``target`` becomes ``.<name>.old`` first and is deleted only after the new one is in place, so a
    crash leaves the old version (restored by `recover_dir`) or the new one, never neither.
    """
    tmp, target = Path(tmp), Path(target)
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(tmp)
    backup = _backup_of(target)
    if backup.exists():
        shutil.rmtree(backup)
    if target.exists():
        os.replace(target, backup)
    os.replace(tmp, target)
    fsync_path(target.parent)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def new_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Build the next version of the directory ``target``: yields an empty temp dir beside it, which replaces
    ``target`` (`replace_dir`) when the block succeeds and is removed when it fails."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(target: str | os.PathLike[str]) -> None:
    """After a crash inside `replace_dir`: bring the old version back when the new one never arrived."""
    target = Path(target)
    backup = _backup_of(target)
    if backup.is_dir() and not target.exists():
        os.replace(backup, target)
        fsync_path(target.parent)
