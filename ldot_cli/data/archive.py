"""Safe extraction of downloaded zips: no path traversal, no links, bounded sizes, nothing half-written.

Every entry is checked before anything is written: an absolute path, a ``..`` component, a symbolic link, an
entry larger than ``max_entry_bytes``, a compression ratio over ``max_ratio`` (a zip bomb), entries whose bytes
overlap (the overlapped-entry zip bomb, which Python 3.11's zipfile does not detect), a total over
``max_total_bytes`` or a total over ``max_ratio`` times the archive's own size (many small entries, each
under the per-entry check) refuses the whole archive. The wanted files go FLAT (by base name) into one folder, each
streamed to a temp name and renamed, so a file at its final name is always whole and a re-run after a crash
only extracts what is missing.
"""

from __future__ import annotations

import itertools
import stat
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from ldot_cli.data.errors import DatasetError
from models.core.fileio import SHARED, atomic_writer
from models.core.progress import ProgressFn, report

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _unsafe(info: zipfile.ZipInfo, max_entry: int, max_ratio: float) -> str | None:
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
        return "a path outside the folder"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if info.file_size > max_entry:
        return f"{info.file_size:,} bytes (over the {max_entry:,}-byte limit)"
    if info.compress_size and info.file_size / info.compress_size > max_ratio and info.file_size > (1 << 20):
        return f"a compression ratio of {info.file_size / info.compress_size:.0f} (a zip bomb?)"
    return None


def _overlap(handle: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> str | None:
    """The first two entries whose bytes (local header + compressed data) overlap, or run into the central
    directory; None when every entry has bytes of its own. Reads each local header (30 bytes + its lengths)."""
    fp = handle.fp
    assert fp is not None
    spans = []
    for info in infos:
        fp.seek(info.header_offset)
        header = fp.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            return f"entry {info.filename!r} has no local header at offset {info.header_offset:,}"
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        spans.append((info.header_offset, info.header_offset + 30 + name_len + extra_len + info.compress_size, info))
    spans.sort(key=lambda s: s[0])
    for (_, end, info), (next_start, _, other) in itertools.pairwise(spans):
        if end > next_start:
            return f"entries {info.filename!r} and {other.filename!r} overlap (they share bytes: a zip bomb?)"
    if spans and spans[-1][1] > handle.start_dir:
        return f"entry {spans[-1][2].filename!r} overlaps the central directory"
    return None


def safe_extract(archive: Path, dest: Path, keep: Callable[[str], bool] = lambda n: n.lower().endswith(IMAGE_SUFFIXES),
                 max_total_bytes: int = 40 << 30, max_entry_bytes: int = 200 << 20, max_ratio: float = 100.0,
                 progress: ProgressFn | None = None) -> int:
    """Extract the entries of ``archive`` whose base name ``keep`` accepts, flat into ``dest``.

    Returns how many files are in place. Raises `DatasetError` naming the archive and the entry when it is
    not a zip or holds anything unsafe (nothing is written then).
    """
    try:
        handle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{archive} is not a readable zip ({exc}): delete it and run the same command again") \
            from None
    with handle:
        infos = handle.infolist()
        total = 0
        for info in infos:
            why = _unsafe(info, max_entry_bytes, max_ratio)
            if why is not None:
                raise DatasetError(f"{archive}: entry {info.filename!r} is {why}: refused, nothing extracted (this "
                                   "is not the published file: delete it and fetch again)")
            total += info.file_size
        if total > max_total_bytes:
            raise DatasetError(f"{archive} would unpack to {total:,} bytes (over the {max_total_bytes:,}-byte limit): "
                               "refused, nothing extracted")
        size = max(archive.stat().st_size, 1)
        if total > max_ratio * size and total > (1 << 20):
            raise DatasetError(f"{archive} would unpack to {total:,} bytes, {total / size:.0f} times its own size "
                               "(a zip bomb?): refused, nothing extracted")
        why = _overlap(handle, infos)
        if why is not None:
            raise DatasetError(f"{archive}: {why}: refused, nothing extracted (this is not the published file: "
                               "delete it and fetch again)")
        wanted = [i for i in infos if not i.is_dir() and keep(PurePosixPath(i.filename).name)]
        names = [PurePosixPath(i.filename.replace("\\", "/")).name for i in wanted]
        if len(set(names)) != len(names):
            raise DatasetError(f"{archive} holds several files of the same name in different folders: refused")
        dest.mkdir(parents=True, exist_ok=True)
        for n, (info, name) in enumerate(zip(wanted, names), start=1):
            target = dest / name
            if not (target.is_file() and target.stat().st_size == info.file_size):
                try:
                    with handle.open(info) as src, atomic_writer(target, SHARED) as out:
                        written = 0
                        while block := src.read(1 << 20):
                            written += len(block)
                            if written > info.file_size:
                                raise DatasetError(f"{archive}: entry {info.filename!r} is longer than it says: "
                                                   "refused")
                            out.write(block)
                except (zipfile.BadZipFile, OSError, EOFError) as exc:
                    raise DatasetError(f"{archive} is damaged at {info.filename!r} ({exc}): delete it and fetch "
                                       "again") from None
            report(progress, "extracting", n, len(wanted), "files")
    return len(wanted)
