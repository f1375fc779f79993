"""What `ldot status` reports about indexes (library side, no rendering)."""

from __future__ import annotations

import datetime
import sqlite3
from typing import Any

from ldot_cli.index.store import (
    DB_FILE,
    REGIONS_DIR,
    IndexStore,
    IndexStoreError,
    display_path,
    index_path,
)
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
                        "model": store.get_meta("model"), "bytes": _dir_bytes(path)})
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
                if model in (store.get_meta("model"), store.get_meta("detector")):
                    users.append(path.name)
        except LdotError:
            continue  # a damaged index is reported by the commands that use it
    return users


def describe_index(name: str, with_errors: bool = False) -> dict[str, Any]:
    """Everything `ldot status --name N` shows."""
    with IndexStore(index_path(name)) as store:
        meta = store.meta()
        counts = store.counts()
        regions = _dir_bytes(store.dir / REGIONS_DIR)
        updated = meta.get("faiss_written")
        info: dict[str, Any] = {
            "name": name, "path": str(store.dir), "model": meta.get("model"),
            "model_fingerprint": meta.get("model_fingerprint"), "detector": meta.get("detector"),
            "preset": meta.get("preset"), "indexed": counts.get("indexed", 0), "skipped": counts.get("skipped", 0),
            "vectors": counts["vectors"],
            "search": {"exact": "exact (every image scored)", "ivf": "approximate (IVF)",
                       "ivfpq": "approximate (IVF-PQ, top candidates re-scored exactly)"}.get(meta.get("faiss_kind", ""),
                                                                                              "-"),
            "bytes": _dir_bytes(store.dir),
            "region_bytes_per_image": regions // counts["vectors"] if counts["vectors"] and regions else None,
            "updated": datetime.datetime.fromtimestamp(float(updated)).isoformat(timespec="seconds") if updated else None,
            "folders": [{"path": display_path(root), "indexed": c.get("indexed", 0), "skipped": c.get("skipped", 0)}
                        for root, c in store.roots()],
        }
        info.update(_vector_index_info(store, meta, counts["vectors"]))
        if with_errors:
            info["errors"] = [(row.display, row.reason) for row in store.file_rows("skipped")]
    return info


def _vector_index_info(store: IndexStore, meta: dict[str, str], vectors: int) -> dict[str, Any]:
    """Index type and FAISS factory string, bytes per image of the vector index (its FAISS files + fp16
    re-scoring file), how many parts it is stored (and searched) as, recall@10 against exact search measured
    at build time with the cells a query scans (nprobe, tuned then), output shards merged."""
    try:
        files, parts = store.faiss_files(), len(store.faiss_parts())
    except IndexStoreError:  # a damaged file list: the next `ldot index` or search rebuilds it
        files, parts = [], 0
    size = sum(p.stat().st_size for p in files)
    recall = meta.get("recall_at_10")
    try:
        shards = store.db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]
    except sqlite3.OperationalError:  # never indexed with --ray
        shards = 0
    kind = meta.get("faiss_kind")
    return {"index_type": kind, "factory": meta.get("faiss_factory"),
            "bytes_per_image": size // vectors if vectors and size else None,
            "recall_at_10": float(recall) if recall else (1.0 if kind == "exact" else None),
            "nprobe": int(meta["nprobe"]) if meta.get("nprobe") else None, "parts": parts or None,
            "shards": shards}


__all__ = ["describe_index", "indexes_using", "list_indexes", "display_path"]
