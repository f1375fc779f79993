"""What every way of running `ldot index` shares: the report, the walk, the files' rows, and the two seams:
`Executor` (where the model work runs: `encoding.LocalExecutor` here, `distributed.RayExecutor` on a Ray
cluster) and `IndexRun` (what an executor uses of the `indexer.Indexer` it works for)."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from feature_extraction.images.walk import WalkIssue
from ldot_cli.index.catalogue import FileRow
from ldot_cli.index.options import IndexOptions
from ldot_cli.index.store import IndexStore

PIXEL_BATCH = 32  # images per dual-encoder forward pass (and per committed transaction)
FAISS_FLUSH_S = 300.0  # rewrite the vector file at least this often during long runs
STAGING_DIR = ".staging-regions"


# progress stages, in order: "scanning" (files), "hashing", "extracting", "encoding" (images), "saving"


@dataclass
class IndexReport:
    """What one `Indexer.run` did. Every file found is counted exactly once:
    ``found == encoded + reused + unchanged + skipped_total``."""

    name: str
    found: int = 0  # image files under the roots (including those the walk could not read)
    unchanged: int = 0  # indexed before, same size and mtime: no work
    reused: int = 0  # new or touched path, known content (moved, copied, a duplicate): vector reused
    encoded: int = 0  # files whose content was put through the models in this run
    removed: int = 0  # files gone since last time
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) skipped (again) in this run
    skipped_before: int = 0  # skipped by an earlier run and unchanged since: not tried again
    images: int = 0  # indexed files under every root of the index after the run
    vectors: int = 0  # distinct contents (vectors) in the index after the run
    faiss: str = ""
    elapsed_s: float = 0.0

    @property
    def skipped_total(self) -> int:
        return len(self.skipped) + self.skipped_before


class WalkedFile(Protocol):
    """A file an executor looks at: a walked image (`ImageSource`) or an item of a Ray source (`Item`)."""

    @property
    def path(self) -> str: ...
    @property
    def root(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...


@dataclass
class Scan:
    """The walk of the roots, done before anything is created or downloaded."""

    roots: list[str]
    sources: Sequence[WalkedFile]
    issues: list[WalkIssue]


def excluded(path: str, root: str, patterns: Sequence[str]) -> bool:
    rel = os.path.relpath(path, root)
    parts = rel.split(os.sep)
    return any(fnmatch.fnmatch(rel, p) or any(fnmatch.fnmatch(part, p) for part in parts) for p in patterns)


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def file_row(src: WalkedFile, digest: str | None, vector_id: int | None, reason: str | None = None,
             retry: bool = False) -> FileRow:
    """The row of a walked file: indexed (with its vector) or skipped (with the reason)."""
    status = "indexed" if vector_id is not None else "skipped"
    return FileRow(os.fsencode(src.path), os.fsencode(src.root), src.size, src.mtime_ns, digest, status, reason,
                   int(retry), vector_id)


class IndexRun(Protocol):
    """What an executor uses of the run it works for (`indexer.Indexer`)."""

    name: str
    dir: Path
    options: IndexOptions
    keep_regions: bool  # the run keeps region features
    pixels: bool  # the model reads pixels
    preset: str
    model: str
    detector_name: str | None

    @property
    def encoder(self) -> Any: ...
    @property
    def detector(self) -> Any: ...
    def stage(self, stage: str, done: int, total: int | None) -> None: ...
    def scan(self, roots: Iterable[str | os.PathLike[str]], excludes: Sequence[str] = ()) -> Scan: ...
    def plan_files(self, store: IndexStore, scan: Scan, retry_failed: bool, report: IndexReport) -> list[WalkedFile]: ...
    def record_walk_issues(self, store: IndexStore, scan: Scan, report: IndexReport) -> None: ...
    def skip(self, store: IndexStore, failed: Sequence[tuple[WalkedFile, str | None, str, bool]],
             report: IndexReport) -> None: ...
    def collect_garbage(self, store: IndexStore) -> None: ...
    def maybe_flush(self, store: IndexStore) -> None: ...
    def save(self, store: IndexStore, report: IndexReport) -> None: ...


class Executor(Protocol):
    """Where an `Indexer`'s model work runs: `plan` looks at the inputs, `run` brings the open index in step."""

    def plan(self, paths: list[str], excludes: tuple[str, ...]) -> Any: ...

    def run(self, store: IndexStore, plan: Any, excludes: tuple[str, ...], retry_failed: bool, reindex: bool,
            report: IndexReport) -> None: ...
