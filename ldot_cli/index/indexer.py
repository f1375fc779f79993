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
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feature_extraction.detector.weights import open_detector
from feature_extraction.errors import ImageDBError
from ldot_cli.index import hooks
from ldot_cli.index.catalogue import FileRow
from ldot_cli.index.hits import display_path
from ldot_cli.index.layout import DB_FILE, LOCK_FILE, REGIONS_DIR, IndexStoreError, index_path
from ldot_cli.index.lock import lock_holder, writer_lock
from ldot_cli.index.meta import IndexMeta
from ldot_cli.index.store import IndexStore
from models.core.errors import LdotError, LdotWarning, option
from models.core.fileio import sha256_file
from models.core.progress import ProgressFn
from models.core.progress import report as report_progress
from models.hub.catalogue import DEFAULT_DETECTOR

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


@dataclass
class Scan:
    """The walk of the roots, done before anything is created or downloaded."""

    roots: list[str]
    sources: list[Any]
    issues: list[Any]


def _excluded(path: str, root: str, patterns: Sequence[str]) -> bool:
    rel = os.path.relpath(path, root)
    parts = rel.split(os.sep)
    return any(fnmatch.fnmatch(rel, p) or any(fnmatch.fnmatch(part, p) for part in parts) for p in patterns)


class Indexer:
    """One indexing run over some roots into one named index (holds the index lock throughout).

    ``model``, ``detector`` and ``preset`` default to the ones the index was built with (recorded in
    it), and for a new index to the defaults (`models.hub.cache.default_bi_encoder`: flickr-ft when it is in the
    cache, else clip-vit-b32; `DEFAULT_DETECTOR`, `DEFAULT_PRESET`). A dual encoder (CLIP, SigLIP) reads pixels:
    no detector runs unless region features are kept (``keep_regions=True``).
    """

    def stage(self, stage: str, done: int, total: int | None) -> None:
        """Report how far a stage has come (see `models.core.progress`)."""
        report_progress(self.progress, stage, done, total, "files" if stage == "scanning" else "images")

    def __init__(self, name: str = "default", model: str | None = None, detector: Any = None,
                 preset: str | None = None, keep_regions: bool | None = None, device: str = "auto",
                 batch_size: int = 8, num_workers: int = 2, progress: ProgressFn | None = None,
                 ann: str | None = None) -> None:
        from feature_extraction.uniter_db import resolve_cut

        self.name = name
        self.dir = index_path(name)
        if preset is not None:
            resolve_cut(preset)  # an unknown preset fails here, before any folder or download
        self.model_arg, self.preset_arg = model, preset
        # a registry name or path, or a ready detector object (anything with the pipeline's extract())
        self.detector_arg: str | None = None
        self._detector: Any = None
        if isinstance(detector, str) or detector is None:
            self.detector_arg = detector
        else:
            self._detector = detector
            self.detector_arg = getattr(detector, "name", type(detector).__name__)
        # None: the model's way (a region model keeps its region features; a dual encoder, which reads pixels,
        # extracts none unless asked, or the index already has them)
        self.regions_arg: bool | None = keep_regions
        self.keep_regions = True if keep_regions is None else keep_regions
        self.device = device
        self.pixels = False  # the model reads pixels (set by `open`)
        self.model_reason: str | None = None  # why the default model was chosen (a new index given no model)
        self._default_model: str | None = None
        self.batch_size, self.num_workers = batch_size, num_workers
        self.progress = progress
        self.ann = ann
        self.memory_budget: int | None = None  # bytes the vector index may take (None: half the RAM)
        self._encoder: Any = None
        self.last_flush = time.monotonic()

    # -- what the run will use -------------------------------------------------------------------
    def recorded(self, reindex: bool = False) -> IndexMeta:
        """The index's own meta (model, detector, preset…); empty for a new index (or one being rebuilt
        whose database cannot be read)."""
        if not (self.dir / DB_FILE).is_file():
            return IndexMeta()
        try:
            with IndexStore(self.dir) as store:
                return store.meta
        except IndexStoreError:
            if reindex:
                return IndexMeta()
            raise

    def choices(self, reindex: bool = False) -> tuple[str, str, str]:
        """(model, detector, preset) this run uses: as given, else the index's own, else the defaults."""
        meta = self.recorded(reindex)
        model = self.model_arg or meta.model
        if not model:
            if self._default_model is None:
                from models.hub.cache import default_bi_encoder

                self._default_model, self.model_reason = default_bi_encoder()
            model = self._default_model
        detector = self.detector_arg or meta.detector or DEFAULT_DETECTOR
        preset = self.preset_arg or meta.box_preset
        return model, detector, preset

    def needed_models(self, reindex: bool = False) -> list[str]:
        """Model names this run loads (for the caller to download first); a ready detector object needs none, nor
        does a dual encoder's index that keeps no region features."""
        from models.hub.load import model_inputs

        model, detector, _ = self.choices(reindex)
        if self._detector is not None or (model_inputs(model) == "pixels" and not self._wants_regions(model, reindex)):
            return [model]
        return [detector, model]

    def _wants_regions(self, model: str, reindex: bool = False) -> bool:
        """Whether this run keeps region features: for a region model unless told not to (its vectors need the
        detector anyway); for a dual encoder when asked (``ldot index --regions``) or when the index keeps them."""
        from models.hub.load import model_inputs

        if model_inputs(model) != "pixels":
            return self.regions_arg is not False
        if self.regions_arg is not None:
            return self.regions_arg
        return self.recorded(reindex).regions == "kept"

    # -- inputs --------------------------------------------------------------------------------------
    def scan(self, roots: Iterable[str | os.PathLike[str]], excludes: Sequence[str] = ()) -> Scan:
        """Walk the roots (before anything is created or downloaded).

        Raises `LdotError` for a missing root, and when nothing at all is found for an index that does not
        exist yet (an empty folder would only leave an empty index behind). Warns about an empty root.
        """
        from feature_extraction.images.decode import looks_like_image
        from feature_extraction.images.walk import collect_images
        from models.core.home import ldot_home

        absolute = [os.path.abspath(os.fspath(r)) for r in roots]
        for root in absolute:
            if not os.path.exists(root):
                raise LdotError(f"{display_path(os.fsencode(root))} does not exist: give a folder of images to index")
            if os.path.isfile(root) and not looks_like_image(root):
                raise LdotError(f"{display_path(os.fsencode(root))} is a file but not an image: give a folder of "
                                f"images or image files (with {option('ray')} also a file list or tar shards)")
        self.stage("scanning", 0, None)
        issues: list[Any] = []
        sources = []
        counts = dict.fromkeys(absolute, 0)
        for root in absolute:
            for src in collect_images([root], exclude=[ldot_home()], on_issue=issues.append):
                if not _excluded(src.path, src.root, excludes):
                    sources.append(src)
                    counts[root] += 1
        self.stage("scanning", len(sources), len(sources))
        if not sources and not issues and not (self.dir / DB_FILE).is_file():
            raise LdotError(f"no images found under {', '.join(display_path(os.fsencode(r)) for r in absolute)} "
                            "(looked for .jpg, .jpeg, .png, .webp, .bmp, .gif, .tif and similar files): "
                            "nothing to index")
        for root, count in counts.items():
            if count == 0 and not any(_under(i.path, root) for i in issues):
                warnings.warn(LdotWarning(f"no images found under {display_path(os.fsencode(root))}"), stacklevel=2)
        return Scan(absolute, sources, issues)

    # -- setup -------------------------------------------------------------------------------------
    def open(self, reindex: bool) -> IndexStore:
        model, detector, preset = self.choices(reindex)
        if reindex and self.dir.exists():
            for child in self.dir.iterdir():
                if not child.name.startswith(LOCK_FILE):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        from models.hub.load import model_inputs

        self.pixels = model_inputs(model) == "pixels"
        self.keep_regions = self._wants_regions(model, reindex)
        store = IndexStore(self.dir, create=True)
        self.detector_name = detector if self.keep_regions or not self.pixels else None
        self.preset = preset
        self.model = self._resolve_model(store, model)
        return store

    def _resolve_model(self, store: IndexStore, model: str) -> str:
        from models.hub.load import fingerprint

        meta = store.meta
        recorded = meta.model
        want = fingerprint(model)
        if recorded is not None and meta.model_fingerprint != want:
            raise IndexStoreError(f"index {self.name!r} holds vectors of model {recorded!r}; {model!r} is another "
                                  f"model: add {option('reindex')} to rebuild it with {model!r} (or use another "
                                  f"{option('name')})")
        detector = meta.detector
        if (detector is not None and self.detector_name is not None
                and (detector, meta.preset) != (self.detector_name, self.preset)):
            raise IndexStoreError(f"index {self.name!r} was built with detector {detector!r} preset "
                                  f"{meta.preset!r}: add {option('reindex')} to change them")
        store.update_meta(model=model, model_fingerprint=want, preset=self.preset,
                          regions="kept" if self.keep_regions else "none")
        if self.detector_name is not None:  # a dual encoder's index without region features runs no detector
            store.update_meta(detector=self.detector_name)
        if self.ann:
            store.update_meta(ann_mode=self.ann)
        if self.memory_budget:
            store.update_meta(memory_budget=self.memory_budget)
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
            retry_failed: bool = False, scan: Scan | None = None) -> IndexReport:
        """Bring the index in step with the roots. ``retry_failed``: try files skipped by earlier runs
        again even though they did not change. ``scan``: the result of `scan` when the caller walked first."""
        started = time.monotonic()
        report = IndexReport(self.name)
        scan = scan or self.scan(roots, excludes)
        return self._locked_run(reindex, report, started, lambda store: self._run(store, scan, retry_failed, report))

    def _locked_run(self, reindex: bool, report: IndexReport, started: float,
                    work: Callable[[IndexStore], None]) -> IndexReport:
        """``work`` on the open store under the writer lock (a damaged region store named with the fix), then the
        report's totals and time: what every way of running an index (plain, Ray) shares."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with writer_lock(self.dir):
            with self.open(reindex) as store:
                try:
                    work(store)
                except ImageDBError as exc:
                    raise damaged_regions(self.name, exc) from None
                counts = store.counts()
                report.images, report.vectors = counts.get("indexed", 0), counts["vectors"]
        report.elapsed_s = time.monotonic() - started
        return report

    def _run(self, store: IndexStore, scan: Scan, retry_failed: bool, report: IndexReport) -> None:
        report.found = len(scan.sources) + len(scan.issues)
        todo = self._plan(store, scan, retry_failed, report)
        self._record_walk_issues(store, scan, report)
        hashes = self._hash(todo)
        need = self._link_known(store, todo, hashes, report)
        self._encode_new(store, need, hashes, report)
        self._collect_garbage(store)
        self.stage("saving", 0, 1)
        report.faiss = store.sync_faiss(kind=None)
        self.stage("saving", 1, 1)

    def _plan(self, store: IndexStore, scan: Scan, retry_failed: bool, report: IndexReport) -> list[Any]:
        """Sources that need work; forgets files that are gone."""
        todo, seen = [], {os.fsencode(i.path) for i in scan.issues}
        known: dict[bytes, Any] = {}
        for root in scan.roots:
            known.update(store.files_under(os.fsencode(root)))
        for src in scan.sources:
            path = os.fsencode(src.path)
            seen.add(path)
            row = known.get(path)
            if row is not None and (row.size, row.mtime_ns) == (src.size, src.mtime_ns):
                if row.status == "indexed":
                    report.unchanged += 1
                    continue
                if row.status == "skipped" and not retry_failed and not row.retry:
                    report.skipped_before += 1
                    continue
            todo.append(src)
        gone = [p for p in known if p not in seen]
        if gone:
            with store.transaction() as db:
                store.delete_files(db, gone)
            report.removed += len(gone)
        return todo

    def _record_walk_issues(self, store: IndexStore, scan: Scan, report: IndexReport) -> None:
        if not scan.issues:
            return
        rows = []
        for issue in scan.issues:
            root = next((r for r in scan.roots if _under(issue.path, r)), scan.roots[0])
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
        """Extract and encode one file per unknown content; commit vectors + file rows per batch.

        Files with the same bytes share the outcome of the one that is extracted: one vector, or one
        skip reason each (every file keeps its own row, so an unchanged bad file is not hashed again).
        """
        if not need:
            return
        if self.pixels:
            self._encode_pixels(store, need, hashes, report)
            return
        by_hash, unreadable = _by_content(need, hashes)
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
        self.stage("encoding", pending.done, pending.done)  # files that failed extraction drop out
        if unreadable:
            self._skip(store, [(src, None, "unreadable file", True) for src in unreadable], report)
        if not self.keep_regions:
            shutil.rmtree(regions_dir, ignore_errors=True)

    def _encode_pixels(self, store: IndexStore, need: list[Any], hashes: dict[str, str], report: IndexReport) -> None:
        """A dual encoder's way: decode and preprocess in worker processes (the model's own image processor),
        encode in batches, commit vectors + file rows per batch; no detector unless region features are kept
        (``ldot index --regions``, for a region cross-encoder), which are extracted after the vectors."""
        from feature_extraction.images.pool import DecodeFailure, iter_decoded

        by_hash, unreadable = _by_content(need, hashes)
        firsts = [group[0] for group in by_hash.values()]
        self.stage("encoding", 0, len(firsts))
        pending = Batcher(self, store, by_hash, report, total=len(firsts), size=PIXEL_BATCH)
        failed = []
        decoded = iter_decoded([s.path for s in firsts], self.encoder.pixel_preprocess, num_workers=self.num_workers,
                               max_in_flight=2 * PIXEL_BATCH)
        for item in decoded:
            digest = hashes[firsts[item.index].path]
            if isinstance(item, DecodeFailure):
                failed += [(member, digest, item.reason, not item.permanent) for member in by_hash[digest]]
                continue
            pending.add(digest, item)
        pending.flush()
        self._skip(store, failed, report)
        self.stage("encoding", pending.done, pending.done)
        if unreadable:
            self._skip(store, [(src, None, "unreadable file", True) for src in unreadable], report)
        if self.keep_regions:
            self._extract_regions(store, [s for s in firsts if store.vector_for_hash(hashes[s.path]) is not None],
                                  hashes)

    def _extract_regions(self, store: IndexStore, sources: list[Any], hashes: dict[str, str]) -> None:
        """Region features of images already encoded from their pixels (kept for a region cross-encoder)."""
        from feature_extraction.pipeline import extract_to_db

        regions_dir = self.dir / REGIONS_DIR
        if regions_dir.is_dir():
            from feature_extraction.uniter_db import FeatureStore

            cached = FeatureStore(regions_dir, self.preset)
            try:
                sources = [s for s in sources if hashes[s.path] not in cached]
            finally:
                cached.close()
        if not sources:
            return
        total = len(sources)
        self.stage("extracting", 0, total)
        result = extract_to_db([s.path for s in sources], regions_dir, self.detector, self.preset,
                               key_fn=lambda path, root: hashes[path], batch_size=self.batch_size,
                               num_workers=self.num_workers, progress=lambda p: self.stage("extracting", p.done, total),
                               retry_failed=True)
        self.stage("extracting", total, total)
        if result.failures:
            warnings.warn(LdotWarning(f"{len(result.failures)} indexed images have no region features (first: "
                                      f"{result.failures[0].reason}): a region cross-encoder cannot re-rank them"),
                          stacklevel=2)

    def _extract(self, sources: list[Any], hashes: dict[str, str], regions_dir: Path, pending: Batcher,
                 report: IndexReport) -> None:
        from feature_extraction.pipeline import extract_to_db

        total = len(sources)

        def on_batch(items: list[tuple[Any, Any]]) -> None:
            for src, regions in items:
                pending.add(src.key, regions)
            pending.flush()

        def on_progress(p: Any) -> None:
            self.stage("extracting", p.done, total)

        result = extract_to_db([s.path for s in sources], regions_dir, self.detector, self.preset,
                               key_fn=lambda path, root: hashes[path], batch_size=self.batch_size,
                               num_workers=self.num_workers, progress=on_progress, on_batch=on_batch,
                               retry_failed=True)
        by_path = {s.path: s for s in sources}
        failed = []
        for f in result.failures:
            if f.path in by_path:
                digest = hashes[f.path]
                failed += [(member, digest, f.reason, not f.permanent) for member in pending.by_hash[digest]]
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
        """Drop vectors no file points to, then every region record no vector points to.

        SQLite is the source of truth: the region store is swept against it on every run, so records left
        behind by a run killed between the two steps are collected by the next one.
        """
        orphans = store.orphan_vectors()
        if orphans:
            with store.transaction() as db:
                store.delete_vectors(db, [vid for vid, _ in orphans])
        from ldot_cli.index.thumbs import collect_thumbnails

        live = store.content_hash_set()
        if self.keep_regions:
            collect_regions(self.dir / REGIONS_DIR, self.preset, live)
        collect_thumbnails(self.dir, live)

    def maybe_flush(self, store: IndexStore) -> None:
        if time.monotonic() - self.last_flush > FAISS_FLUSH_S:
            store.sync_faiss()
            self.last_flush = time.monotonic()


def damaged_regions(name: str, exc: ImageDBError) -> IndexStoreError:
    """A damaged region store: its file, what is wrong, and the way out."""
    return IndexStoreError(f"the region store of index {name!r} is damaged ({exc}): rebuild the index with "
                       f"`ldot index FOLDER --name {name} --reindex`")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resumable(name: str) -> tuple[int, int]:
    """What a re-run of an interrupted `ldot index` reuses: (images in the index, contents whose regions were
    extracted but not yet encoded: the re-run encodes them without the detector)."""
    from feature_extraction.uniter_db import UniterImageDB, resolve_cut

    directory = index_path(name)
    if not (directory / DB_FILE).is_file():
        return 0, 0
    with IndexStore(directory) as store:
        images = store.counts().get("indexed", 0)
        live = store.content_hash_set()
        preset = store.meta.box_preset
    extracted = 0
    for sub in (REGIONS_DIR, STAGING_DIR):
        if (directory / sub / resolve_cut(preset).db_name() / "data.mdb").is_file():
            with UniterImageDB(directory / sub, preset) as reader:
                extracted += sum(1 for key in reader.keys() if key not in live)
    return images, extracted


def collect_regions(regions_dir: Path, preset: str, live: set[str]) -> int:
    """Delete the region records of ``regions_dir`` whose key is not in ``live``; returns how many."""
    from feature_extraction.uniter_db import (
        UniterImageDB,
        UniterImageDBWriter,
        resolve_cut,
    )

    if not (regions_dir / resolve_cut(preset).db_name() / "data.mdb").is_file():
        return 0  # no region records yet
    with UniterImageDB(regions_dir, preset) as reader:
        dead = [key for key in reader.keys() if key not in live]
    if not dead:
        return 0
    with UniterImageDBWriter(regions_dir, preset) as writer:
        removed = writer.delete(dead)
        writer.commit()
    return removed


def _by_content(need: list[Any], hashes: dict[str, str]) -> tuple[dict[str, list[Any]], list[Any]]:
    """The files to encode grouped by content hash (each content is encoded once), and those that could not be
    hashed (unreadable)."""
    by_hash: dict[str, list[Any]] = {}
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
    rows."""

    def __init__(self, indexer: Indexer, store: IndexStore, by_hash: dict[str, list[Any]], report: IndexReport,
                 total: int | None = None, size: int = 64) -> None:
        self.indexer, self.store, self.by_hash, self.report = indexer, store, by_hash, report
        self.total, self.size = total, size
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
        vectors = self.indexer.encoder.encode_images([r for _, r in items]).numpy()
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
        self.indexer.stage("encoding", self.done, self.total)
        hooks.fire(hooks.committed, self.done)
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

    meta = store.meta
    detector = open_detector(meta.detector, device)
    rgb = load_image(path)
    regions = detector.extract([detector.preprocess(rgb)], meta.box_preset)[0]
    record = record_view(regions_to_record(regions, resolve_cut(meta.box_preset)))
    encoder = load_bi_encoder(meta.model, device=device, towers=("image",))
    return encoder.encode_images([record]).numpy()[0]


def remove_index(name: str) -> Path:
    """Delete a named index (refused while another process is updating it). Returns where it was."""
    from models.core.fileio import fsync_path

    directory = index_path(name)
    if not directory.is_dir():
        raise IndexStoreError(f"no index named {name!r} (looked in {directory}): see `ldot status`")
    with writer_lock(directory, wait=False) as held:
        if not held:
            raise IndexStoreError(f"index {name!r} is being updated by {lock_holder(directory)}: "
                              "wait for it to finish (or stop it), then remove it")
        doomed = directory.with_name(f".{directory.name}.removing-{os.getpid()}")
        os.replace(directory, doomed)  # gone at once for everyone; deleted below
        fsync_path(directory.parent)
    shutil.rmtree(doomed, ignore_errors=True)
    return directory


def remove_folder(name: str, folder: str | os.PathLike[str], progress: ProgressFn | None = None) -> int:
    """Drop every file under ``folder`` (a folder the index covers, or one inside it; with `ldot index --ray`
    also a file list, a tar shard or a tar SOURCE such as ``shards/{00000..00099}.tar``) from an index, with its
    vectors and region records when no other file shares them. Returns how many files were dropped.
    The folder itself need not exist any more."""
    directory = index_path(name)
    text = os.fspath(folder)
    if "://" in text and not text.startswith("file://"):  # a URL SOURCE of `ldot index --ray`: as given
        target = os.fsencode(text).rstrip(b"/")
    else:
        target = os.fsencode(os.path.abspath(text)).rstrip(b"/") or b"/"
    prefix = target + b"/" if target != b"/" else target
    member = target + b"#"  # the members of a tar shard (`ldot index --ray` names them SHARD#MEMBER)
    with IndexStore(directory) as probe:  # a clear error when there is no such index
        preset, keep = probe.meta.box_preset, probe.meta.keeps_regions
    with writer_lock(directory), IndexStore(directory) as store:
        paths = [p for (p,) in store.db.execute("SELECT path FROM files WHERE root = ? OR path = ? OR "
                                                "substr(path, 1, ?) = ? OR substr(path, 1, ?) = ?",
                                                (target, target, len(prefix), prefix, len(member), member))]
        if not paths:
            roots = ", ".join(display_path(r) for r, _ in store.roots()) or "none"
            raise IndexStoreError(f"index {name!r} holds no files under {display_path(target)} (its folders: {roots})")
        with store.transaction() as db:
            store.delete_files(db, paths)
            orphans = store.orphan_vectors()
            store.delete_vectors(db, [vid for vid, _ in orphans])
        if keep:
            try:
                collect_regions(directory / REGIONS_DIR, preset, store.content_hash_set())
            except ImageDBError as exc:
                raise damaged_regions(name, exc) from None
        report_progress(progress, "saving", 0, 1, "images")
        store.sync_faiss(kind=None)
        report_progress(progress, "saving", 1, 1, "images")
    return len(paths)
