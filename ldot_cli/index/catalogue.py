"""An index's catalogue: the SQLite database that is its source of truth (meta, files seen, vectors).

Readers and the one writer may use it at the same time (WAL mode). Its vector files are a cache of it
(`vectorfiles`); the interface they use is `VectorSource`.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from ldot_cli.index.hits import display_path
from ldot_cli.index.layout import DB_FILE, IndexStoreError, damaged_index
from ldot_cli.index.meta import FORMAT_VERSION, IndexMeta, RescoreRecord, VectorFileSet, newer_format
from models.core.errors import as_storage_error

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

FILE_COLUMNS = ("path", "root", "size", "mtime_ns", "content_hash", "status", "reason", "retry", "vector_id")
_FILES = f"SELECT {', '.join(FILE_COLUMNS)} FROM files"


@dataclass(frozen=True)
class FileRow:
    path: bytes
    root: bytes
    size: int
    mtime_ns: int
    content_hash: str | None
    status: str  # indexed | skipped
    reason: str | None
    retry: int
    vector_id: int | None

    @property
    def display(self) -> str:
        return display_path(self.path)


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


class _Connection(sqlite3.Connection):
    """A connection whose "database is damaged" errors name the file and the way to rebuild it."""

    index_dir: Path

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        try:
            return super().execute(*args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if _is_damage(exc):
                raise damaged_index(self.index_dir, exc) from None
            raise

    def executemany(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        try:
            return super().executemany(*args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if _is_damage(exc):
                raise damaged_index(self.index_dir, exc) from None
            raise


class Catalogue:
    """Open (or create) an index's database; its meta is checked once, here (`IndexMeta.from_rows`)."""

    def __init__(self, directory: Path, create: bool = False) -> None:
        self.dir = directory
        self.name = directory.name
        if not (directory / DB_FILE).is_file():
            if not create:
                command = f"`ldot index FOLDER --name {self.name}`" if self.name != "default" else "`ldot index FOLDER`"
                raise IndexStoreError(f"no index named {self.name!r} (looked in {directory}): create it with {command}")
            directory.mkdir(parents=True, exist_ok=True)
        self.db = self._connect()
        self.meta = self._open_meta(create)

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

    def _open_meta(self, create: bool) -> IndexMeta:
        rows = self.meta_rows()
        if not rows.get("format_version"):
            if not create:
                raise IndexStoreError(f"index {self.name!r} was never completed: run `ldot index FOLDER --name {self.name}`")
            self._write_rows(IndexMeta.rows(self.dir, format_version=FORMAT_VERSION, created=time.time()))
            rows = self.meta_rows()
        meta = IndexMeta.from_rows(rows, self.dir)
        if meta.format_version > FORMAT_VERSION:
            raise newer_format(self.name, meta.format_version)
        return meta

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of work (BEGIN IMMEDIATE: writers queue, readers carry on under WAL); nested in an
        open one, part of it."""
        if self.db.in_transaction:
            yield self.db
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            if self.db.in_transaction:  # SQLite may have rolled back already (e.g. on a full disk)
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- meta ------------------------------------------------------------------------------------
    def meta_rows(self) -> dict[str, str]:
        """The meta as stored (key -> text): what `IndexMeta` reads; for diagnostics."""
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def _write_rows(self, rows: dict[str, str], db: sqlite3.Connection | None = None) -> None:
        (db or self.db).executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(rows.items()))

    def reload_meta(self) -> IndexMeta:
        """The meta as it is now (another process may have written it since this one opened)."""
        self.meta = IndexMeta.from_rows(self.meta_rows(), self.dir)
        return self.meta

    def update_meta(self, db: sqlite3.Connection | None = None, **values: Any) -> None:
        """Record fields of `IndexMeta` (each checked), inside ``db``'s transaction when given."""
        self._write_rows(IndexMeta.rows(self.dir, **values), db)  # checked (raises before anything is written)
        self.meta = dataclasses.replace(self.meta, **values)

    @property
    def dim(self) -> int | None:
        if self.meta.dim is None:
            self.reload_meta()  # a writer may have stored the first vector since
        return self.meta.dim

    def vector_file_set(self) -> VectorFileSet:
        """The committed set of vector files, read now."""
        return VectorFileSet.from_rows(self.meta_rows())

    def vector_token(self) -> str | None:
        """What changes with every committed set of vector files (one row read: searchers poll it)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'faiss_sha256'").fetchone()
        return row[0] if row else None

    def commit_vector_files(self, files: VectorFileSet, removed: Sequence[int]) -> None:
        """Record a new set of vector files and forget the removed ids it no longer holds, in one transaction:
        until it commits, readers and a crash see the old set, whose files are still there."""
        with self.transaction() as db:
            self._write_rows(files.to_rows(), db)
            db.executemany("DELETE FROM removed WHERE id = ?", [(i,) for i in removed])

    def record_rescore(self, record: RescoreRecord) -> None:
        self._write_rows(record.to_rows())

    # -- files -----------------------------------------------------------------------------------
    def files_under(self, root: bytes) -> dict[bytes, FileRow]:
        return {r[0]: FileRow(*r) for r in self.db.execute(f"{_FILES} WHERE root = ?", (root,))}

    def file_rows(self, status: str | None = None) -> list[FileRow]:
        rows = self.db.execute(_FILES + (" WHERE status = ?" if status else "") + " ORDER BY path",
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

    def paths_for_vectors(self, ids: Sequence[int]) -> dict[int, list[bytes]]:
        out: dict[int, list[bytes]] = {}
        for chunk in _chunks(ids):
            for vid, path in self.db.execute(f"SELECT vector_id, path FROM files WHERE status = 'indexed' AND "
                                             f"vector_id IN ({','.join('?' * len(chunk))}) ORDER BY path", chunk):
                out.setdefault(vid, []).append(path)
        return out

    def indexed_files(self, vector_id: int) -> list[FileRow]:
        """The indexed file rows of one vector (the files holding its content when they were indexed)."""
        rows = self.db.execute(f"{_FILES} WHERE status = 'indexed' AND vector_id = ? ORDER BY path", (int(vector_id),))
        return [FileRow(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        counts = dict(self.db.execute("SELECT status, COUNT(*) FROM files GROUP BY status"))
        counts["vectors"] = self.vector_count()
        return counts

    def roots(self) -> list[tuple[bytes, dict[str, int]]]:
        """Every folder the index covers, with its file counts by status."""
        out: dict[bytes, dict[str, int]] = {}
        for root, status, count in self.db.execute("SELECT root, status, COUNT(*) FROM files GROUP BY root, status "
                                                   "ORDER BY root"):
            out.setdefault(root, {})[status] = count
        return list(out.items())

    # -- vectors ---------------------------------------------------------------------------------
    def add_vector(self, db: sqlite3.Connection, content_hash: str, vector: np.ndarray, num_boxes: int) -> int:
        blob = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        cur = db.execute("INSERT INTO vectors (content_hash, vector, num_boxes, created) VALUES (?, ?, ?, ?)",
                         (content_hash, blob, num_boxes, time.time()))
        return int(cur.lastrowid or 0)

    def vector_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])

    def max_vector_id(self) -> int:
        """The newest vector id ever given (ids are never reused, so also of vectors deleted since)."""
        row = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'vectors'").fetchone()
        return int(row[0]) if row else 0

    def vector_for_hash(self, content_hash: str) -> int | None:
        row = self.db.execute("SELECT id FROM vectors WHERE content_hash = ?", (content_hash,)).fetchone()
        return row[0] if row else None

    def content_hashes(self, ids: Sequence[int]) -> dict[int, str]:
        """Vector id -> the content hash its region record is stored under."""
        out: dict[int, str] = {}
        for chunk in _chunks(ids):
            out.update(self.db.execute(f"SELECT id, content_hash FROM vectors WHERE id IN "
                                       f"({','.join('?' * len(chunk))})", chunk))
        return out

    def content_hash_set(self) -> set[str]:
        """The content hash of every vector (the keys its region store may hold)."""
        return {row[0] for row in self.db.execute("SELECT content_hash FROM vectors")}

    def orphan_vectors(self) -> list[tuple[int, str]]:
        """Vectors no indexed file points to any more (removed or changed files)."""
        return self.db.execute("SELECT id, content_hash FROM vectors WHERE id NOT IN "
                               "(SELECT vector_id FROM files WHERE vector_id IS NOT NULL)").fetchall()

    def delete_vectors(self, db: sqlite3.Connection, ids: Sequence[int]) -> None:
        """Drop vectors; their ids are remembered until the vector files no longer hold them."""
        db.executemany("DELETE FROM vectors WHERE id = ?", [(i,) for i in ids])
        db.executemany("INSERT OR IGNORE INTO removed (id) VALUES (?)", [(i,) for i in ids])

    def removed_ids(self) -> list[int]:
        """Ids deleted since the vector files were last committed."""
        return [r[0] for r in self.db.execute("SELECT id FROM removed")]

    def vectors(self, min_id: int = 0, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,) int64, vectors (n, dim) float32) with id > min_id (or the given ids)."""
        if ids is None:
            return self._vector_rows("SELECT id, vector FROM vectors WHERE id > ? ORDER BY id", (min_id,))
        rows: list[tuple[int, bytes]] = []
        for chunk in _chunks(list(ids)):
            rows += self.db.execute(f"SELECT id, vector FROM vectors WHERE id IN ({','.join('?' * len(chunk))})",
                                    chunk).fetchall()
        return self._decode(rows)

    def iter_vectors(self, chunk: int = 50_000, start: int = 0,
                     stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All vectors (with ``start`` <= id < ``stop``) in id order, ``chunk`` rows at a time: never all in RAM."""
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
        step = max(1, self.vector_count() // max(1, count))
        return self._vector_rows("SELECT id, vector FROM vectors WHERE id % ? = 0 ORDER BY id LIMIT ?", (step, count))

    def first_vectors(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        return self._vector_rows("SELECT id, vector FROM vectors ORDER BY id LIMIT ?", (count,))

    def _vector_rows(self, sql: str, args: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
        return self._decode(self.db.execute(sql, args).fetchall())

    def _decode(self, rows: Sequence[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        dim = self.dim or 0
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        out = np.empty((len(rows), dim), dtype=np.float32)
        for i, (_, blob) in enumerate(rows):
            out[i] = np.frombuffer(blob, dtype="<f4")
        return ids, out


def _chunks(ids: Sequence[int], size: int = 500) -> Iterator[list[int]]:
    """Ids in groups small enough for one SQL ``IN (...)``."""
    for start in range(0, len(ids), size):
        yield [int(i) for i in ids[start:start + size]]
