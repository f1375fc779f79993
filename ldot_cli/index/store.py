"""One named search index on disk: SQLite is the source of truth, FAISS a checksummed cache of it.

Layout of ``<home>/indexes/<name>/``::

    index.sqlite        WAL-mode SQLite: meta, every file seen (path, size, mtime, content hash, status,
                        skip reason, vector id, time) and every vector (float32 blob, keyed by content hash)
    vectors.faiss       the exact tier: FAISS inner-product index over the vectors, ids = vector ids
    vectors.part-G-N.faiss  the approximate tiers (IVF, IVF-PQ): parts over contiguous id ranges, at most
                        `part_rows` vectors each, all clones of vectors.trained-G.faiss (the trained empty
                        index, whose coarse quantizer they share: it is not stored in them), searched
                        together by FAISS's IndexShardsIVF. G is the generation that wrote the file: a new
                        part never overwrites a committed one.
    vectors.f16(.ids)   IVF-PQ: fp16 copies of the vectors for exact re-scoring, memory-mapped; append-only,
                        the sha256 of each appended segment and the files' stamps recorded in SQLite meta
                        (``rescore_record``), checked like the FAISS files (a damaged one is rewritten from
                        SQLite)
    .verified.json      (size, mtime, inode, device) of each file when its sha256 last matched
                        Every FAISS file is written to a temp file, fsynced, renamed into place; the set of
                        files with each one's sha256, rows and stamp is recorded in SQLite meta in one
                        transaction, and each file is checked before FAISS reads it (re-hashed only when its
                        stamp changed; a damaged one is rebuilt from SQLite).
    regions/            region features for re-ranking (UNITER image-DB layout, keyed by content hash)
    .lock               held by the one process updating the index

Crash safety: each batch (vectors + file rows) is one SQLite transaction, so kill -9 loses at most the
batch in flight. Vector ids come from AUTOINCREMENT and are never reused: vectors newer than the FAISS
file (``id > faiss_max_id``) are searched by brute force until the next flush, so searches stay
complete and correct while an index is being updated or after a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldot_cli.index.hits import display_path  # noqa: F401 - re-exported
from models.core.errors import LdotError, LdotWarning, as_storage_error, option
from models.core.fileio import (
    atomic_write_json,
    file_stamp,
    replace_file,
    sha256_file,
    sha256_range,
)
from models.core.home import indexes_dir

FORMAT_VERSION = 1
DB_FILE = "index.sqlite"
FAISS_FILE = "vectors.faiss"  # the exact tier's one file
PART_PREFIX = "vectors.part-"  # approximate tiers: vectors.part-<generation>-<n>.faiss, one per id range
TRAINED_PREFIX = "vectors.trained-"  # the trained empty index every part is cloned from
VERIFIED_FILE = ".verified.json"  # file -> (size, mtime, inode, device) stamp when its sha256 last matched
REGIONS_DIR = "regions"
DEFAULT_PRESET = "uniter"  # the box preset of an index's region features unless `ldot index --preset` says
LOCK_FILE = ".lock"
LOCK_INFO_FILE = ".lock.info"  # who holds the lock: pid, host, command, since (JSON)
# Past this many vectors an index switches to approximate search (IVF), unless told otherwise.
ANN_THRESHOLD = 250_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- the FAISS id; never reused
    content_hash TEXT NOT NULL UNIQUE,      -- sha256 of the image file's bytes
    vector BLOB NOT NULL,                   -- float32 little-endian, `dim` values
    num_boxes INTEGER NOT NULL,             -- regions the image tower read
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY,                  -- os.fsencode(absolute path): any bytes the OS allows
    root BLOB NOT NULL,                     -- the indexed folder it was found under
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    content_hash TEXT,                      -- NULL until hashed
    status TEXT NOT NULL,                   -- indexed | skipped
    reason TEXT,                            -- why it was skipped
    retry INTEGER NOT NULL DEFAULT 0,       -- 1: a passing failure, tried again by the next run
    vector_id INTEGER REFERENCES vectors(id),
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS removed (id INTEGER PRIMARY KEY);  -- vector ids still to drop from FAISS
CREATE INDEX IF NOT EXISTS files_by_hash ON files(content_hash);
CREATE INDEX IF NOT EXISTS files_by_vector ON files(vector_id);
CREATE INDEX IF NOT EXISTS files_by_root ON files(root);
"""


class IndexStoreError(LdotError):
    """An index is missing, damaged, from another model or from a newer ldot."""


class IndexUnrecorded(IndexStoreError):
    """A vector file an older ldot wrote without a checksum: rewritten from SQLite once, which is no damage."""


FILE_COLUMNS = ("path", "root", "size", "mtime_ns", "content_hash", "status", "reason", "retry", "vector_id")


@dataclass(frozen=True)
class FileRow:
    path: bytes
    root: bytes
    size: int
    mtime_ns: int
    content_hash: str | None
    status: str
    reason: str | None
    retry: int
    vector_id: int | None

    @property
    def display(self) -> str:
        return display_path(self.path)


def lock_holder(directory: Path) -> str:
    """Who holds an index's lock, in words (from the info file its holder wrote)."""
    import datetime

    try:
        info = json.loads((directory / LOCK_INFO_FILE).read_text("utf-8"))
        since = datetime.datetime.fromtimestamp(float(info["since"])).strftime("%H:%M:%S")
        command = " ".join(str(info.get("command", "")).split())[:120]
        return f"pid {int(info['pid'])} on {info.get('host', '?')} ({command}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def writer_lock(directory: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the index's writer lock; while another process holds it, say who (an `LdotWarning`) and wait.

    With ``wait=False`` yields False at once when the lock is taken. The holder's pid, host and command
    are written beside the lock (released by the OS when a process dies; the info file is then stale but
    harmless: the next holder rewrites it).
    """
    import socket
    import sys
    import warnings

    from filelock import FileLock, Timeout

    lock = FileLock(str(directory / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            yield False
            return
        warnings.warn(LdotWarning(f"index {directory.name!r} is being updated by {lock_holder(directory)}: "
                                  "waiting for it to finish (Ctrl-C to stop waiting)"), stacklevel=3)
        lock.acquire()
    try:
        try:
            atomic_write_json(directory / LOCK_INFO_FILE, {
                "pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": " ".join([os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]])})
        except OSError:
            pass  # only informative
        yield True
    finally:
        (directory / LOCK_INFO_FILE).unlink(missing_ok=True)
        lock.release()


def index_path(name: str) -> Path:
    from models.hub.cache import check_name

    return indexes_dir() / check_name(name, "index")


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """A damaged database file (not a busy, full or read-only one, which are reported as they are)."""
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return False
    text = str(exc).lower()
    return any(w in text for w in ("malformed", "not a database", "file is encrypted", "corrupt",
                                   "unsupported file format"))


def header_problem(path: Path) -> str | None:
    """What is wrong with an SQLite file's 100-byte header (fields whose valid values the file format fixes)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(100)
    except OSError:
        return None
    if len(head) < 100:
        return "shorter than an SQLite header" if head else None
    if head[:16] != b"SQLite format 3\0":
        return "not an SQLite file"
    page = int.from_bytes(head[16:18], "big")
    if not (page == 1 or (512 <= page <= 32768 and page & (page - 1) == 0)):
        return "bad page size in the header"
    if head[18] not in (1, 2) or head[19] not in (1, 2) or head[21:24] != b"\x40\x20\x20":
        return "bad file-format fields in the header"
    return None


def damaged_index(directory: Path, exc: BaseException) -> IndexStoreError:
    name = directory.name
    return IndexStoreError(f"index {name!r} is damaged ({directory / DB_FILE}: {exc}): rebuild it with "
                       f"`ldot index FOLDER --name {name} --reindex` (or remove it: `ldot index rm {name}`)")


class _Connection(sqlite3.Connection):
    """A connection whose "database is damaged" errors name the file and the way to rebuild it."""

    index_dir: Path

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:  # type: ignore[override]
        try:
            return super().execute(*args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if _is_damage(exc):
                raise damaged_index(self.index_dir, exc) from None
            raise

    def executemany(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:  # type: ignore[override]
        try:
            return super().executemany(*args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if _is_damage(exc):
                raise damaged_index(self.index_dir, exc) from None
            raise


class IndexStore:
    """Open (or create) a named index. Readers and the one writer may use it at the same time."""

    def __init__(self, directory: Path, create: bool = False) -> None:
        self.dir = directory
        self.name = directory.name
        if not (directory / DB_FILE).is_file():
            if not create:
                command = f"`ldot index FOLDER --name {self.name}`" if self.name != "default" else "`ldot index FOLDER`"
                raise IndexStoreError(f"no index named {self.name!r} (looked in {directory}): create it with {command}")
            directory.mkdir(parents=True, exist_ok=True)
        self.db = self._connect()
        self._check_version(create)

    # -- connection ------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        problem = header_problem(self.dir / DB_FILE)  # what SQLite may only notice at the first write
        if problem:
            raise damaged_index(self.dir, problem)
        try:
            db = sqlite3.connect(self.dir / DB_FILE, timeout=60, isolation_level=None, check_same_thread=False,
                                 factory=_Connection)
            db.index_dir = self.dir
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA)
        except IndexStoreError:
            raise
        except sqlite3.DatabaseError as exc:
            problem = header_problem(self.dir / DB_FILE)
            if problem:
                raise damaged_index(self.dir, problem) from None
            busy = "locked" in str(exc).lower() or as_storage_error(exc) is not None
            if isinstance(exc, sqlite3.OperationalError) and busy and not _is_damage(exc):
                raise  # busy, full or read-only: the caller's error boundary says so
            raise damaged_index(self.dir, exc) from None
        return db

    def _check_version(self, create: bool) -> None:
        version = self.get_meta("format_version")
        if version is None:
            if not create:
                raise IndexStoreError(f"index {self.name!r} was never completed: run `ldot index FOLDER --name {self.name}`")
            self.set_meta({"format_version": str(FORMAT_VERSION), "created": str(time.time())})
            return
        if not version.isdigit():
            self._number("format_version", version)  # raises: a damaged index, named
        if int(version) > FORMAT_VERSION:
            raise IndexStoreError(f"index {self.name!r} was written by a newer ldot (format {version}; this ldot reads "
                              f"{FORMAT_VERSION}): upgrade ldot, or rebuild it ({option('reindex')})")

    def _number(self, key: str, value: str) -> int:
        """A numeric meta value; a damaged one is named with the way to rebuild."""
        try:
            return int(value)
        except (TypeError, ValueError):
            raise IndexStoreError(f"index {self.name!r} is damaged ({self.dir / DB_FILE}: {key} {str(value)[:40]!r} "
                                  f"is not a number): rebuild it with `ldot index FOLDER --name {self.name} "
                                  "--reindex`") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of work (BEGIN IMMEDIATE: writers queue, readers carry on under WAL)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            if self.db.in_transaction:  # SQLite may have rolled back already (e.g. on a full disk)
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- meta ------------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def set_meta(self, values: dict[str, Any], db: sqlite3.Connection | None = None) -> None:
        rows = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in values.items()]
        (db or self.db).executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows)

    @property
    def dim(self) -> int | None:
        value = self.get_meta("dim")
        return self._number("dim", value) if value else None

    # -- files -----------------------------------------------------------------------------------
    def files_under(self, root: bytes) -> dict[bytes, FileRow]:
        rows = self.db.execute(f"SELECT {', '.join(FILE_COLUMNS)} FROM files WHERE root = ?", (root,))
        return {r[0]: FileRow(*r) for r in rows}

    def file_rows(self, status: str | None = None) -> list[FileRow]:
        sql = f"SELECT {', '.join(FILE_COLUMNS)} FROM files"
        rows = self.db.execute(sql + (" WHERE status = ?" if status else "") + " ORDER BY path",
                               (status,) if status else ())
        return [FileRow(*r) for r in rows]

    @staticmethod
    def put_files(db: sqlite3.Connection, rows: Iterable[FileRow]) -> None:
        """Insert or replace file rows (inside the caller's transaction)."""
        now = time.time()
        db.executemany(f"INSERT OR REPLACE INTO files ({', '.join(FILE_COLUMNS)}, updated) "
                       f"VALUES ({', '.join('?' * len(FILE_COLUMNS))}, ?)",
                       [(*(getattr(r, c) for c in FILE_COLUMNS), now) for r in rows])

    def delete_files(self, db: sqlite3.Connection, paths: Iterable[bytes]) -> None:
        db.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in paths])

    def vector_for_hash(self, content_hash: str) -> int | None:
        row = self.db.execute("SELECT id FROM vectors WHERE content_hash = ?", (content_hash,)).fetchone()
        return row[0] if row else None

    def content_hashes(self, ids: Sequence[int]) -> dict[int, str]:
        """Vector id -> the content hash its region record is stored under."""
        if not ids:
            return {}
        rows = self.db.execute(f"SELECT id, content_hash FROM vectors WHERE id IN ({','.join('?' * len(ids))})",
                               list(ids))
        return dict(rows)

    def paths_for_vectors(self, ids: Sequence[int]) -> dict[int, list[bytes]]:
        out: dict[int, list[bytes]] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            marks = ",".join("?" * len(chunk))
            for vid, path in self.db.execute(f"SELECT vector_id, path FROM files WHERE status = 'indexed' AND "
                                             f"vector_id IN ({marks}) ORDER BY path", chunk):
                out.setdefault(vid, []).append(path)
        return out

    def indexed_files(self, vector_id: int) -> list[FileRow]:
        """The indexed file rows of one vector (the files holding its content when they were indexed)."""
        rows = self.db.execute(f"SELECT {', '.join(FILE_COLUMNS)} FROM files WHERE status = 'indexed' AND "
                               "vector_id = ? ORDER BY path", (int(vector_id),))
        return [FileRow(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        counts = dict(self.db.execute("SELECT status, COUNT(*) FROM files GROUP BY status"))
        counts["vectors"] = self.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
        return counts

    # -- vectors ---------------------------------------------------------------------------------
    def add_vector(self, db: sqlite3.Connection, content_hash: str, vector: np.ndarray, num_boxes: int) -> int:
        blob = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        cur = db.execute("INSERT INTO vectors (content_hash, vector, num_boxes, created) VALUES (?, ?, ?, ?)",
                         (content_hash, blob, num_boxes, time.time()))
        return int(cur.lastrowid)

    def vectors(self, min_id: int = 0, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,) int64, vectors (n, dim) float32) with id > min_id (or the given ids)."""
        if ids is not None:
            wanted = list(ids)
            rows = []
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                rows += self.db.execute(f"SELECT id, vector FROM vectors WHERE id IN ({','.join('?' * len(chunk))})",
                                        chunk).fetchall()
        else:
            rows = self.db.execute("SELECT id, vector FROM vectors WHERE id > ? ORDER BY id", (min_id,)).fetchall()
        dim = self.dim or 0
        out_ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        out = np.empty((len(rows), dim), dtype=np.float32)
        for i, (_, blob) in enumerate(rows):
            out[i] = np.frombuffer(blob, dtype="<f4")
        return out_ids, out

    def content_hash_set(self) -> set[str]:
        """The content hash of every vector (the keys its region store may hold)."""
        return {row[0] for row in self.db.execute("SELECT content_hash FROM vectors")}

    def roots(self) -> list[tuple[bytes, dict[str, int]]]:
        """Every folder the index covers, with its file counts by status."""
        out: dict[bytes, dict[str, int]] = {}
        for root, status, count in self.db.execute("SELECT root, status, COUNT(*) FROM files GROUP BY root, status "
                                                   "ORDER BY root"):
            out.setdefault(root, {})[status] = count
        return list(out.items())

    def orphan_vectors(self) -> list[tuple[int, str]]:
        """Vectors no indexed file points to any more (removed or changed files)."""
        return self.db.execute("SELECT id, content_hash FROM vectors WHERE id NOT IN "
                               "(SELECT vector_id FROM files WHERE vector_id IS NOT NULL)").fetchall()

    def delete_vectors(self, db: sqlite3.Connection, ids: Sequence[int]) -> None:
        """Drop vectors; their ids are remembered until the FAISS file no longer holds them."""
        db.executemany("DELETE FROM vectors WHERE id = ?", [(i,) for i in ids])
        db.executemany("INSERT OR IGNORE INTO removed (id) VALUES (?)", [(i,) for i in ids])

    def sync_faiss(self, kind: str | None = None, rebuild: bool = False) -> str:
        """Bring the vector index up to date with SQLite: add newer vectors, drop removed ones.

        The exact tier is one file; the approximate tiers are parts of at most `part_rows` vectors (see
        `ann.PART_ROWS`), so adding vectors rewrites only the last part and removing some only the parts
        that held them. Rebuilds from SQLite when asked, when a file is missing or damaged, or when the index
        kind changes (``kind`` None: `ann.choose_kind`: exact up to `ANN_THRESHOLD` vectors, approximate
        past it, IVF-PQ past the memory budget). Only the process holding the index lock may call this.
        Returns what was done.
        """
        from models.core import ann

        total = self.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
        current = self.get_meta("faiss_kind")
        want = kind or self.get_meta("ann_mode") or "auto"
        if want == "auto":
            budget = self.get_meta("memory_budget")
            want = ann.choose_kind(total, self.dim or 0, ANN_THRESHOLD, int(budget) if budget else None)
        if want != ann.EXACT and total == 0:
            want = ann.EXACT  # nothing to train an approximate index on yet
        elif want == ann.PQ and total < ann.pq_min_training(self.dim or 0, total):
            import warnings

            warnings.warn(LdotWarning(
                f"index {self.name!r}: IVF-PQ needs at least {ann.pq_min_training(self.dim or 0, total):,} vectors "
                f"to train its codebooks and this index has {total:,}: searched exactly until it has (the ivfpq "
                "choice is kept)"), stacklevel=2)
            want = ann.EXACT
        removed = [r[0] for r in self.db.execute("SELECT id FROM removed")]
        action = None
        if not rebuild and current == want:
            try:
                action = self._update_exact(removed) if want == ann.EXACT else self._update_parts(want, removed)
            except (IndexStoreError, FileNotFoundError, _Damaged):
                action = None  # damaged or missing: rebuilt from SQLite below
        if action is None:
            action = self._rebuild(want, total, removed)
        self._collect_index_files()
        return action

    def _max_vector_id(self) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'vectors'").fetchone()
        return int(row[0]) if row else 0

    def _update_exact(self, removed: list[int]) -> str | None:
        """Add newer vectors to the exact index file; None when it must be rebuilt (it cannot drop vectors)."""
        from models.core import ann

        if removed:
            return None
        loaded = self.read_faiss(mmap=False)
        if loaded is None:
            return None
        index, max_id = loaded
        ids, vectors = self.vectors(min_id=max_id)
        ann.add(index, ids, vectors)
        record = self._write_index_file(index, FAISS_FILE, 0)
        self._commit_index(ann.EXACT, [record], None, removed)
        return f"added {len(ids)}, removed 0"

    def _update_parts(self, kind: str, removed: list[int]) -> str | None:
        """Drop removed vectors from the parts that held them and add newer ones to the last part (new parts,
        cloned from the trained empty index, past `part_rows`); only those parts are rewritten."""
        from models.core import ann

        meta = self.meta()
        parts = self._parts(meta)
        if not parts:
            return None
        max_id = self._number("faiss_max_id", meta.get("faiss_max_id", "0"))
        generation = self._number("faiss_generation", meta.get("faiss_generation", "0")) + 1
        trained_record = self._trained_record(meta)
        changed: dict[int, Any] = {}
        loaded: dict[str, Any] = {}
        repaired = 0

        def trained() -> Any:
            nonlocal trained_record
            if "trained" not in loaded:
                loaded["trained"], trained_record = self._trained(trained_record, parts[0], generation)
            return loaded["trained"]

        def part(j: int) -> Any:
            if j not in changed:
                changed[j] = self._load_index_file(parts[j], mmap=False, trained=trained)
            return changed[j]

        if trained_record is not None:
            self._check_file(trained_record)  # damaged: every part's quantizer is lost, rebuilt whole
        for j, record in enumerate(parts):  # a stat each; a part re-hashed only when its stamp changed
            try:
                self._check_file(record)
                if record.get("stamp") is None:
                    part(j)  # the one file of an index written before parts: rewritten as a part
                continue
            except (FileNotFoundError, _Damaged):
                if trained_record is None:
                    return None  # written before parts existed: rebuilt whole
            # damaged or gone: rebuilt alone from its id range in SQLite, into a clone of the trained index
            stop = parts[j + 1]["first_id"] if j + 1 < len(parts) else max_id + 1
            changed[j] = ann.clone(trained())
            for ids, vectors in self.iter_vectors(start=record["first_id"], stop=min(stop, max_id + 1)):
                ann.add(changed[j], ids, vectors)
            repaired += 1
        gone = np.asarray(sorted(i for i in removed if i <= max_id), dtype=np.int64)  # newer ones never got in
        dropped = 0
        if len(gone):
            starts = np.asarray([p["first_id"] for p in parts], dtype=np.int64)
            slots = np.maximum(np.searchsorted(starts, gone, side="right") - 1, 0)
            for j in np.unique(slots).tolist():
                index = part(j)
                before = index.ntotal
                ann.remove(index, gone[slots == j])
                dropped += before - index.ntotal
        rescored = ""
        if kind == ann.PQ:
            try:
                self._check_rescore(self.meta())
            except (FileNotFoundError, _Damaged) as exc:
                self._rewrite_rescore()  # every vector SQLite holds, the ones added below included
                rescored = "recorded" if isinstance(exc, _Unrecorded) else "damaged"
        ids, vectors = self.vectors(min_id=max_id)
        if kind == ann.PQ and len(ids):
            rows = int(self.get_meta("rescore_rows", "0"))
            fresh = ids > self._last_rescore_id(rows)  # rows appended by a run that died before its commit stay
            if fresh.any():
                record = self._rescore_record(self.meta()) or {"segments": []}
                new_rows, data_sha, ids_sha = ann.write_rescore_vectors(
                    self.dir / ann.RESCORE_FILE, self.dir / ann.RESCORE_IDS, [(ids[fresh], vectors[fresh])], rows)
                segments = [g for g in record["segments"] if g["start"] + g["rows"] <= rows]
                self._record_rescore(new_rows, [*segments, {"start": rows, "rows": new_rows - rows,
                                                            "data": data_sha, "ids": ids_sha}])
        limit, pos = self.part_rows(kind), 0
        while pos < len(ids):
            last = len(parts) - 1
            rows_now = changed[last].ntotal if last in changed else parts[last]["rows"]
            if rows_now >= limit:
                parts.append({"file": None, "first_id": int(ids[pos]), "rows": 0})
                changed[len(parts) - 1] = ann.clone(trained())
                continue
            take = min(len(ids) - pos, limit - rows_now)
            ann.add(part(last), ids[pos:pos + take], vectors[pos:pos + take])
            pos += take
        for j, index in sorted(changed.items()):
            parts[j] = self._write_index_file(index, f"{PART_PREFIX}{generation:06d}-{j:05d}.faiss",
                                              parts[j]["first_id"])
        kept = [p for j, p in enumerate(parts) if p["rows"] or j == len(parts) - 1]  # empty parts go
        self._commit_index(kind, kept, trained_record, removed, generation if changed else None)
        return (f"added {len(ids)}, removed {dropped}" + (f", repaired {repaired} damaged part(s)" if repaired else "")
                + (", re-scoring vectors rebuilt from the index database (they were damaged)"
                   if rescored == "damaged" else "")
                + (", re-scoring vectors of an older ldot rewritten from the index database and recorded"
                   if rescored == "recorded" else "")
                + (f" ({len(changed)} of {len(kept)} parts rewritten)" if len(kept) > 1 else ""))

    # -- the fp16 re-scoring files of IVF-PQ ----------------------------------------------------
    def _rescore_record(self, meta: dict[str, str]) -> dict[str, Any] | None:
        """The recorded rows, segments (start, rows, sha256 of the data and ids bytes) and stamps of the
        re-scoring files; None when there is none (or it is not one)."""
        try:
            record = json.loads(meta.get("rescore_record") or "null")
            if record is None:
                return None
            rows, segments = int(record["rows"]), record["segments"]
            start = 0
            for g in segments:
                if int(g["start"]) != start or int(g["rows"]) < 0 or not isinstance(g["data"], str) \
                        or not isinstance(g["ids"], str):
                    return None
                start += int(g["rows"])
            return record if start == rows else None
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def _record_rescore(self, rows: int, segments: list[dict[str, Any]]) -> None:
        from models.core import ann

        stamps = [file_stamp(self.dir / ann.RESCORE_FILE), file_stamp(self.dir / ann.RESCORE_IDS)]
        self.set_meta({"rescore_rows": str(rows), "rescore_record": json.dumps(
            {"rows": rows, "segments": [g for g in segments if g["rows"]], "stamps": stamps}, sort_keys=True)})

    def _check_rescore(self, meta: dict[str, str]) -> int:
        """The committed rows of the re-scoring files, once they match their record: their stamps as recorded
        (a stat each), else every segment re-hashed (then remembered in .verified.json). Raises
        FileNotFoundError or `_Damaged` (no record, too short, a segment that differs)."""
        from models.core import ann

        data, ids = self.dir / ann.RESCORE_FILE, self.dir / ann.RESCORE_IDS
        rows = self._number("rescore_rows", meta.get("rescore_rows", "0"))
        dim = self._number("dim", meta.get("dim", "0"))
        record = self._rescore_record(meta)
        if not meta.get("rescore_record"):
            raise _Unrecorded(data)  # written by an ldot that recorded none: rewritten once from SQLite
        if record is None or record["rows"] != rows:
            raise _Damaged(data)
        stamps = [file_stamp(data), file_stamp(ids)]
        if stamps == record["stamps"]:
            return rows
        if stamps[0][0] < rows * dim * 2 or stamps[1][0] < rows * 8:
            raise _Damaged(data if stamps[0][0] < rows * dim * 2 else ids)
        token = hashlib.sha256(json.dumps(record["segments"], sort_keys=True).encode()).hexdigest()
        if self._verified().get(ann.RESCORE_FILE) == {"stamp": stamps, "sha256": token}:
            return rows
        for g in record["segments"]:
            start, stop = g["start"], g["start"] + g["rows"]
            if sha256_range(data, start * dim * 2, stop * dim * 2) != g["data"]:
                raise _Damaged(data)
            if sha256_range(ids, start * 8, stop * 8) != g["ids"]:
                raise _Damaged(ids)
        self._remember({ann.RESCORE_FILE: {"stamp": stamps, "sha256": token}})
        return rows

    def _write_rescore(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        """Write the re-scoring files anew from ``chunks`` (temp files renamed over the old: readers keep their
        mapping) and record them."""
        from models.core import ann

        data, ids_path = self.dir / f".{ann.RESCORE_FILE}.tmp", self.dir / f".{ann.RESCORE_IDS}.tmp"
        data.unlink(missing_ok=True)
        ids_path.unlink(missing_ok=True)
        rows, data_sha, ids_sha = ann.write_rescore_vectors(data, ids_path, chunks, 0)
        replace_file(data, self.dir / ann.RESCORE_FILE)
        replace_file(ids_path, self.dir / ann.RESCORE_IDS)
        self._record_rescore(rows, [{"start": 0, "rows": rows, "data": data_sha, "ids": ids_sha}])

    def _rewrite_rescore(self) -> None:
        """Damaged or unrecorded re-scoring files: rewritten from every vector in SQLite."""
        self._write_rescore(self.iter_vectors())

    def _last_rescore_id(self, rows: int) -> int:
        """The id of the last committed row of the fp16 re-scoring file (0 when none)."""
        from models.core import ann

        if rows <= 0:
            return 0
        with open(self.dir / ann.RESCORE_IDS, "rb") as handle:
            handle.seek((rows - 1) * 8)
            data = handle.read(8)
        return int(np.frombuffer(data, dtype="<i8")[0]) if len(data) == 8 else 0

    def _trained(self, record: dict[str, Any] | None, first_part: dict[str, Any],
                 generation: int) -> tuple[Any, dict[str, Any]]:
        """The trained empty index all parts are cloned from (an index written before parts existed: made from
        its one part, emptied, and written beside it)."""
        if record is not None:
            return self._load_index_file(record, mmap=False), record
        trained = self._load_index_file(first_part, mmap=False)  # one file with its own quantizer
        trained.reset()
        return trained, self._write_index_file(trained, f"{TRAINED_PREFIX}{generation:06d}.faiss", 0)

    def _rebuild(self, kind: str, total: int, removed: list[int]) -> str:
        from models.core import ann

        if kind == ann.EXACT:
            ids, vectors = self.vectors()
            record = self._write_index_file(ann.build(ids, vectors, ann.EXACT), FAISS_FILE, 0)
            self._commit_index(kind, [record], None, removed, extra={
                "faiss_factory": ann.factory_string(kind, total, self.dim or 0), "recall_at_10": "", "nprobe": ""})
            return f"built {kind} index of {len(ids)} vectors"
        generation = self._number("faiss_generation", self.get_meta("faiss_generation", "0")) + 1
        parts, trained_record, nprobe, recall = self._build_parts(kind, total, generation)
        self._commit_index(kind, parts, trained_record, removed, generation, extra={
            "faiss_factory": ann.factory_string(kind, total, self.dim or 0),
            "recall_at_10": "" if recall is None else f"{recall:.4f}", "nprobe": "" if nprobe is None else str(nprobe)})
        return f"built {kind} index of {sum(p['rows'] for p in parts)} vectors" + (
            f" in {len(parts)} parts" if len(parts) > 1 else "")

    # -- large indexes: streamed from SQLite, never all in RAM -----------------------------------
    def iter_vectors(self, chunk: int = 50_000, start: int = 0,
                     stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All vectors (with ``start`` <= id < ``stop``) in id order, ``chunk`` rows at a time."""
        last = start - 1
        stop = (1 << 62) if stop is None else stop
        while True:
            ids, vectors = self._vector_rows("SELECT id, vector FROM vectors WHERE id > ? AND id < ? ORDER BY id "
                                             "LIMIT ?", (last, stop, chunk))
            if not len(ids):
                return
            yield ids, vectors
            last = int(ids[-1])

    def sample_vectors(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """About ``count`` vectors spread evenly over the ids (k-means training, recall queries)."""
        total = self.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
        step = max(1, total // max(1, count))
        return self._vector_rows("SELECT id, vector FROM vectors WHERE id % ? = 0 ORDER BY id LIMIT ?", (step, count))

    def _vector_rows(self, sql: str, args: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
        rows = self.db.execute(sql, args).fetchall()
        dim = self.dim or 0
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        out = np.empty((len(rows), dim), dtype=np.float32)
        for i, (_, blob) in enumerate(rows):
            out[i] = np.frombuffer(blob, dtype="<f4")
        return ids, out

    def _recall_queries(self) -> np.ndarray:
        from models.core import ann

        return self.sample_vectors(ann.RECALL_QUERIES)[1]

    def _build_parts(self, kind: str, total: int, generation: int) -> tuple[list[dict[str, Any]], dict[str, Any],
                                                                            int | None, float | None]:
        """Train one empty IVF or OPQ + IVF-PQ index on a spread sample, then stream every vector from SQLite
        into clones of it, `part_rows` a part, each part written when full (one part in RAM at a time). IVF-PQ
        also writes the fp16 re-scoring file beside them (renamed over the old: readers keep their mapping).
        nprobe is then tuned once over all the parts together."""
        from models.core import ann

        dim = self.dim or 0
        size = ann.pq_training_size(total) if kind == ann.PQ else 64 * ann.ivf_cells(total)
        sample = self.sample_vectors(size)[1]
        if kind == ann.PQ and len(sample) < ann.pq_min_training(dim, total):  # ids with gaps: the first ones
            sample = self._vector_rows("SELECT id, vector FROM vectors ORDER BY id LIMIT ?", (size,))[1]
        trained = ann.train_empty(kind, dim, total, sample)
        trained_record = self._write_index_file(trained, f"{TRAINED_PREFIX}{generation:06d}.faiss", 0)
        limit = self.part_rows(kind)
        parts: list[dict[str, Any]] = []
        state: dict[str, Any] = {"index": ann.clone(trained), "first": 0}

        def flush() -> None:
            name = f"{PART_PREFIX}{generation:06d}-{len(parts):05d}.faiss"
            parts.append(self._write_index_file(state["index"], name, state["first"]))

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for ids, vectors in self.iter_vectors():
                pos = 0
                while pos < len(ids):
                    if state["index"].ntotal >= limit:
                        flush()
                        state["index"], state["first"] = ann.clone(trained), int(ids[pos])
                    take = min(len(ids) - pos, limit - state["index"].ntotal)
                    ann.add(state["index"], ids[pos:pos + take], vectors[pos:pos + take])
                    pos += take
                yield ids, vectors

        if kind == ann.PQ:
            self._write_rescore(chunks())
        else:
            for _ in chunks():
                pass
        flush()
        del state["index"]
        if not total:
            return parts, trained_record, None, None
        index = self._open_parts(kind, parts, trained_record, mmap=True, meta=self.meta())
        nprobe, recall = ann.tune_nprobe(index, self.iter_vectors, self._recall_queries())
        return parts, trained_record, nprobe, recall

    # -- the vector index files ------------------------------------------------------------------
    @property
    def faiss_path(self) -> Path:
        """The exact tier's one file (an index written before parts existed also kept every tier here)."""
        return self.dir / FAISS_FILE

    def part_rows(self, kind: str) -> int:
        """Most vectors in one part of an approximate index (meta ``part_rows``, else `ann.part_rows`)."""
        from models.core import ann

        value = self.get_meta("part_rows")
        return max(1, self._number("part_rows", value)) if value else ann.part_rows(kind, self.dim or 0)

    def faiss_parts(self) -> list[dict[str, Any]]:
        """The recorded files of the vector index: (file, first_id, rows, sha256, stamp) each; [] when none."""
        return self._parts(self.meta())

    def faiss_files(self) -> list[Path]:
        """Every file of the vector index (parts, the trained empty index, the fp16 re-scoring files)."""
        from models.core import ann

        meta = self.meta()
        names = [p["file"] for p in self._parts(meta)]
        if self._trained_record(meta):
            names.append(self._trained_record(meta)["file"])
        if meta.get("faiss_kind") == ann.PQ:
            names += [ann.RESCORE_FILE, ann.RESCORE_IDS]
        return [self.dir / n for n in names if (self.dir / n).is_file()]

    def _parts(self, meta: dict[str, str]) -> list[dict[str, Any]]:
        text = meta.get("faiss_parts")
        if text is None:
            if meta.get("faiss_sha256") is None:
                return []
            # written before parts existed: one file, hashed whenever it is opened until it is next rewritten
            return [{"file": FAISS_FILE, "first_id": 0, "sha256": meta["faiss_sha256"], "stamp": None,
                     "rows": self._number("faiss_rows", meta.get("faiss_rows", "-1"))}]
        try:
            parts = json.loads(text)
            for p in parts:
                if Path(p["file"]).name != p["file"] or not isinstance(p["rows"], int) or not isinstance(p["first_id"], int):
                    raise ValueError(p)
        except (ValueError, TypeError, KeyError):
            raise IndexStoreError(f"the vector file list of index {self.name!r} is damaged") from None
        return parts

    def _trained_record(self, meta: dict[str, str]) -> dict[str, Any] | None:
        try:
            record = json.loads(meta["faiss_trained"]) if meta.get("faiss_trained") else None
            if record is not None and Path(record["file"]).name != record["file"]:
                raise ValueError(record)
            return record
        except (ValueError, TypeError, KeyError):
            raise IndexStoreError(f"the vector file list of index {self.name!r} is damaged") from None

    def _write_index_file(self, index: Any, name: str, first_id: int) -> dict[str, Any]:
        """Write one FAISS file atomically (temp, fsync, rename); its record: name, first id, rows, sha256, and
        the (size, mtime_ns, inode, device) stamp its hash holds for."""
        from models.core import ann

        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        try:
            ann.write(index, str(tmp), without_quantizer=name.startswith(PART_PREFIX))  # parts share the trained one
            digest = sha256_file(tmp)
            replace_file(tmp, self.dir / name)
        finally:
            tmp.unlink(missing_ok=True)
        return {"file": name, "first_id": int(first_id), "rows": int(index.ntotal), "sha256": digest,
                "stamp": file_stamp(self.dir / name)}

    def _commit_index(self, kind: str, parts: list[dict[str, Any]], trained: dict[str, Any] | None,
                      removed: list[int], generation: int | None = None, extra: dict[str, str] | None = None) -> None:
        """Record the new set of files in one SQLite transaction (until it commits, readers and a crash see the
        old set, whose files are still there), and forget the removed ids it no longer holds."""
        from models.core import ann

        listing = json.dumps(parts, sort_keys=True)
        rescore = (self.get_meta("rescore_record") or "") if kind == ann.PQ else ""  # new rows: searchers reload
        token = hashlib.sha256((listing + json.dumps(trained, sort_keys=True) + rescore).encode()).hexdigest()
        values: dict[str, Any] = {
            "faiss_parts": listing, "faiss_trained": json.dumps(trained) if trained else "",
            "faiss_rows": str(sum(p["rows"] for p in parts)), "faiss_max_id": str(self._max_vector_id()),
            "faiss_kind": kind, "faiss_written": str(time.time()), **(extra or {})}
        if generation is not None:
            values["faiss_generation"] = str(generation)
        own = not self.db.in_transaction
        if own:
            self.db.execute("BEGIN IMMEDIATE")
        try:
            values["faiss_sha256"] = token  # what searchers compare to know they must reload
            self.set_meta(values)
            self.db.executemany("DELETE FROM removed WHERE id = ?", [(i,) for i in removed])
        except BaseException:
            if own and self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        if own:
            self.db.execute("COMMIT")

    def _collect_index_files(self) -> None:
        """Delete vector index files the committed set no longer names (replaced parts, a crash's leftovers)."""
        meta = self.meta()
        from models.core import ann

        keep = {p["file"] for p in self._parts(meta)}
        if self._trained_record(meta):
            keep.add(self._trained_record(meta)["file"])
        if meta.get("faiss_kind") == ann.PQ:
            keep.add(ann.RESCORE_FILE)  # its verified stamp (the file itself is not a FAISS file)
        for path in self.dir.iterdir():
            name = path.name
            if name in keep:
                continue
            if name.startswith((PART_PREFIX, TRAINED_PREFIX)) and name.endswith(".faiss") or name == FAISS_FILE:
                path.unlink(missing_ok=True)
        verified = self._verified()
        if set(verified) - keep:
            self._remember({k: v for k, v in verified.items() if k in keep}, replace=True)

    # -- verifying without re-hashing ------------------------------------------------------------
    def _verified(self) -> dict[str, Any]:
        try:
            data = json.loads((self.dir / VERIFIED_FILE).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _remember(self, entries: dict[str, Any], replace: bool = False) -> None:
        seen = {} if replace else self._verified()
        seen.update(entries)
        try:
            atomic_write_json(self.dir / VERIFIED_FILE, seen)
        except OSError:
            pass  # a read-only index: only saves hashing next time

    def _check_file(self, record: dict[str, Any]) -> Path:
        """A recorded file, verified: its sha256 is re-computed only when its (size, mtime, inode, device)
        stamp differs from the one recorded when it was written or last matched. Raises FileNotFoundError
        or `_Damaged`."""
        path = self.dir / record["file"]
        stamp = file_stamp(path)
        if stamp == record.get("stamp"):
            return path
        if record.get("stamp") and stamp[0] != record["stamp"][0]:
            raise _Damaged(path)
        known = self._verified().get(record["file"])
        if known == {"stamp": stamp, "sha256": record["sha256"]}:
            return path
        if sha256_file(path) != record["sha256"]:
            raise _Damaged(path)
        self._remember({record["file"]: {"stamp": stamp, "sha256": record["sha256"]}})
        return path

    def _load_index_file(self, record: dict[str, Any], mmap: bool, trained: Any = None) -> Any:
        """A verified FAISS file; a part is given the coarse quantizer of ``trained()`` (it is stored without)."""
        import faiss

        from models.core import ann

        path = self._check_file(record)
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError:
            raise _Damaged(path) from None
        if index.ntotal != record["rows"]:
            raise _Damaged(path)
        if record["file"].startswith(PART_PREFIX):
            if trained is None:
                raise _Damaged(path)  # a part needs the trained index's quantizer
            ann.attach_quantizer(index, trained())
        return index

    def _open_parts(self, kind: str, parts: list[dict[str, Any]], trained_record: dict[str, Any] | None, mmap: bool,
                    meta: dict[str, str]) -> Any:
        """The parts as one index (`ann.shards`: they share the trained index's coarse quantizer), with the tuned
        nprobe; IVF-PQ wrapped for exact re-scoring."""
        from models.core import ann

        cache: list[Any] = []

        def trained() -> Any:
            if not cache:
                if trained_record is None:
                    raise _Damaged(self.dir)
                cache.append(self._load_index_file(trained_record, mmap=False))
            return cache[0]

        loaded = [self._load_index_file(p, mmap, trained) for p in parts]
        index = ann.shards([p for p in loaded if p.ntotal] or loaded[:1])
        if meta.get("nprobe"):
            ann.set_nprobe(index, self._number("nprobe", meta["nprobe"]))
        if kind == ann.PQ:
            rows = self._check_rescore(meta)
            try:
                index = ann.open_rescored(index, self.dir, rows, self._number("dim", meta.get("dim", "0")))
            except ValueError:  # shorter than its rows (changed after the check)
                raise _Damaged(self.dir / ann.RESCORE_FILE) from None
        return index

    def read_faiss(self, attempts: int = 3, mmap: bool = True) -> tuple[Any, int] | None:
        """The verified vector index (its parts searched together) and the newest vector id it holds; None
        when there is none yet.

        Raises `IndexStoreError` when a file does not match its recorded checksum (damaged: the caller
        rebuilds it from SQLite). A concurrent writer replacing files is told apart by re-reading.
        """
        for attempt in range(attempts):
            meta = self.meta()
            want = meta.get("faiss_sha256")
            if want is None:
                return None
            parts = self._parts(meta)
            total = self._number("faiss_rows", meta.get("faiss_rows", "-1"))
            try:
                trained = self._trained_record(meta)
                index = self._open_parts(meta.get("faiss_kind", ""), parts, trained, mmap, meta)
                if index.ntotal != total:
                    raise _Damaged(self.dir)
                return index, self._number("faiss_max_id", meta.get("faiss_max_id", "0"))
            except _Unrecorded:
                raise IndexUnrecorded(f"the re-scoring vectors of index {self.name!r} were written by an older "
                                      "ldot that recorded no checksum") from None
            except (FileNotFoundError, _Damaged):
                pass
            if self.get_meta("faiss_sha256") == want:  # nobody rewrote it meanwhile: damaged
                break
            time.sleep(0.05 * (attempt + 1))
        raise IndexStoreError(f"the vector file of index {self.name!r} is damaged or truncated")


class _Damaged(Exception):
    """A vector index file that does not match its record (read_faiss turns it into `IndexStoreError`)."""


class _Unrecorded(_Damaged):
    """IVF-PQ re-scoring files written by an ldot that recorded no checksum for them (not damage: an upgrade)."""
