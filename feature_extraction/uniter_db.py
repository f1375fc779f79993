"""The UNITER / LightningDOT image-feature DB: written and read exactly as the official tooling.

Layout of an image DB directory ``<img_dir>`` (facts from UNITER's ``scripts/convert_imgdir.py``
and ``data/data.py::DetectFeatLmdb``; LightningDOT ships the same code)::

    <img_dir>/
      feat_th0.2_max100_min10/            LMDB (data.mdb, lock.mdb): the ``uniter`` preset
      nbb_th0.2_max100_min10.json         {file name: number of boxes kept}
      feat_numbb36/                       LMDB of the ``lxmert36`` preset (UNITER's fixed-count
                                          naming, ``conf_th=-1, num_bb=36``: no nbb json needed)
      <db name>_compressed/               the same with ``compress=True`` values (see below)
      all/ , all_compressed/              UNITER's "keep all boxes" DBs (read only; nbb computed)

* Key: the image's file name as UTF-8 bytes, e.g. ``flickr30k_001000092795.npz``. The
  official converter also stores ``__keys__`` (a JSON list of all names), refreshed here on close.
* Value (``compress=False``, what LightningDOT's configs use): ``msgpack`` with the
  ``msgpack-numpy`` encoding (``use_bin_type=True``) of a dict of float16 arrays already cut to
  ``nbb`` boxes: ``features (n, 2048)``, ``norm_bb (n, 6) = x1/W, y1/H, x2/W, y2/H, w/W, h/H``,
  ``conf (n, 1)`` (the BUTD extractor's 2-D shape) and ``soft_labels (n, 1601)`` with the
  **background class FIRST** (index 0; Caffe's order, the one UNITER's MRC loss expects), while
  our detector's :class:`RegionFeatures` puts it last: the writer rolls it.
* Value (``compress=True``): ``np.savez_compressed`` bytes of the same dict. We read those with
  ``allow_pickle=False`` and decode msgpack with our own hook that refuses object arrays
  (msgpack-numpy would unpickle them): a DB from elsewhere never runs code.
* Read-time cut (as DetectFeatLmdb): ``nbb = min(max_bb, max(min_bb, sum(conf > conf_th)))``
  from the json (or computed from ``conf`` when the json lacks a name), arrays sliced ``[:nbb]``.

Additions of ours, invisible to the official reader (which only ``get``\\ s file names): two
LMDB named sub-databases in the same environment, committed in the same transaction as the
features, ``__ldot_sources__`` (key -> source file path, size, mtime: notices changed files and
never pairs a vector with the wrong file) and ``__ldot_failed__`` (source path -> why it could
not be extracted), plus the human-readable ``<db name>.failed.json`` and the writer's
``<db name>.lock``.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import msgpack
import msgpack_numpy
import numpy as np
from filelock import FileLock, Timeout

from feature_extraction.errors import DBLockedError, DetectorError, ImageDBError
from feature_extraction.types import BOX_PRESETS, BoxCut, RegionFeatures, box_preset
from models.core.errors import LdotError
from models.core.fileio import atomic_write_json

_T = TypeVar("_T")

KEYS_KEY = b"__keys__"  # official: JSON list of every file name
SOURCES_DB = b"__ldot_sources__"  # ours: key -> {path, size, mtime_ns}
FAILED_DB = b"__ldot_failed__"  # ours: source path -> {size, mtime_ns, reason, permanent}
RESERVED_KEYS = frozenset({KEYS_KEY, SOURCES_DB, FAILED_DB})
DEFAULT_MAP_SIZE: int | None = None  # None: sized from the data (`map_size_for`), grown when full
MIN_MAP_SIZE = 64 << 20  # the smallest map a writer asks for: address space, not memory or disk
_LMDB_MAGIC = 0xBEEFC0DE
_NUMERIC_KINDS = frozenset("fiub")


# ------------------------------------------------------------------------------ box cuts (feature_extraction.types)
UNITER_FEATURE_DB = BOX_PRESETS["uniter"].db_name()  # feat_th0.2_max100_min10: the UNITER/LightningDOT cut
UNITER_NBB_FILE = BOX_PRESETS["uniter"].nbb_name


def resolve_cut(cut: BoxCut | str) -> BoxCut:
    """A :class:`BoxCut` from itself or a preset name (``uniter``, ``lxmert36``)."""
    return cut if isinstance(cut, BoxCut) else box_preset(cut)


# ------------------------------------------------------------------------------ records


@dataclass
class ImageRecord:
    """One image's stored region features after the read-time cut."""

    features: np.ndarray  # (nbb, 2048) float32 (float16 if read with as_float32=False)
    norm_bb: np.ndarray  # (nbb, 6): x1/W, y1/H, x2/W, y2/H, w/W, h/H
    conf: np.ndarray  # (nbb,) max non-background class probability
    soft_labels: np.ndarray | None = None  # (nbb, 1601) class distribution, background FIRST

    @property
    def num_boxes(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class SourceStamp:
    """Which file a record was extracted from, and that file's size and mtime at the time."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FailureRecord:
    """Why a source file could not be extracted (``permanent``: retrying the unchanged file is pointless)."""

    reason: str
    size: int
    mtime_ns: int
    permanent: bool = True


def soft_labels_to_uniter(soft_labels: np.ndarray) -> np.ndarray:
    """(n, C) background LAST (our detector) -> background FIRST (UNITER DB)."""
    return np.roll(soft_labels, 1, axis=1)


def soft_labels_from_uniter(soft_labels: np.ndarray) -> np.ndarray:
    """(n, C) background FIRST (UNITER DB) -> background LAST (our detector)."""
    return np.roll(soft_labels, -1, axis=1)


def regions_to_record(regions: RegionFeatures, cut: BoxCut, with_soft_labels: bool = False) -> dict[str, np.ndarray]:
    """Detector output -> the official record: float16 arrays cut to ``nbb`` boxes.

    Raises:
        DetectorError: shapes disagree, no boxes, non-finite values, or soft labels asked
            for but missing.
    """
    _check_regions(regions, with_soft_labels)
    nbb = min(cut.num_boxes(regions.conf), regions.num_boxes)
    record = {
        "features": np.ascontiguousarray(regions.features[:nbb], dtype=np.float16),  # (nbb, 2048)
        "norm_bb": np.ascontiguousarray(regions.norm_bb[:nbb], dtype=np.float16),  # (nbb, 6)
        "conf": np.ascontiguousarray(regions.conf[:nbb].reshape(-1, 1), dtype=np.float16),  # (nbb, 1)
    }
    if with_soft_labels:
        soft = soft_labels_to_uniter(np.asarray(regions.soft_labels)[:nbb])
        record["soft_labels"] = np.ascontiguousarray(soft, dtype=np.float16)  # (nbb, 1601)
    return record


def record_view(record: Mapping[str, np.ndarray], as_float32: bool = True) -> ImageRecord:
    """An official record dict as the reader returns it (so a record just written and one read back
    from the DB feed the models exactly the same numbers)."""
    def cast(arr: np.ndarray) -> np.ndarray:
        return arr.astype(np.float32) if as_float32 and arr.dtype == np.float16 else np.array(arr)

    soft = record.get("soft_labels")
    return ImageRecord(features=cast(record["features"]), norm_bb=cast(record["norm_bb"]),
                       conf=cast(record["conf"]).reshape(-1), soft_labels=None if soft is None else cast(soft))


def _check_regions(regions: RegionFeatures, with_soft_labels: bool) -> None:
    feats, n = np.asarray(regions.features), regions.num_boxes
    problems = []
    if feats.ndim != 2 or n == 0:
        problems.append(f"features of shape {feats.shape}")
    if np.asarray(regions.norm_bb).shape != (n, 6):
        problems.append(f"norm_bb of shape {np.asarray(regions.norm_bb).shape} for {n} boxes")
    if np.asarray(regions.conf).reshape(-1).shape != (n,):
        problems.append(f"conf of shape {np.asarray(regions.conf).shape} for {n} boxes")
    if with_soft_labels:
        soft = regions.soft_labels
        if soft is None or np.asarray(soft).ndim != 2 or np.asarray(soft).shape[0] != n:
            problems.append("soft labels missing or misshapen")
    if not problems and not (np.isfinite(feats).all() and np.isfinite(regions.norm_bb).all()):
        problems.append("non-finite values")
    if problems:
        raise DetectorError("detector output breaks the contract: " + "; ".join(problems))


# ------------------------------------------------------------------------------ value codecs


def encode_value(record: Mapping[str, np.ndarray], compress: bool = False) -> bytes:
    """A record dict -> LMDB value bytes, in the official encoding."""
    if compress:
        with io.BytesIO() as buf:
            # (numpy's stub types ``**kwds`` as if a key could be ``allow_pickle``: these are array names)
            np.savez_compressed(buf, **record)  # type: ignore[arg-type]
            return buf.getvalue()
    return msgpack.packb(dict(record), default=msgpack_numpy.encode, use_bin_type=True)


def decode_value(raw: bytes, compressed: bool = False) -> dict[str, np.ndarray]:
    """LMDB value bytes -> record dict (never unpickles).

    Raises:
        ImageDBError: the bytes are not a record of numeric arrays.
    """
    try:
        if compressed:
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                out = {k: npz[k] for k in npz.files}
        else:
            out = msgpack.unpackb(raw, raw=False, object_hook=_decode_ndarray, strict_map_key=False)
    except ImageDBError:
        raise
    except Exception as exc:
        raise ImageDBError(f"undecodable feature record ({type(exc).__name__}: {exc})") from None
    if not isinstance(out, dict) or not all(isinstance(v, np.ndarray) for v in out.values()):
        raise ImageDBError("feature record is not a dict of arrays")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in out.items()}


def _decode_ndarray(obj: dict[Any, Any]) -> Any:
    """msgpack-numpy's array encoding -> ndarray, refusing object/structured dtypes."""
    if b"nd" not in obj:
        return obj
    kind = obj.get(b"kind", b"")
    if kind in (b"O", b"V"):
        raise ImageDBError("feature record holds an object/structured array: refused")
    dtype = np.dtype(_as_str(obj[b"type"]))
    if dtype.kind not in _NUMERIC_KINDS:
        raise ImageDBError(f"feature record holds a {dtype} array: refused")
    data = obj[b"data"]
    if obj[b"nd"] is not True:
        return np.frombuffer(data, dtype=dtype)[0]
    shape = tuple(int(s) for s in obj[b"shape"])
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data):
        raise ImageDBError("feature record array size does not match its shape")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _as_str(value: str | bytes) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False)


def _stamp_from_raw(raw: bytes) -> SourceStamp:
    d = _unpack(raw)
    return SourceStamp(path=os.fsdecode(d["path"]), size=int(d["size"]), mtime_ns=int(d["mtime_ns"]))


def _failure_from_raw(raw: bytes) -> FailureRecord:
    d = _unpack(raw)
    return FailureRecord(reason=d["reason"], size=int(d["size"]), mtime_ns=int(d["mtime_ns"]),
                         permanent=bool(d["permanent"]))


def _safe_text(text: str) -> str:
    """Valid UTF-8 text whatever it holds (lone surrogates from odd file names are escaped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _display_path(path: str) -> str:
    """A file path as valid UTF-8 text: undecodable bytes of odd names shown as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _iter_keys(txn: lmdb.Transaction) -> Iterator[str]:
    for key in txn.cursor().iternext(keys=True, values=False):
        if key not in RESERVED_KEYS:
            yield bytes(key).decode("utf-8")


# ------------------------------------------------------------------------------ LMDB files


def lmdb_problem(db_path: Path) -> str | None:
    """What is wrong with the ``data.mdb`` of an LMDB directory, read from its two meta pages without mapping
    it (mapping a truncated file kills the process with SIGBUS on the first read past its end); None when it
    looks sound or does not exist yet.

    A meta page (64-bit LMDB) is a 16-byte page header then ``mm_magic``, ``mm_version`` (u32 each),
    ``mm_address``, ``mm_mapsize`` (u64 each), two 48-byte DB records (the first one's first u32 is the page
    size), then ``mm_last_pg`` (offset 136) and ``mm_txnid`` (u64 each); the newer meta (higher txnid) is the current one, and the
    file must hold pages ``0..mm_last_pg``.
    """
    import struct

    data = db_path / "data.mdb"
    try:
        size = data.stat().st_size
        with open(data, "rb") as handle:
            head = handle.read(152)
            page = struct.unpack_from("<I", head, 40)[0] if len(head) >= 44 else 0
            if 512 <= page <= 65536 and len(head) >= 152:
                handle.seek(page)
                second = handle.read(152)
            else:
                second = b""
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if size == 0:
        return "empty (0 bytes)"
    metas = []
    for raw in (head, second):
        if len(raw) < 152:
            continue
        magic, version = struct.unpack_from("<II", raw, 16)
        psize = struct.unpack_from("<I", raw, 40)[0]
        last_pg, txnid = struct.unpack_from("<QQ", raw, 136)
        if magic == _LMDB_MAGIC and psize == page and version == 1:
            metas.append((txnid, last_pg))
    if not metas:
        return "not an LMDB file (bad meta pages)"
    _, last_pg = max(metas)
    needed = (last_pg + 1) * page
    if size < needed:
        return f"truncated ({size} bytes; its pages need {needed})"
    return None


def check_lmdb(db_path: Path) -> None:
    """Raise `ImageDBError` naming the file when an LMDB's data file is damaged (before anything maps it)."""
    problem = lmdb_problem(db_path)
    if problem:
        raise ImageDBError(f"{db_path / 'data.mdb'} is damaged: {problem}")


def map_size_for(db_path: Path) -> int:
    """An LMDB map for a writer: twice the data so far, at least `MIN_MAP_SIZE` (grown on demand after)."""
    try:
        size = (db_path / "data.mdb").stat().st_size
    except OSError:
        size = 0
    return max(MIN_MAP_SIZE, 2 * size)


def damaged(db_path: Path, exc: BaseException) -> LdotError:
    """The error for an LMDB failure: a full or failing disk (`StorageError`), too little address space for the
    map, or damage."""
    from models.core.errors import as_storage_error

    storage = as_storage_error(exc)
    if storage is not None:
        return storage
    detail = str(exc).splitlines()[0] if str(exc) else "-"
    if isinstance(exc, lmdb.MemoryError):
        return ImageDBError(f"cannot map {db_path / 'data.mdb'}: not enough memory or address space ({detail}); "
                            "raise the limit (ulimit -v) or free memory")
    return ImageDBError(f"{db_path / 'data.mdb'} is damaged ({type(exc).__name__}: {detail})")


# ------------------------------------------------------------------------------ writer


class UniterImageDBWriter:
    """Append region features to a UNITER image DB; safe to reopen and resume.

    Records are staged with :meth:`put` / :meth:`put_failure` and land together, atomically,
    at :meth:`commit` (one LMDB transaction: a crash loses at most the staged batch and never
    leaves a partial record). The nbb json and ``__keys__`` are derived data, rewritten on
    :meth:`close`, every ``sidecar_interval_s`` seconds of commits, and rebuilt from the LMDB
    when a writer opens a DB whose previous writer died.

    Only one writer per DB: a ``<db name>.lock`` file lock (released by the OS if the process
    dies) makes a second one fail fast with :class:`DBLockedError`.

    Usage::

        with UniterImageDBWriter(out_dir, "uniter") as db:
            db.put("img1.jpg", regions, SourceStamp(path, size, mtime_ns))
            db.commit()
    """

    def __init__(self, img_dir: str | os.PathLike[str], cut: BoxCut | str = "uniter", *,
                 compress: bool = False, map_size: int | None = DEFAULT_MAP_SIZE,
                 lock_timeout_s: float = 0.0, sidecar_interval_s: float = 30.0) -> None:
        self.img_dir = Path(img_dir)
        self.cut = resolve_cut(cut)
        self.compress = compress
        self.db_path = self.img_dir / self.cut.db_name(compress)
        self.sidecar_interval_s = sidecar_interval_s
        self.img_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire_lock(self.img_dir / f"{self.cut.db_name(compress)}.lock", lock_timeout_s)
        try:
            check_lmdb(self.db_path)
            try:
                self._env = lmdb.open(str(self.db_path), map_size=map_size or map_size_for(self.db_path),
                                      max_dbs=2, subdir=True)
                self._sources = self._env.open_db(SOURCES_DB)
                self._failed = self._env.open_db(FAILED_DB)
                self._name2nbb = self._reconcile_nbb()
            except lmdb.Error as exc:
                raise damaged(self.db_path, exc) from None
        except BaseException:
            self._lock.release()
            raise
        self._staged: dict[str, tuple[bytes, int, SourceStamp | None]] = {}
        self._staged_failures: dict[bytes, FailureRecord | None] = {}
        self._last_sidecar = time.monotonic()
        self._closed = False
        self.write_sidecars()

    # -- context manager --------------------------------------------------------------------

    def __enter__(self) -> UniterImageDBWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()
            self.close()

    # -- staging ----------------------------------------------------------------------------

    def put(self, key: str, regions: RegionFeatures | Mapping[str, np.ndarray],
            source: SourceStamp | None = None, *, with_soft_labels: bool = False) -> int:
        """Stage one image's record under ``key`` (replacing any stored one); returns its nbb.

        ``regions`` is detector output (cut and converted here) or an already-official record
        dict. The record lands at the next :meth:`commit`.
        """
        kb = _check_key(key)
        if isinstance(regions, RegionFeatures):
            record = regions_to_record(regions, self.cut, with_soft_labels)
        else:
            record = dict(regions)
        nbb = self._record_nbb(record)
        self._staged[kb.decode("utf-8")] = (encode_value(record, self.compress), nbb, source)
        return nbb

    def put_failure(self, source_path: str, failure: FailureRecord) -> None:
        """Stage the record of a file that could not be extracted."""
        self._staged_failures[os.fsencode(source_path)] = failure

    def clear_failure(self, source_path: str) -> None:
        """Stage the removal of a file's failure record (it now succeeded)."""
        self._staged_failures[os.fsencode(source_path)] = None

    def discard(self) -> None:
        """Drop everything staged since the last commit."""
        self._staged.clear()
        self._staged_failures.clear()

    @property
    def staged_count(self) -> int:
        return len(self._staged)

    # -- committing -------------------------------------------------------------------------

    def commit(self) -> None:
        """Write every staged record and failure in one durable transaction."""
        if not self._staged and not self._staged_failures:
            return
        self._growing(self._write_staged)
        for key, (_, nbb, _) in self._staged.items():
            self._name2nbb[key] = nbb
        self.discard()
        if time.monotonic() - self._last_sidecar >= self.sidecar_interval_s:
            self.write_sidecars()

    def _growing(self, write: Callable[[], _T]) -> _T:
        """Run a write transaction, doubling the map whenever it is full (it starts sized from the data)."""
        while True:
            try:
                return write()
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.Error as exc:
                raise damaged(self.db_path, exc) from None

    def _write_staged(self) -> None:
        with self._env.begin(write=True) as txn:
            for key, (value, _, source) in self._staged.items():
                kb = key.encode("utf-8")
                txn.put(kb, value)
                if source is not None:
                    txn.put(kb, _pack({"path": os.fsencode(source.path), "size": source.size,
                                       "mtime_ns": source.mtime_ns}), db=self._sources)
                else:
                    txn.delete(kb, db=self._sources)
            for path_b, failure in self._staged_failures.items():
                if failure is None:
                    txn.delete(path_b, db=self._failed)
                else:
                    txn.put(path_b, _pack({"reason": _safe_text(failure.reason), "size": failure.size,
                                           "mtime_ns": failure.mtime_ns, "permanent": failure.permanent}),
                            db=self._failed)

    def delete(self, keys: Iterable[str]) -> int:
        """Remove the records of ``keys`` (and their source stamps) in one transaction; returns how many."""
        keys = list(keys)

        def write() -> int:
            removed = 0
            with self._env.begin(write=True) as txn:
                for key in keys:
                    kb = _check_key(key)
                    removed += bool(txn.delete(kb))
                    txn.delete(kb, db=self._sources)
            return removed

        removed = self._growing(write)
        for key in keys:
            self._name2nbb.pop(key, None)
            self._staged.pop(key, None)
        return removed

    def write_sidecars(self) -> None:
        """Rewrite the nbb json, ``__keys__`` and the failed-files json from committed state."""
        nbb_name = self.cut.nbb_name
        if nbb_name is not None:
            atomic_write_json(self.img_dir / nbb_name, self._name2nbb)
        keys = json.dumps(list(self._name2nbb)).encode("utf-8")

        def write() -> None:
            with self._env.begin(write=True) as txn:
                txn.put(KEYS_KEY, keys)

        self._growing(write)
        failures = {_display_path(p): {"reason": f.reason, "size": f.size, "mtime_ns": f.mtime_ns,
                                    "permanent": f.permanent} for p, f in self.failures().items()}
        atomic_write_json(self.img_dir / f"{self.cut.db_name(self.compress)}.failed.json", failures)
        self._last_sidecar = time.monotonic()

    def close(self) -> None:
        """Commit what is staged, refresh the sidecars, close the LMDB and release the lock."""
        if self._closed:
            return
        try:
            self.commit()
            self.write_sidecars()
            self._env.sync(True)
        finally:
            self._env.close()
            self._lock.release()
            self._closed = True

    # -- queries ----------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._name2nbb

    def __len__(self) -> int:
        return len(self._name2nbb)

    def keys(self) -> list[str]:
        """File names committed so far."""
        return list(self._name2nbb)

    def nbb(self, key: str) -> int:
        return self._name2nbb[key]

    def sources(self) -> dict[str, SourceStamp]:
        """key -> the file its committed record was extracted from (keys without one are absent)."""
        with self._env.begin() as txn:
            return {bytes(k).decode("utf-8"): _stamp_from_raw(bytes(v))
                    for k, v in txn.cursor(db=self._sources)}

    def failures(self) -> dict[str, FailureRecord]:
        """source path -> the committed record of why it failed."""
        with self._env.begin() as txn:
            return {os.fsdecode(bytes(k)): _failure_from_raw(bytes(v)) for k, v in txn.cursor(db=self._failed)}

    # -- internals --------------------------------------------------------------------------

    def _record_nbb(self, record: Mapping[str, np.ndarray]) -> int:
        for name in ("features", "norm_bb", "conf"):
            if name not in record:
                raise DetectorError(f"feature record lacks {name!r}")
        return min(self.cut.num_boxes(record["conf"]), int(record["features"].shape[0]))

    def _reconcile_nbb(self) -> dict[str, int]:
        """name -> nbb for every committed key: the json, completed from the LMDB after a crash."""
        known: dict[str, int] = {}
        nbb_name = self.cut.nbb_name
        if nbb_name is not None and (self.img_dir / nbb_name).exists():
            try:
                known = {str(k): int(v) for k, v in json.loads((self.img_dir / nbb_name).read_text("utf-8")).items()}
            except (ValueError, OSError):
                known = {}
        out: dict[str, int] = {}
        with self._env.begin() as txn:
            for key in _iter_keys(txn):
                if key in known:
                    out[key] = known[key]
                else:
                    raw = txn.get(key.encode("utf-8"))
                    if raw is None:  # listed by the same read transaction: never
                        continue
                    record = decode_value(raw, self.compress)
                    out[key] = self._record_nbb(record)
        return out


def _acquire_lock(path: Path, timeout_s: float) -> FileLock:
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise DBLockedError(f"another process is writing this feature DB (lock {path}); "
                            "wait for it to finish or stop it") from None
    return lock


def _check_key(key: str) -> bytes:
    try:
        kb = key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"DB key is not valid UTF-8: {key!r}") from None
    if not kb or kb in RESERVED_KEYS or len(kb) > 511:
        raise ValueError(f"invalid DB key {key!r} (empty, reserved or longer than 511 bytes)")
    return kb


# ------------------------------------------------------------------------------ reader


class UniterImageDB:
    """Read a UNITER image DB (ours or one made by the official scripts), as DetectFeatLmdb does.

    ``db[fname]`` -> :class:`ImageRecord` cut to ``nbb`` boxes; ``db.get_dump(fname)`` -> the
    dict of every stored array cut the same way (UNITER's ``get_dump``). Safe to use in forked
    DataLoader workers (the LMDB environment is reopened per process) and while a writer
    appends (each read is its own short read transaction).
    """

    def __init__(self, img_dir: str | os.PathLike[str], cut: BoxCut | str = "uniter", *,
                 compress: bool | None = None, as_float32: bool = True) -> None:
        self.img_dir = Path(img_dir)
        self.cut = resolve_cut(cut)
        self.as_float32 = as_float32
        self.db_path, self.compressed, self._name2nbb = self._locate(compress)
        self._env: lmdb.Environment | None = None
        self._pid = -1

    def _locate(self, compress: bool | None) -> tuple[Path, bool, dict[str, int] | None]:
        """Pick the LMDB directory the way DetectFeatLmdb names it."""
        flags = (False, True) if compress is None else (compress,)
        names = [(self.cut.db_name(c), c) for c in flags]
        name2nbb: dict[str, int] | None = None
        nbb_name = self.cut.nbb_name
        if nbb_name is not None:
            nbb_path = self.img_dir / nbb_name
            if nbb_path.exists():
                name2nbb = {str(k): int(v) for k, v in json.loads(nbb_path.read_text("utf-8")).items()}
            else:
                names += [("all_compressed" if c else "all", c) for c in flags]
        for name, compressed in names:
            if (self.img_dir / name / "data.mdb").exists():
                return self.img_dir / name, compressed, name2nbb
        raise ImageDBError(f"no image feature DB in {self.img_dir} (looked for {', '.join(n for n, _ in names)})")

    @property
    def env(self) -> lmdb.Environment:
        """The LMDB environment, opened on first use in each process.

        In a forked child (DataLoader worker) of a process that already opened it, py-lmdb
        refuses a second open of the same files and the inherited handle is kept instead
        (read transactions work after fork); opening the reader lazily in workers is better.
        """
        if self._env is not None and self._pid == os.getpid():
            return self._env
        check_lmdb(self.db_path)
        try:
            # the map is the data's size (LMDB takes the larger of this and the used pages), not the writer's
            self._env = lmdb.open(str(self.db_path), readonly=True, create=False, lock=True,
                                  max_dbs=2, readahead=False, subdir=True, map_size=1 << 20)
        except lmdb.Error as exc:
            if self._env is None:  # open elsewhere in this very process, e.g. by a writer
                if "already open" in str(exc):
                    raise ImageDBError(f"cannot open {self.db_path}: {exc} (close the writer first)") from None
                raise damaged(self.db_path, exc) from None
        self._pid = os.getpid()
        return self._env

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            self._env.close()
        self._env = None

    def _read(self, fn: Callable[[lmdb.Transaction], _T]) -> _T:
        """Run ``fn(txn)`` in a read transaction; follows a writer that grew the map; damage -> `ImageDBError`."""
        for _ in range(3):
            env = self.env
            try:
                with env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                env.set_mapsize(0)  # adopt the size the writer set
            except lmdb.Error as exc:
                raise damaged(self.db_path, exc) from None
        raise ImageDBError(f"{self.db_path} keeps growing under this reader: try again")

    def __enter__(self) -> UniterImageDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        """Every file name in the LMDB (the special ``__keys__`` entry excluded)."""
        return self._read(lambda txn: list(_iter_keys(txn)))

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, fname: object) -> bool:
        if not isinstance(fname, str) or fname.encode("utf-8", "surrogateescape") in RESERVED_KEYS:
            return False
        return self._read(lambda txn: txn.get(fname.encode("utf-8", "surrogateescape")) is not None)

    def raw(self, fname: str) -> dict[str, np.ndarray]:
        """The stored arrays of ``fname`` as they are (float16, not cut)."""
        if fname.encode("utf-8", "surrogateescape") in RESERVED_KEYS:
            raise KeyError(fname)
        value = self._read(lambda txn: txn.get(fname.encode("utf-8", "surrogateescape")))
        if value is None:
            raise KeyError(fname)
        return decode_value(bytes(value), self.compressed)

    def nbb(self, fname: str) -> int:
        """Number of boxes kept for ``fname`` (json, else computed from its ``conf`` like UNITER)."""
        if self.cut.fixed:
            return self.cut.num_bb
        if self._name2nbb is not None and fname in self._name2nbb:
            return self._name2nbb[fname]
        return self.cut.num_boxes(self.raw(fname)["conf"])

    def get_dump(self, fname: str) -> dict[str, np.ndarray]:
        """Every stored array of ``fname`` cut to ``nbb`` boxes (float32 unless as_float32=False)."""
        dump = self.raw(fname)
        nbb = self._nbb_for(fname, dump)
        # 0-d arrays (old numpy stored savez's allow_pickle=True as one) are passed through uncut
        return {k: self._cast(v[:nbb] if v.ndim else v) for k, v in dump.items()}

    def __getitem__(self, fname: str) -> ImageRecord:
        return record_view(self.get_dump(fname), as_float32=False)

    def sources(self) -> dict[str, SourceStamp]:
        """key -> source file stamp, for DBs written by ldot (empty for official ones)."""
        return {k.decode("utf-8"): _stamp_from_raw(v) for k, v in self._sub_items(SOURCES_DB).items()}

    def failures(self) -> dict[str, FailureRecord]:
        """source path -> why it could not be extracted, for DBs written by ldot."""
        return {os.fsdecode(k): _failure_from_raw(v) for k, v in self._sub_items(FAILED_DB).items()}

    def verify(self) -> list[str]:
        """Decode every record and check its shapes; returns a list of problems (empty when sound)."""
        problems = []
        for key in self.keys():
            try:
                _check_dump(key, self.raw(key))
            except (ImageDBError, KeyError) as exc:
                problems.append(f"{key}: {exc}")
        return problems

    def _nbb_for(self, fname: str, dump: Mapping[str, np.ndarray]) -> int:
        if self.cut.fixed:
            return self.cut.num_bb
        if self._name2nbb is not None and fname in self._name2nbb:
            return self._name2nbb[fname]
        return self.cut.num_boxes(dump["conf"])

    def _cast(self, arr: np.ndarray) -> np.ndarray:
        if self.as_float32 and arr.dtype == np.float16:
            return arr.astype(np.float32)
        return np.array(arr)

    def _sub_items(self, name: bytes) -> dict[bytes, bytes]:
        env = self.env
        try:
            with env.begin() as txn:
                if txn.get(name) is None:
                    return {}
            db = env.open_db(name, create=False)
        except lmdb.Error:
            return {}
        with env.begin(db=db) as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor()}


def _check_dump(key: str, dump: Mapping[str, np.ndarray]) -> None:
    for name in ("features", "norm_bb", "conf"):
        if name not in dump:
            raise ImageDBError(f"missing {name!r}")
    n = dump["features"].shape[0]
    if dump["features"].ndim != 2 or n == 0:
        raise ImageDBError(f"features of shape {dump['features'].shape}")
    if dump["norm_bb"].shape != (n, 6):
        raise ImageDBError(f"norm_bb of shape {dump['norm_bb'].shape}")
    if dump["conf"].reshape(-1).shape != (n,):
        raise ImageDBError(f"conf of shape {dump['conf'].shape}")
    if "soft_labels" in dump and (dump["soft_labels"].ndim != 2 or dump["soft_labels"].shape[0] != n):
        raise ImageDBError(f"soft_labels of shape {dump['soft_labels'].shape}")
    if not np.isfinite(dump["features"]).all():
        raise ImageDBError("non-finite features")


def subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def is_image_db(path: Path) -> bool:
    """A folder holding a UNITER image DB of the ``uniter`` cut (plain or compressed)."""
    return any((path / name / "data.mdb").is_file() for name in (UNITER_FEATURE_DB, UNITER_FEATURE_DB + "_compressed"))


class FeatureStore:
    """Region features read from a UNITER image DB (a benchmark's, or an index's region store), with a
    small LRU cache and errors that say which DB and key.

    ``store.get(key)`` -> the record (``features (n, dim)`` float16, ``norm_bb (n, 6)``) cut to the DB's box count.
    """

    def __init__(self, img_dir: str | Path, preset: str = "uniter", cache_size: int = 512) -> None:
        self.img_dir = Path(img_dir)
        self.db = open_image_db(self.img_dir, preset)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, ImageRecord] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self.db

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self.db]

    def get(self, key: str) -> ImageRecord:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            record = self.db[key]
        except KeyError:
            raise ImageDBError(f"image DB {self.img_dir} has no features for {key!r}") from None
        except Exception as exc:  # the reader's own error types (ImageDBError …)
            hint = " (it is ldot's feature cache: delete that folder to extract again)" if _in_cache(self.img_dir) else ""
            raise ImageDBError(f"image DB {self.img_dir}: cannot read {key!r} ({exc}){hint}") from None
        self._cache[key] = record
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return record

    def close(self) -> None:
        close = getattr(self.db, "close", None)
        if close is not None:
            close()


def _in_cache(img_dir: Path) -> bool:
    from models.core.home import features_dir

    try:
        return img_dir.resolve().is_relative_to(features_dir().resolve())
    except OSError:
        return False


def open_image_db(img_dir: Path, preset: str = "uniter") -> UniterImageDB:
    """A reader of a UNITER image DB: ``key in db``, ``db[key].features`` / ``.norm_bb`` (float16)."""
    from feature_extraction.uniter_db import UniterImageDB

    try:
        return UniterImageDB(img_dir, preset, as_float32=False)
    except LdotError:
        raise
    except Exception as exc:
        raise ImageDBError(f"cannot open the image DB {img_dir}: {exc}") from None
