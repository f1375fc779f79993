"""Find image files under the paths a user gives, and name them with stable DB keys.

The walk survives what real photo folders hold: symlink loops (each directory is entered
once, by device and inode), unreadable directories (reported, skipped), FIFOs and devices
(never opened), macOS ``._*`` companions, hidden entries and NAS thumbnail/trash folders such as
Synology's ``@eaDir`` (skipped), non-UTF-8, NFD and
emoji file names, and ldot's own folders inside the scanned tree (excluded).

Keys (the UNITER DB's "file name"): by default the file's path relative to the root it was
found under, with ``/`` separators, Unicode NFC, undecodable bytes written ``\\xNN``
(``holiday/beach.jpg``); a file given directly is keyed by its name. Colliding keys (the
same relative path under two roots) are made unique in input order: the first keeps the
key, the next get ``<stem>~<8 hex of sha1(path)><suffix>``. Keys longer than the LMDB limit
are shortened the same way.
"""

from __future__ import annotations

import hashlib
import os
import stat
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from feature_extraction.images.decode import is_image_candidate

KeyFn = Callable[[str, str], str]  # (file path, root it was found under) -> DB key
# Folders NAS boxes and OSes fill with thumbnails or deleted files: never photos of the user's own.
SKIPPED_DIRS = frozenset({"@eaDir", "#recycle", "@Recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information",
                          "lost+found"})
MAX_KEY_BYTES = 400  # LMDB's key limit is 511 bytes; leave room for the collision suffix


@dataclass(frozen=True)
class ImageSource:
    """One candidate image file and the key its features are stored under."""

    path: str  # absolute path (a str that may hold surrogate escapes for non-UTF-8 names)
    root: str  # the input path it was found under (the file itself when given directly)
    key: str  # DB key, valid UTF-8
    size: int  # bytes, at walk time
    mtime_ns: int  # modification time, at walk time


@dataclass(frozen=True)
class WalkIssue:
    """Something under the given paths that was not offered for extraction, and why."""

    path: str
    reason: str


def default_key(path: str, root: str) -> str:
    """``path`` relative to ``root`` as a portable key (``a/b.jpg``); a root that is the file: its name."""
    rel = os.path.basename(path) if path == root else os.path.relpath(path, root)
    rel = rel.replace(os.sep, "/")
    text = os.fsencode(rel).decode("utf-8", "backslashreplace")
    return unicodedata.normalize("NFC", text)


def collect_images(inputs: Iterable[str | os.PathLike[str]], *, exclude: Iterable[str | os.PathLike[str]] = (),
                   key_fn: KeyFn | None = None, include_hidden: bool = False,
                   on_issue: Callable[[WalkIssue], None] | None = None) -> list[ImageSource]:
    """Every candidate image under ``inputs`` (files or directories), in a stable order, with unique keys.

    Args:
        inputs: files (taken whatever their extension) and directories (walked recursively,
            following symlinks, keeping names that :func:`is_image_candidate` accepts).
        exclude: directories never entered (ldot's output and cache folders).
        key_fn: ``(path, root) -> key``; default :func:`default_key`.
        include_hidden: also walk/take names starting with ``.`` (``._*`` never).
        on_issue: called for each path skipped with a reason (unreadable dir, FIFO, ...).
    """
    report = on_issue or (lambda issue: None)
    walker = _Walker(_dir_ids(exclude), include_hidden, report)
    found: list[tuple[str, str, os.stat_result]] = []
    for item in inputs:
        found.extend(walker.walk_input(os.path.abspath(os.fspath(item))))
    return _assign_keys(found, key_fn or default_key)


class _Walker:
    def __init__(self, excluded: set[tuple[int, int]], include_hidden: bool,
                 report: Callable[[WalkIssue], None]) -> None:
        self.excluded = excluded
        self.include_hidden = include_hidden
        self.report = report
        self.seen_dirs: set[tuple[int, int]] = set()
        self.seen_files: set[tuple[int, int]] = set()

    def walk_input(self, path: str) -> Iterator[tuple[str, str, os.stat_result]]:
        try:
            st = os.stat(path)
        except OSError as exc:
            self.report(WalkIssue(path, _os_reason(exc)))
            return
        if stat.S_ISDIR(st.st_mode):
            yield from self._walk_dir(path, path)
        elif self._take_file(path, st):
            yield path, path, st

    def _walk_dir(self, top: str, root: str) -> Iterator[tuple[str, str, os.stat_result]]:
        stack = [top]
        while stack:
            directory = stack.pop()
            entries = self._list(directory)
            subdirs = []
            for name, path in entries:
                kind, st = self._classify(path)
                if kind == "dir":
                    subdirs.append(path)
                elif kind == "file" and st is not None and is_image_candidate(name) and self._take_file(path, st):
                    yield path, root, st
                elif kind == "special" and is_image_candidate(name):
                    self.report(WalkIssue(path, "not a regular file"))
                elif kind == "broken" and is_image_candidate(name):
                    self.report(WalkIssue(path, "broken symlink"))
            stack.extend(reversed(subdirs))  # depth-first, in name order

    def _list(self, directory: str) -> list[tuple[str, str]]:
        """(name, path) of the directory's entries, sorted, hidden and ``._*`` ones dropped."""
        try:
            st = os.stat(directory)
        except OSError as exc:
            self.report(WalkIssue(directory, _os_reason(exc)))
            return []
        ident = (st.st_dev, st.st_ino)
        if ident in self.seen_dirs or ident in self.excluded:
            return []  # a symlink loop, a directory reached twice, or ldot's own folder
        self.seen_dirs.add(ident)
        try:
            with os.scandir(directory) as it:
                names = sorted(entry.name for entry in it)
        except OSError as exc:
            self.report(WalkIssue(directory, _os_reason(exc)))
            return []
        return [(n, os.path.join(directory, n)) for n in names if self._wanted_name(n)]

    def _wanted_name(self, name: str) -> bool:
        if name.startswith("._") or name in SKIPPED_DIRS:
            return False
        return self.include_hidden or not name.startswith(".")

    @staticmethod
    def _classify(path: str) -> tuple[str, os.stat_result | None]:
        try:
            st = os.stat(path)  # follows symlinks
        except OSError:
            return ("broken" if os.path.islink(path) else "gone"), None
        if stat.S_ISDIR(st.st_mode):
            return "dir", st
        if stat.S_ISREG(st.st_mode):
            return "file", st
        return "special", st

    def _take_file(self, path: str, st: os.stat_result) -> bool:
        if not stat.S_ISREG(st.st_mode):
            self.report(WalkIssue(path, "not a regular file"))
            return False
        ident = (st.st_dev, st.st_ino)
        if ident in self.seen_files:
            return False  # the same file through a symlink or hard link: extracted once
        self.seen_files.add(ident)
        return True


def _dir_ids(paths: Iterable[str | os.PathLike[str]]) -> set[tuple[int, int]]:
    ids = set()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "not found"
    return exc.strerror or str(exc)


def _assign_keys(found: list[tuple[str, str, os.stat_result]], key_fn: KeyFn) -> list[ImageSource]:
    used: set[str] = set()
    out = []
    for path, root, st in found:
        key = _fit_key(key_fn(path, root), path)
        if key in used:
            key = suffixed_key(key, path)
        used.add(key)
        out.append(ImageSource(path=path, root=root, key=key, size=int(st.st_size), mtime_ns=int(st.st_mtime_ns)))
    return out


def suffixed_key(key: str, path: str) -> str:
    """``a/b.jpg`` -> ``a/b~1f2e3d4c.jpg`` (a hash of the full path: stable across runs)."""
    digest = hashlib.sha1(os.fsencode(path)).hexdigest()[:8]
    head, dot, ext = key.rpartition(".")
    if not dot or "/" in ext:
        return f"{key}~{digest}"
    return f"{head}~{digest}.{ext}"


def _fit_key(key: str, path: str) -> str:
    key = key.encode("utf-8", "backslashreplace").decode("utf-8")  # never a lone surrogate
    if len(key.encode("utf-8")) <= MAX_KEY_BYTES:
        return key
    tail = key.encode("utf-8")[-(MAX_KEY_BYTES // 2):].decode("utf-8", "ignore")
    return suffixed_key("…" + tail, path)
