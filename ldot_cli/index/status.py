"""What `ldot status` reports about indexes (library side, no rendering)."""

from __future__ import annotations

import datetime
import sqlite3
from typing import Any

from ldot_cli.index.hits import display_path
from ldot_cli.index.layout import DB_FILE, REGIONS_DIR, IndexStoreError, index_path
from ldot_cli.index.meta import VectorFileSet
from ldot_cli.index.store import IndexStore
from models.core.errors import LdotError
from models.core.home import indexes_dir


def _dir_bytes(path: Any) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def list_indexes() -> list[dict[str, Any]]:
    """Name, counts, model and size of every index."""
    root = indexes_dir()
    out = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not (path / DB_FILE).is_file():
            continue
        with IndexStore(path) as store:
            counts = store.counts()
            out.append({"name": path.name, "indexed": counts.get("indexed", 0), "skipped": counts.get("skipped", 0),
                        "model": store.meta.model, "bytes": _dir_bytes(path)})
    return out


def indexes_using(model: str) -> list[str]:
    """Names of the indexes built with ``model`` as their bi-encoder or detector (`ldot models rm` asks first)."""
    root = indexes_dir()
    users = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not (path / DB_FILE).is_file():
            continue
        try:
            with IndexStore(path) as store:
                if model in (store.meta.model, store.meta.detector):
                    users.append(path.name)
        except LdotError:
            continue  # a damaged index is reported by the commands that use it
    return users


def describe_index(name: str, with_errors: bool = False) -> dict[str, Any]:
    """Everything `ldot status --name N` shows."""
    with IndexStore(index_path(name)) as store:
        meta, files = store.meta, store.vector_file_set()
        counts = store.counts()
        regions = _dir_bytes(store.dir / REGIONS_DIR)
        updated = files.written
        info: dict[str, Any] = {
            "name": name, "path": str(store.dir), "model": meta.model,
            "model_fingerprint": meta.model_fingerprint, "detector": meta.detector,
            "preset": meta.preset, "indexed": counts.get("indexed", 0), "skipped": counts.get("skipped", 0),
            "vectors": counts["vectors"],
            "search": {"exact": "exact (every image scored)", "ivf": "approximate (IVF)",
                       "ivfpq": "approximate (IVF-PQ, top candidates re-scored exactly)"}.get(files.kind or "", "-"),
            "bytes": _dir_bytes(store.dir),
            "region_bytes_per_image": regions // counts["vectors"] if counts["vectors"] and regions else None,
            "updated": datetime.datetime.fromtimestamp(updated).isoformat(timespec="seconds") if updated else None,
            "folders": [{"path": display_path(root), "indexed": c.get("indexed", 0), "skipped": c.get("skipped", 0)}
                        for root, c in store.roots()],
        }
        info.update(_vector_index_info(store, files, counts["vectors"]))
        if with_errors:
            info["errors"] = [(row.display, row.reason) for row in store.file_rows("skipped")]
    return info


def _vector_index_info(store: IndexStore, meta: VectorFileSet, vectors: int) -> dict[str, Any]:
    """Index type and FAISS factory string, bytes per image of the vector index (its FAISS files + fp16
    re-scoring file), how many parts it is stored (and searched) as, recall@10 against exact search measured
    at build time with the cells a query scans (nprobe, tuned then), output shards merged."""
    try:
        files, parts = store.vector_files.paths(), len(store.vector_files.parts())
    except IndexStoreError:  # a damaged file list: the next `ldot index` or search rebuilds it
        files, parts = [], 0
    size = sum(p.stat().st_size for p in files)
    try:
        shards = store.db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]
    except sqlite3.OperationalError:  # never indexed with --ray
        shards = 0
    kind = meta.kind
    return {"index_type": kind, "factory": meta.factory,
            "bytes_per_image": size // vectors if vectors and size else None,
            "recall_at_10": meta.recall_at_10 if meta.recall_at_10 is not None else (1.0 if kind == "exact" else None),
            "nprobe": meta.nprobe, "parts": parts or None,
            "shards": shards}


__all__ = ["describe_index", "indexes_using", "list_indexes", "display_path"]
