"""Indexing in this process (`LocalExecutor`): hash the files, reuse the vectors of known contents, extract
region features and encode the new contents in batches, each batch committed with its file rows.

Files with the same bytes share the outcome of the one that is put through the models. A dual encoder (CLIP,
SigLIP) reads pixels decoded in worker processes and runs no detector unless region features are kept.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldot_cli.index import hooks
from ldot_cli.index.layout import REGIONS_DIR
from ldot_cli.index.runs import PIXEL_BATCH, STAGING_DIR, IndexReport, IndexRun, Scan, WalkedFile, file_row
from ldot_cli.index.store import IndexStore
from models.core.errors import LdotWarning
from models.core.fileio import sha256_file


class LocalExecutor:
    """Runs an `Indexer`'s model work here: walked folders in, vectors and region features out."""

    def __init__(self, indexer: IndexRun) -> None:
        self.ix = indexer

    def plan(self, paths: list[str], excludes: tuple[str, ...]) -> Scan:
        """The walk of the folders (before anything is created or downloaded)."""
        return self.ix.scan(paths, excludes)

    def run(self, store: IndexStore, scan: Scan, excludes: tuple[str, ...], retry_failed: bool, reindex: bool,
            report: IndexReport) -> None:
        report.found = len(scan.sources) + len(scan.issues)
        todo = self.ix.plan_files(store, scan, retry_failed, report)
        self.ix.record_walk_issues(store, scan, report)
        hashes = self.hash_files(todo)
        need = self.link_known(store, todo, hashes, report)
        self.encode_new(store, need, hashes, report)
        self.ix.collect_garbage(store)
        self.ix.save(store, report)

    def _batcher(self, store: IndexStore, by_hash: dict[str, list[WalkedFile]], report: IndexReport, total: int,
                 size: int = 64) -> Batcher:
        def committed(done: int) -> None:
            self.ix.stage("encoding", done, total)
            hooks.fire(hooks.committed, done)
            self.ix.maybe_flush(store)

        return Batcher(lambda items: self.ix.encoder.encode_images(items), store, by_hash, report, committed, size)

    def hash_files(self, todo: list[WalkedFile]) -> dict[str, str]:
        hashes: dict[str, str] = {}
        if not todo:
            return hashes
        self.ix.stage("hashing", 0, len(todo))
        for i, src in enumerate(todo):
            try:
                hashes[src.path] = sha256_file(src.path)
            except OSError:
                pass  # unreadable: the extraction step reports why
            if i % 64 == 63:
                self.ix.stage("hashing", i + 1, len(todo))
        self.ix.stage("hashing", len(todo), len(todo))
        return hashes

    def link_known(self, store: IndexStore, todo: list[WalkedFile], hashes: dict[str, str],
                    report: IndexReport) -> list[WalkedFile]:
        """Point files with already-indexed content at its vector; return those needing model work."""
        need, rows = [], []
        for src in todo:
            digest = hashes.get(src.path)
            vid = store.vector_for_hash(digest) if digest else None
            if vid is None:
                need.append(src)
                continue
            rows.append(file_row(src, digest, vid))
            report.reused += 1
        if rows:
            with store.transaction() as db:
                store.put_files(db, rows)
        return need

    def encode_new(self, store: IndexStore, need: list[WalkedFile], hashes: dict[str, str], report: IndexReport) -> None:
        """Extract and encode one file per unknown content; commit vectors + file rows per batch.

        Files with the same bytes share the outcome of the one that is extracted: one vector, or one
        skip reason each (every file keeps its own row, so an unchanged bad file is not hashed again).
        """
        if not need:
            return
        if self.ix.pixels:
            self._encode_pixels(store, need, hashes, report)
            return
        by_hash, unreadable = _by_content(need, hashes)
        firsts = [group[0] for group in by_hash.values()]
        self.ix.stage("extracting", 0, None)  # stages show in this order; totals come when known
        self.ix.stage("encoding", 0, len(firsts))
        regions_dir = self.ix.dir / (REGIONS_DIR if self.ix.keep_regions else STAGING_DIR)
        pending = self._batcher(store, by_hash, report, len(firsts))
        # contents whose regions an interrupted run already extracted: encode straight away
        fresh = firsts
        if regions_dir.is_dir():
            from feature_extraction.uniter_db import FeatureStore

            cached = FeatureStore(regions_dir, self.ix.preset)
            try:
                fresh = []
                for src in firsts:
                    digest = hashes[src.path]
                    if digest in cached:
                        pending.add(digest, cached.get(digest))
                    else:
                        fresh.append(src)
                pending.flush()
            finally:
                cached.close()  # one LMDB handle per process: the extraction below writes to it
        if fresh:
            self._extract(fresh, hashes, regions_dir, pending, report)
        pending.flush()
        self.ix.stage("extracting", len(fresh), len(fresh))
        self.ix.stage("encoding", pending.done, pending.done)  # files that failed extraction drop out
        if unreadable:
            self.ix.skip(store, [(src, None, "unreadable file", True) for src in unreadable], report)
        if not self.ix.keep_regions:
            shutil.rmtree(regions_dir, ignore_errors=True)

    def _encode_pixels(self, store: IndexStore, need: list[WalkedFile], hashes: dict[str, str], report: IndexReport) -> None:
        """A dual encoder's way: decode and preprocess in worker processes (the model's own image processor),
        encode in batches, commit vectors + file rows per batch; no detector unless region features are kept
        (``ldot index --regions``, for a region cross-encoder), which are extracted after the vectors."""
        from feature_extraction.images.pool import DecodeFailure, iter_decoded

        by_hash, unreadable = _by_content(need, hashes)
        firsts = [group[0] for group in by_hash.values()]
        self.ix.stage("encoding", 0, len(firsts))
        pending = self._batcher(store, by_hash, report, len(firsts), PIXEL_BATCH)
        failed = []
        decoded = iter_decoded([s.path for s in firsts], self.ix.encoder.pixel_preprocess, num_workers=self.ix.options.num_workers,
                               max_in_flight=2 * PIXEL_BATCH)
        for item in decoded:
            digest = hashes[firsts[item.index].path]
            if isinstance(item, DecodeFailure):
                failed += [(member, digest, item.reason, not item.permanent) for member in by_hash[digest]]
                continue
            pending.add(digest, item)
        pending.flush()
        self.ix.skip(store, failed, report)
        self.ix.stage("encoding", pending.done, pending.done)
        if unreadable:
            self.ix.skip(store, [(src, None, "unreadable file", True) for src in unreadable], report)
        if self.ix.keep_regions:
            self._extract_regions(store, [s for s in firsts if store.vector_for_hash(hashes[s.path]) is not None],
                                  hashes)

    def _extract_regions(self, store: IndexStore, sources: list[WalkedFile], hashes: dict[str, str]) -> None:
        """Region features of images already encoded from their pixels (kept for a region cross-encoder)."""
        from feature_extraction.pipeline import extract_to_db

        regions_dir = self.ix.dir / REGIONS_DIR
        if regions_dir.is_dir():
            from feature_extraction.uniter_db import FeatureStore

            cached = FeatureStore(regions_dir, self.ix.preset)
            try:
                sources = [s for s in sources if hashes[s.path] not in cached]
            finally:
                cached.close()
        if not sources:
            return
        total = len(sources)
        self.ix.stage("extracting", 0, total)
        result = extract_to_db([s.path for s in sources], regions_dir, self.ix.detector, self.ix.preset,
                               key_fn=lambda path, root: hashes[path], batch_size=self.ix.options.batch_size,
                               num_workers=self.ix.options.num_workers, progress=lambda p: self.ix.stage("extracting", p.done, total),
                               retry_failed=True)
        self.ix.stage("extracting", total, total)
        if result.failures:
            warnings.warn(LdotWarning(f"{len(result.failures)} indexed images have no region features (first: "
                                      f"{result.failures[0].reason}): a region cross-encoder cannot re-rank them"),
                          stacklevel=2)

    def _extract(self, sources: list[WalkedFile], hashes: dict[str, str], regions_dir: Path, pending: Batcher,
                 report: IndexReport) -> None:
        from feature_extraction.pipeline import extract_to_db

        total = len(sources)

        def on_batch(items: list[tuple[Any, Any]]) -> None:
            for src, regions in items:
                pending.add(src.key, regions)
            pending.flush()

        def on_progress(p: Any) -> None:
            self.ix.stage("extracting", p.done, total)

        result = extract_to_db([s.path for s in sources], regions_dir, self.ix.detector, self.ix.preset,
                               key_fn=lambda path, root: hashes[path], batch_size=self.ix.options.batch_size,
                               num_workers=self.ix.options.num_workers, progress=on_progress, on_batch=on_batch,
                               retry_failed=True)
        by_path = {s.path: s for s in sources}
        failed = []
        for f in result.failures:
            if f.path in by_path:
                digest = hashes[f.path]
                failed += [(member, digest, f.reason, not f.permanent) for member in pending.by_hash[digest]]
        self.ix.skip(pending.store, failed, report)


def _by_content(need: list[WalkedFile], hashes: dict[str, str]) -> tuple[dict[str, list[WalkedFile]], list[WalkedFile]]:
    """The files to encode grouped by content hash (each content is encoded once), and those that could not be
    hashed (unreadable)."""
    by_hash: dict[str, list[WalkedFile]] = {}
    unreadable = []
    for src in need:
        digest = hashes.get(src.path)
        if digest is None:
            unreadable.append(src)
        else:
            by_hash.setdefault(digest, []).append(src)
    return by_hash, unreadable


class Batcher:
    """Collects extracted region sets (or preprocessed pixels), encodes them in batches, commits vectors and file
    rows; ``on_commit(done)`` after each batch."""

    def __init__(self, encode: Callable[[list[Any]], Any], store: IndexStore, by_hash: dict[str, list[WalkedFile]],
                 report: IndexReport, on_commit: Callable[[int], None], size: int = 64) -> None:
        self.encode, self.store, self.by_hash, self.report = encode, store, by_hash, report
        self.on_commit, self.size = on_commit, size
        self.done = 0  # contents encoded
        self.items: list[tuple[str, Any]] = []

    def add(self, digest: str, regions: Any) -> None:
        self.items.append((digest, regions))
        if len(self.items) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        items, self.items = self.items, []
        vectors = self.encode([r for _, r in items]).numpy()
        store = self.store
        with store.transaction() as db:
            if store.dim is None:
                store.update_meta(db, dim=vectors.shape[1])
            for (digest, regions), vector in zip(items, vectors):
                boxes = len(regions.features) if hasattr(regions, "features") else 0  # pixels: no boxes
                vid = store.add_vector(db, digest, vector, boxes)
                group = self.by_hash[digest]
                store.put_files(db, [file_row(src, digest, vid) for src in group])
                self.report.encoded += 1  # the file put through the models ...
                self.report.reused += len(group) - 1  # ... and its copies found in the same run
                self.done += 1
        self.on_commit(self.done)
