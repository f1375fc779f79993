"""Output shards of a distributed indexing run, and their merge into an index.

A worker writes what it computed for one batch of images as one shard in the shards folder (local, or
any fsspec URL the workers and the driver can both reach)::

    part-<id>.npz          vectors (n, dim) fp16, region records (features/boxes/confidences fp16, with
                           offsets), and every file row of the batch as JSON (indexed, skipped, unit ends)
    part-<id>.npz.sha256   {"sha256", "bytes", "rows"}: written last; its presence is the commit

The data file is written under a temporary name and renamed, then the checksum file the same way: a
shard without its checksum file, or whose bytes do not match it, is not committed and is ignored (the
work it held is done again). The driver merges committed shards into the index one SQLite transaction
each (regions first, then vectors + file rows + the shard's record), then deletes them. Merging is
idempotent: vectors are keyed by content hash and file rows by path, and merged shard ids are recorded,
so a shard merged twice (a driver killed between commit and delete) changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.core.errors import LdotError

SHARDS_DIR = "shards"
SUFFIX = ".npz"
CHECKSUM = ".sha256"

TABLES = """
CREATE TABLE IF NOT EXISTS shards (
    id TEXT PRIMARY KEY,                    -- part-<id>
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    rows INTEGER NOT NULL,                  -- file rows it held
    merged REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS units (
    id TEXT PRIMARY KEY,                    -- a tar shard (or a group of loose files) of the input
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    total INTEGER,                          -- images it holds (known once its end row is merged)
    merged INTEGER NOT NULL DEFAULT 0       -- file rows merged so far
);
"""


class ShardError(LdotError):
    """A shard that cannot be written or read."""


@dataclass
class ShardRows:
    """What one shard holds (the worker builds it, the driver reads it back)."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # file rows; images carry "vec" = vector index
    vectors: list[np.ndarray] = field(default_factory=list)  # (dim,) each
    records: list[dict[str, np.ndarray] | None] = field(default_factory=list)  # region records, per vector


def encode(shard: ShardRows) -> bytes:
    """The shard's file bytes (an uncompressed .npz)."""
    arrays: dict[str, np.ndarray] = {
        "rows": np.frombuffer(json.dumps(shard.rows, ensure_ascii=True).encode(), dtype=np.uint8),
    }
    if shard.vectors:
        arrays["vectors"] = np.stack(shard.vectors).astype(np.float16)
        counts = np.array([0 if r is None else len(r["features"]) for r in shard.records], dtype=np.int64)
        arrays["offsets"] = np.concatenate([[0], np.cumsum(counts)])
        kept = [r for r in shard.records if r is not None]
        if kept:
            for key in ("features", "norm_bb", "conf"):
                arrays[key] = np.concatenate([r[key] for r in kept]).astype(np.float16)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub takes the keywords for allow_pickle
    return buf.getvalue()


def decode(data: bytes) -> ShardRows:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        rows = json.loads(npz["rows"].tobytes().decode())
        out = ShardRows(rows=rows)
        if "vectors" in npz.files:
            vectors = npz["vectors"]
            offsets = npz["offsets"]
            has = "features" in npz.files
            arrays = {k: npz[k] for k in ("features", "norm_bb", "conf")} if has else {}
            out.vectors = list(vectors)
            for i in range(len(vectors)):
                lo, hi = int(offsets[i]), int(offsets[i + 1])
                out.records.append({k: v[lo:hi] for k, v in arrays.items()} if has and hi > lo else None)
    return out


def shard_id(paths: list[str]) -> str:
    """Named by its content's paths: a retried batch rewrites the same shard."""
    digest = hashlib.sha1("\0".join(sorted(paths)).encode("utf-8", "surrogateescape")).hexdigest()
    return f"part-{digest[:20]}"


def _fs(directory: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(directory)


def write(directory: str, name: str, shard: ShardRows) -> dict[str, Any]:
    """Commit one shard: data file, then its checksum file, each under a temporary name then renamed."""
    fs, root = _fs(directory)
    fs.makedirs(root, exist_ok=True)
    data = encode(shard)
    info = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": len(shard.rows)}
    final = f"{root}/{name}{SUFFIX}"
    for target, payload in ((final, data), (final + CHECKSUM, json.dumps(info).encode())):
        tmp = f"{root}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            fileno = getattr(handle, "fileno", None)
            if fileno is not None:
                try:
                    os.fsync(fileno())
                except (OSError, ValueError, io.UnsupportedOperation):
                    pass
        fs.mv(tmp, target)
    return {"name": name, **info}


def committed(directory: str) -> list[str]:
    """Names of the committed shards in ``directory`` (those with a checksum file)."""
    fs, root = _fs(directory)
    if not fs.exists(root):
        return []
    names = []
    for path in fs.ls(root, detail=False):
        base = path.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith("part-") and base.endswith(SUFFIX + CHECKSUM):
            names.append(base[: -len(SUFFIX + CHECKSUM)])
    return sorted(names)


def read(directory: str, name: str) -> tuple[ShardRows, dict[str, Any]] | None:
    """A committed shard, verified against its checksum; None when it is not (fully) committed."""
    fs, root = _fs(directory)
    try:
        info = json.loads(fs.cat_file(f"{root}/{name}{SUFFIX}{CHECKSUM}"))
        data = fs.cat_file(f"{root}/{name}{SUFFIX}")
    except FileNotFoundError:
        return None
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        return None  # damaged or half-replaced: its work is done again
    return decode(data), info


def remove(directory: str, name: str) -> None:
    fs, root = _fs(directory)
    for path in (f"{root}/{name}{SUFFIX}{CHECKSUM}", f"{root}/{name}{SUFFIX}"):
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass


def clean_temporary(directory: str) -> None:
    """Drop half-written files a killed worker left behind."""
    fs, root = _fs(directory)
    if not fs.exists(root):
        return
    for path in fs.ls(root, detail=False):
        base = path.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(".part-") and base.endswith(".tmp"):
            fs.rm(path)
