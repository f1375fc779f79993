"""One named search index on disk: SQLite is the source of truth, FAISS a checksummed cache of it.

Layout of ``<home>/indexes/<name>/``::

    index.sqlite        WAL-mode SQLite: meta, every file seen (path, size, mtime, content hash, status,
                        skip reason, vector id, time) and every vector (float32 blob, keyed by content hash)
    vectors.faiss       FAISS inner-product index over the vectors, ids = vector ids. Written to a temp
                        file, fsynced, renamed into place; its sha256 and row count are recorded in SQLite
                        and checked before FAISS reads it (a damaged file is rebuilt from SQLite).
    regions/            region features for re-ranking (UNITER image-DB layout, keyed by content hash)
    .lock               held by the one process updating the index

Crash safety: each batch (vectors + file rows) is one SQLite transaction, so kill -9 loses at most the
batch in flight. Vector ids come from AUTOINCREMENT and are never reused: vectors newer than the FAISS
file (``id > faiss_max_id``) are searched by brute force until the next flush, so searches stay
complete and correct while an index is being updated or after a crash.
"""

from __future__ import annotations

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
from models.core.fileio import atomic_write_json, replace_file, sha256_file
from models.core.home import indexes_dir

FORMAT_VERSION = 1
DB_FILE = "index.sqlite"
FAISS_FILE = "vectors.faiss"
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
        """Bring the FAISS file up to date with SQLite: add newer vectors, drop removed ones.

        Rebuilds from SQLite when asked, when the file is missing or damaged, or when the index kind
        changes (``kind`` None: `ann.choose_kind`: exact up to `ANN_THRESHOLD` vectors, approximate
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
        loaded = None
        if not rebuild and current == want:
            try:
                loaded = self.read_faiss(mmap=False)
            except IndexStoreError:
                loaded = None
        removed = [r[0] for r in self.db.execute("SELECT id FROM removed")]
        if loaded is not None and not ann.remove(loaded[0], np.asarray(removed, dtype=np.int64)):
            loaded = None  # this kind cannot drop vectors: rebuild from SQLite
        recall = nprobe = None
        if loaded is None and want == ann.PQ:
            index, nprobe, recall = self._build_pq(total)
            action = f"built {want} index of {index.ntotal} vectors"
        elif loaded is None:
            ids, vectors = self.vectors()
            index = ann.build(ids, vectors, want)
            if want != ann.EXACT and len(ids):
                nprobe, recall = ann.tune_nprobe(index, lambda: iter([(ids, vectors)]), self._recall_queries())
            action = f"built {want} index of {len(ids)} vectors"
        else:
            index, max_id = loaded
            ids, vectors = self.vectors(min_id=max_id)
            if want == ann.PQ and len(ids):
                rows = ann.write_rescore_vectors(self.dir / ann.RESCORE_FILE, self.dir / ann.RESCORE_IDS,
                                                 [(ids, vectors)], int(self.get_meta("rescore_rows", "0")))
                self.set_meta({"rescore_rows": str(rows)})
            ann.add(index, ids, vectors)
            action = f"added {len(ids)}, removed {len(removed)}"
        max_id = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'vectors'").fetchone()
        self.write_faiss(index, int(max_id[0]) if max_id else 0, want)
        if loaded is None:
            self.set_meta({"faiss_factory": ann.factory_string(want, total, self.dim or 0),
                           "recall_at_10": "" if recall is None else f"{recall:.4f}",
                           "nprobe": "" if nprobe is None else str(nprobe)})
        if removed:
            self.db.executemany("DELETE FROM removed WHERE id = ?", [(i,) for i in removed])
        return action

    # -- large indexes: streamed from SQLite, never all in RAM -----------------------------------
    def iter_vectors(self, chunk: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All vectors in id order, ``chunk`` rows at a time."""
        last = 0
        while True:
            ids, vectors = self._vector_rows("SELECT id, vector FROM vectors WHERE id > ? ORDER BY id LIMIT ?",
                                             (last, chunk))
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

    def _build_pq(self, total: int) -> tuple[Any, int | None, float | None]:
        """Train OPQ + IVF-PQ on a spread sample, add every vector in chunks, write the fp16 re-scoring
        file beside it (new files renamed over the old: readers keep their mapping)."""
        from models.core import ann

        dim = self.dim or 0
        index = ann.build_pq(dim, total, self.sample_vectors(ann.pq_training_size(total))[1])
        data, ids_path = self.dir / f".{ann.RESCORE_FILE}.tmp", self.dir / f".{ann.RESCORE_IDS}.tmp"
        data.unlink(missing_ok=True)
        ids_path.unlink(missing_ok=True)

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for ids, vectors in self.iter_vectors():
                ann.add(index, ids, vectors)
                yield ids, vectors

        rows = ann.write_rescore_vectors(data, ids_path, chunks(), 0)
        replace_file(data, self.dir / ann.RESCORE_FILE)
        replace_file(ids_path, self.dir / ann.RESCORE_IDS)
        self.set_meta({"rescore_rows": str(rows)})
        wrapped = ann.open_rescored(index, self.dir, rows, dim)
        if not rows:
            return wrapped, None, None
        nprobe, recall = ann.tune_nprobe(wrapped, self.iter_vectors, self._recall_queries())
        return wrapped, nprobe, recall

    # -- the FAISS file --------------------------------------------------------------------------
    @property
    def faiss_path(self) -> Path:
        return self.dir / FAISS_FILE

    def write_faiss(self, index: Any, max_id: int, kind: str) -> None:
        """Atomically replace the FAISS file and record its checksum, rows and newest id in SQLite."""
        import faiss

        from models.core import ann

        tmp = self.dir / f".{FAISS_FILE}.{os.getpid()}.tmp"
        try:
            faiss.write_index(index.index if isinstance(index, ann.Rescored) else index, str(tmp))
            digest = sha256_file(tmp)
            replace_file(tmp, self.faiss_path)
        finally:
            tmp.unlink(missing_ok=True)
        self.set_meta({"faiss_sha256": digest, "faiss_rows": str(index.ntotal), "faiss_max_id": str(max_id),
                       "faiss_kind": kind, "faiss_written": str(time.time())})

    def read_faiss(self, attempts: int = 3, mmap: bool = True) -> tuple[Any, int] | None:
        """The verified FAISS index and the newest vector id it holds; None when there is none yet.

        Raises `IndexStoreError` when the file does not match its recorded checksum (damaged: the caller
        rebuilds it from SQLite). A concurrent writer replacing the file is told apart by re-reading.
        """
        import faiss

        for attempt in range(attempts):
            meta = self.meta()
            want = meta.get("faiss_sha256")
            if want is None:
                return None
            try:
                got = sha256_file(self.faiss_path)
            except FileNotFoundError:
                got = None
            if got == want:
                flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
                index = faiss.read_index(str(self.faiss_path), flags)
                if index.ntotal != self._number("faiss_rows", meta.get("faiss_rows", "-1")):
                    break
                if meta.get("faiss_kind") == "ivfpq":
                    from models.core import ann

                    index = ann.open_rescored(index, self.dir, self._number("rescore_rows", meta.get("rescore_rows", "0")),
                                              self._number("dim", meta.get("dim", "0")))
                return index, self._number("faiss_max_id", meta.get("faiss_max_id", "0"))
            if self.get_meta("faiss_sha256") == want:  # nobody rewrote it meanwhile: damaged
                break
            time.sleep(0.05 * (attempt + 1))
        raise IndexStoreError(f"the vector file of index {self.name!r} is damaged or truncated")
