"""Checking an index's files against their recorded sha256 without re-hashing them on every open.

A file is re-hashed only when its (size, mtime_ns, inode, device) stamp differs from the one recorded when it
was written or last matched; matches are remembered in the index's ``.verified.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldot_cli.index.layout import VERIFIED_FILE
from ldot_cli.index.meta import FileRecord
from models.core.fileio import atomic_write_json, file_stamp, sha256_file


class FileDamaged(Exception):
    """A vector file that does not match its record (readers turn it into `IndexStoreError`)."""


class FileUnrecorded(FileDamaged):
    """IVF-PQ re-scoring files written by an ldot that recorded no checksum for them (not damage: an upgrade)."""


class VerifiedFiles:
    """The ``.verified.json`` of one index folder: file name -> the stamp and sha256 it last matched."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def known(self) -> dict[str, Any]:
        try:
            data = json.loads((self.dir / VERIFIED_FILE).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def matched(self, name: str, stamp: Any, sha256: str) -> bool:
        """Whether ``name`` last matched ``sha256`` with this very stamp."""
        return bool(self.known().get(name) == {"stamp": stamp, "sha256": sha256})

    def remember(self, name: str, stamp: Any, sha256: str) -> None:
        self._write({**self.known(), name: {"stamp": stamp, "sha256": sha256}})

    def keep_only(self, names: set[str]) -> None:
        """Forget files no longer recorded."""
        known = self.known()
        if set(known) - names:
            self._write({k: v for k, v in known.items() if k in names})

    def _write(self, entries: dict[str, Any]) -> None:
        try:
            atomic_write_json(self.dir / VERIFIED_FILE, entries)
        except OSError:
            pass  # a read-only index: only saves hashing next time

    def check(self, record: FileRecord) -> Path:
        """A recorded file, verified: its sha256 is re-computed only when its stamp differs from the one
        recorded when it was written or last matched. Raises FileNotFoundError or `FileDamaged`."""
        path = self.dir / record["file"]
        stamp = file_stamp(path)
        if stamp == record.get("stamp"):
            return path
        recorded = record.get("stamp")
        if recorded and stamp[0] != recorded[0]:
            raise FileDamaged(path)  # another size: no need to hash
        if self.matched(record["file"], stamp, record["sha256"]):
            return path
        if sha256_file(path) != record["sha256"]:
            raise FileDamaged(path)
        self.remember(record["file"], stamp, record["sha256"])
        return path
