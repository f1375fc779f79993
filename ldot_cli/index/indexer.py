"""`ldot index`: walk folders, extract region features, encode images, and keep the index in step.

Incremental: a file whose size and mtime are unchanged costs nothing; a new or changed file is hashed,
and its content hash decides whether any model work is needed (a moved or copied file reuses the
vector of the same bytes). Each batch of new vectors is committed with its file rows in one SQLite
transaction, so an interrupted run (Ctrl-C, kill -9) loses at most that batch and a re-run completes
it; region features already extracted for the batch in flight are reused from the region store.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feature_extraction.detector.weights import open_detector
from ldot_cli.index.store import (
    REGIONS_DIR,
    FileRow,
    IndexStore,
    IndexStoreError,
    index_path,
)
from models.core.errors import LdotError, option
from models.core.fileio import sha256_file
from models.core.progress import ProgressFn
from models.core.progress import report as report_progress
from models.hub.catalogue import DEFAULT_BI_ENCODER, DEFAULT_DETECTOR

DEFAULT_PRESET = "uniter"
FAISS_FLUSH_S = 300.0  # rewrite the vector file at least this often during long runs
STAGING_DIR = ".staging-regions"


# progress stages, in order: "scanning" (files), "hashing", "extracting", "encoding" (images), "saving"


@dataclass
class IndexReport:
    """What one `index_folders` run did."""

    name: str
    found: int = 0  # image files under the roots
    unchanged: int = 0  # same size and mtime as last time: no work
    reused: int = 0  # new or touched path, known content (moved, copied, or only its mtime changed): vector reused
    encoded: int = 0  # images put through the models in this run
    removed: int = 0  # files gone since last time
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) newly skipped in this run
    vectors: int = 0  # vectors in the index after the run
    faiss: str = ""
    elapsed_s: float = 0.0


def _excluded(path: str, root: str, patterns: Sequence[str]) -> bool:
    rel = os.path.relpath(path, root)
    parts = rel.split(os.sep)
    return any(fnmatch.fnmatch(rel, p) or any(fnmatch.fnmatch(part, p) for part in parts) for p in patterns)


class Indexer:
    """One indexing run over some roots into one named index (holds the index lock throughout)."""

    def stage(self, stage: str, done: int, total: int | None) -> None:
        """Report how far a stage has come (see `models.core.progress`)."""
        report_progress(self.progress, stage, done, total, "files" if stage == "scanning" else "images")

    def __init__(self, name: str = "default", model: str | None = None, detector: Any = DEFAULT_DETECTOR,
                 preset: str = DEFAULT_PRESET, keep_regions: bool = True, device: str = "auto",
                 batch_size: int = 8, num_workers: int = 2, progress: ProgressFn | None = None,
                 ann: str | None = None) -> None:
        self.name = name
        self.dir = index_path(name)
        self.model_arg, self.preset = model, preset
        # a registry name or path, or a ready detector object (anything with the pipeline's extract())
        self.detector_name = detector if isinstance(detector, str) else getattr(detector, "name", type(detector).__name__)
        self._detector: Any = None if isinstance(detector, str) else detector
        self.keep_regions, self.device = keep_regions, device
        self.batch_size, self.num_workers = batch_size, num_workers
        self.progress = progress
        self.ann = ann
        self._encoder: Any = None
        self.last_flush = time.monotonic()

    # -- setup -------------------------------------------------------------------------------------
    def open(self, reindex: bool) -> IndexStore:
        if reindex and self.dir.exists():
            for child in self.dir.iterdir():
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        store = IndexStore(self.dir, create=True)
        self.model = self._resolve_model(store)
        return store

    def _resolve_model(self, store: IndexStore) -> str:
        from models.hub.load import fingerprint

        recorded = store.get_meta("model")
        model = self.model_arg or recorded or DEFAULT_BI_ENCODER
        want = fingerprint(model)
        if recorded is not None and store.get_meta("model_fingerprint") != want:
            raise IndexStoreError(f"index {self.name!r} holds vectors of model {recorded!r}; {model!r} is another "
                                  "model: "
                              f"add {option('reindex')} to rebuild it with {model!r} (or use another {option('name')})")
        detector = store.get_meta("detector")
        if detector is not None and (detector, store.get_meta("preset")) != (self.detector_name, self.preset):
            raise IndexStoreError(f"index {self.name!r} was built with detector {detector!r} preset "
                              f"{store.get_meta('preset')!r}: add {option('reindex')} to change them")
        store.set_meta({"model": model, "model_fingerprint": want, "detector": self.detector_name,
                        "preset": self.preset, "regions": "kept" if self.keep_regions else "none"})
        if self.ann:
            store.set_meta({"ann_mode": self.ann})
        return model

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from models.hub.load import load_bi_encoder

            self._encoder = load_bi_encoder(self.model, device=self.device, towers=("image",))
        return self._encoder

    @property
    def detector(self) -> Any:
        if self._detector is None:
            self._detector = open_detector(self.detector_name, self.device)
        return self._detector

    # -- the run -------------------------------------------------------------------------------------
    def run(self, roots: Iterable[str | os.PathLike[str]], excludes: Sequence[str] = (), reindex: bool = False,
            retry_failed: bool = False) -> IndexReport:
        from filelock import FileLock

        started = time.monotonic()
        report = IndexReport(self.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.dir / ".lock")):
            with self.open(reindex) as store:
                self._run(store, [os.path.abspath(os.fspath(r)) for r in roots], excludes, retry_failed, report)
                report.vectors = store.counts()["vectors"]
        report.elapsed_s = time.monotonic() - started
        return report

    def _run(self, store: IndexStore, roots: list[str], excludes: Sequence[str], retry_failed: bool,
             report: IndexReport) -> None:
        from feature_extraction.images.walk import collect_images
        from models.core.home import ldot_home

        for root in roots:
            if not os.path.exists(root):
                raise LdotError(f"{root} does not exist: give a folder of images to index")
        self.stage("scanning", 0, None)
        issues: list[Any] = []
        sources = []
        for root in roots:
            for src in collect_images([root], exclude=[ldot_home()], on_issue=issues.append):
                if not _excluded(src.path, src.root, excludes):
                    sources.append(src)
        report.found = len(sources)
        self.stage("scanning", len(sources), len(sources))
        todo = self._plan(store, roots, sources, retry_failed, report)
        self._record_walk_issues(store, roots, issues, report)
        hashes = self._hash(todo)
        need = self._link_known(store, todo, hashes, report)
        self._encode_new(store, need, hashes, report)
        self._collect_garbage(store)
        self.stage("saving", 0, 1)
        report.faiss = store.sync_faiss(kind=None)
        self.stage("saving", 1, 1)

    def _plan(self, store: IndexStore, roots: list[str], sources: list[Any], retry_failed: bool,
              report: IndexReport) -> list[Any]:
        """Sources that need work; forgets files that are gone."""
        todo, seen = [], set()
        known: dict[bytes, Any] = {}
        for root in roots:
            known.update(store.files_under(os.fsencode(root)))
        for src in sources:
            path = os.fsencode(src.path)
            seen.add(path)
            row = known.get(path)
            if row is not None and (row.size, row.mtime_ns) == (src.size, src.mtime_ns):
                if row.status == "indexed" or (row.status == "skipped" and not retry_failed and not row.retry):
                    report.unchanged += 1
                    continue
            todo.append(src)
        gone = [p for p in known if p not in seen]
        if gone:
            with store.transaction() as db:
                store.delete_files(db, gone)
            report.removed = len(gone)
        return todo

    def _record_walk_issues(self, store: IndexStore, roots: list[str], issues: list[Any], report: IndexReport) -> None:
        if not issues:
            return
        rows = []
        for issue in issues:
            root = next((r for r in roots if issue.path == r or issue.path.startswith(r.rstrip(os.sep) + os.sep)),
                        roots[0])
            rows.append(FileRow(os.fsencode(issue.path), os.fsencode(root), 0, 0, None, "skipped", issue.reason, 0,
                                None))
            report.skipped.append((issue.path, issue.reason))
        with store.transaction() as db:
            store.put_files(db, rows)

    def _hash(self, todo: list[Any]) -> dict[str, str]:
        hashes: dict[str, str] = {}
        if not todo:
            return hashes
        self.stage("hashing", 0, len(todo))
        for i, src in enumerate(todo):
            try:
                hashes[src.path] = sha256_file(src.path)
            except OSError:
                pass  # unreadable: the extraction step reports why
            if i % 64 == 63:
                self.stage("hashing", i + 1, len(todo))
        self.stage("hashing", len(todo), len(todo))
        return hashes

    def _link_known(self, store: IndexStore, todo: list[Any], hashes: dict[str, str],
                    report: IndexReport) -> list[Any]:
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

    def _encode_new(self, store: IndexStore, need: list[Any], hashes: dict[str, str], report: IndexReport) -> None:
        """Extract and encode one file per unknown content; commit vectors + file rows per batch."""
        if not need:
            return
        by_hash: dict[str, list[Any]] = {}
        unreadable = []
        for src in need:
            digest = hashes.get(src.path)
            if digest is None:
                unreadable.append(src)
            else:
                by_hash.setdefault(digest, []).append(src)
        firsts = [group[0] for group in by_hash.values()]
        self.stage("extracting", 0, None)  # stages show in this order; totals come when known
        self.stage("encoding", 0, len(firsts))
        regions_dir = self.dir / (REGIONS_DIR if self.keep_regions else STAGING_DIR)
        pending = Batcher(self, store, by_hash, report, total=len(firsts))
        # contents whose regions an interrupted run already extracted: encode straight away
        fresh = firsts
        if regions_dir.is_dir():
            from feature_extraction.uniter_db import FeatureStore

            cached = FeatureStore(regions_dir, self.preset)
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
        self.stage("extracting", len(fresh), len(fresh))
        self.stage("encoding", report.encoded, report.encoded)  # files that failed extraction drop out
        if unreadable:
            self._skip(store, [(src, None, "unreadable file", True) for src in unreadable], report)
        if not self.keep_regions:
            shutil.rmtree(regions_dir, ignore_errors=True)

    def _extract(self, sources: list[Any], hashes: dict[str, str], regions_dir: Path, pending: Batcher,
                 report: IndexReport) -> None:
        from feature_extraction.pipeline import extract_to_db

        total = len(sources)
        state = {"done": 0}

        def on_batch(items: list[tuple[Any, Any]]) -> None:
            for src, regions in items:
                pending.add(src.key, regions)
            pending.flush()

        def on_progress(p: Any) -> None:
            state["done"] = p.done
            self.stage("extracting", p.done, total)

        result = extract_to_db([s.path for s in sources], regions_dir, self.detector, self.preset,
                               key_fn=lambda path, root: hashes[path], batch_size=self.batch_size,
                               num_workers=self.num_workers, progress=on_progress, on_batch=on_batch,
                               retry_failed=True)
        by_path = {s.path: s for s in sources}
        failed = [(by_path[f.path], hashes[f.path], f.reason, not f.permanent)
                  for f in result.failures if f.path in by_path]
        self._skip(pending.store, failed, report)

    def _skip(self, store: IndexStore, failed: list[tuple[Any, str | None, str, bool]], report: IndexReport) -> None:
        rows = []
        for src, digest, reason, retry in failed:
            rows.append(file_row(src, digest, None, reason, retry))
            report.skipped.append((src.path, reason))
        if rows:
            with store.transaction() as db:
                store.put_files(db, rows)

    def _collect_garbage(self, store: IndexStore) -> None:
        orphans = store.orphan_vectors()
        if orphans:
            with store.transaction() as db:
                store.delete_vectors(db, [vid for vid, _ in orphans])
            if self.keep_regions and (self.dir / REGIONS_DIR).is_dir():
                from feature_extraction.uniter_db import UniterImageDBWriter

                with UniterImageDBWriter(self.dir / REGIONS_DIR, self.preset) as writer:
                    writer.delete([digest for _, digest in orphans])
                    writer.commit()

    def maybe_flush(self, store: IndexStore) -> None:
        if time.monotonic() - self.last_flush > FAISS_FLUSH_S:
            store.sync_faiss()
            self.last_flush = time.monotonic()


class Batcher:
    """Collects extracted region sets, encodes them in batches, commits vectors and file rows."""

    def __init__(self, indexer: Indexer, store: IndexStore, by_hash: dict[str, list[Any]], report: IndexReport,
                 total: int | None = None) -> None:
        self.indexer, self.store, self.by_hash, self.report = indexer, store, by_hash, report
        self.total = total
        self.items: list[tuple[str, Any]] = []

    def add(self, digest: str, regions: Any) -> None:
        self.items.append((digest, regions))
        if len(self.items) >= 64:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        items, self.items = self.items, []
        vectors = self.indexer.encoder.encode_images([r for _, r in items]).numpy()
        store = self.store
        with store.transaction() as db:
            if store.get_meta("dim") is None:
                store.set_meta({"dim": str(vectors.shape[1])}, db)
            for (digest, regions), vector in zip(items, vectors):
                vid = store.add_vector(db, digest, vector, len(regions.features))
                store.put_files(db, [file_row(src, digest, vid) for src in self.by_hash[digest]])
                self.report.encoded += 1
        self.indexer.stage("encoding", self.report.encoded, self.total)
        self.indexer.maybe_flush(store)


def file_row(src: Any, digest: str | None, vector_id: int | None, reason: str | None = None,
             retry: bool = False) -> FileRow:
    """The row of a walked file: indexed (with its vector) or skipped (with the reason)."""
    status = "indexed" if vector_id is not None else "skipped"
    return FileRow(os.fsencode(src.path), os.fsencode(src.root), src.size, src.mtime_ns, digest, status, reason,
                   int(retry), vector_id)


def encode_image_file(path: Path, store: IndexStore, device: str = "auto") -> np.ndarray:
    """Detector + image tower for one image outside the index (``ldot search --image``), on the same
    stored form of its regions the index encodes."""
    from feature_extraction.images.decode import load_image
    from feature_extraction.uniter_db import record_view, regions_to_record, resolve_cut
    from models.hub.load import load_bi_encoder

    meta = store.meta()
    detector = open_detector(meta["detector"], device)
    rgb = load_image(path)
    regions = detector.extract([detector.preprocess(rgb)], meta["preset"])[0]
    record = record_view(regions_to_record(regions, resolve_cut(meta["preset"])))
    encoder = load_bi_encoder(meta["model"], device=device, towers=("image",))
    return encoder.encode_images([record]).numpy()[0]
