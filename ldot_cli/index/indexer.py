"""`ldot index`: walk folders, extract region features, encode images, and keep the index in step.

Incremental: a file whose size and mtime are unchanged costs nothing; a new or changed file is hashed,
and its content hash decides whether any model work is needed (a moved or copied file reuses the
vector of the same bytes). Each batch of new vectors is committed with its file rows in one SQLite
transaction, so an interrupted run (Ctrl-C, kill -9) loses at most that batch and a re-run completes
it; region features already extracted for the batch in flight are reused from the region store.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from feature_extraction.errors import ImageDBError
from ldot_cli.index.catalogue import FileRow
from ldot_cli.index.hits import display_path
from ldot_cli.index.layout import DB_FILE, DEFAULT_PRESET, LOCK_FILE, REGIONS_DIR, IndexStoreError, index_path
from ldot_cli.index.lock import lock_holder, writer_lock
from ldot_cli.index.meta import IndexMeta
from ldot_cli.index.options import IndexOptions
from ldot_cli.index.runs import (
    FAISS_FLUSH_S,
    STAGING_DIR,
    Executor,
    IndexReport,
    Scan,
    WalkedFile,
    excluded,
    file_row,
    under,
)
from ldot_cli.index.store import IndexStore
from models.core.errors import LdotError, LdotWarning, option
from models.core.progress import ProgressFn
from models.core.progress import report as report_progress
from models.hub.catalogue import DEFAULT_DETECTOR


class Indexer:
    """One indexing run over some inputs into one named index (holds the index lock throughout).

    The model work runs in this process (`encoding.LocalExecutor`) or on a Ray cluster
    (`distributed.RayExecutor`, ``options.ray``); what every run shares is here: the choices of model,
    detector and preset, opening the index, the files' rows, garbage collection and saving the vector files.
    ``detector``: a ready detector object (anything with the pipeline's ``extract()``) instead of
    ``options.detector``.
    """

    def __init__(self, name: str = "default", options: IndexOptions | None = None, detector: Any = None,
                 progress: ProgressFn | None = None) -> None:
        from feature_extraction.uniter_db import resolve_cut

        self.name = name
        self.dir = index_path(name)
        self.options = options = options or IndexOptions()
        if options.preset is not None:
            resolve_cut(options.preset)  # an unknown preset fails here, before any folder or download
        self._detector: Any = detector
        self.detector_arg = options.detector if detector is None else getattr(detector, "name", type(detector).__name__)
        self.progress = progress
        self.keep_regions = options.keep_regions is not False
        self.pixels = False  # the model reads pixels (set by `open`)
        self.detector_name: str | None = None
        self.preset = options.preset or DEFAULT_PRESET
        self.model = ""
        self.model_reason: str | None = None  # why the default model was chosen (a new index given no model)
        self._default_model: str | None = None
        self._encoder: Any = None
        self.last_flush = time.monotonic()
        if options.ray is not None:
            from ldot_cli.index.distributed import RayExecutor

            self.executor: Executor = RayExecutor(self, options.ray)
        else:
            from ldot_cli.index.encoding import LocalExecutor

            self.executor = LocalExecutor(self)

    def stage(self, stage: str, done: int, total: int | None) -> None:
        """Report how far a stage has come (see `models.core.progress`)."""
        report_progress(self.progress, stage, done, total, "files" if stage == "scanning" else "images")

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
        model = self.options.model or meta.model
        if not model:
            if self._default_model is None:
                from models.hub.installed import default_bi_encoder

                self._default_model, self.model_reason = default_bi_encoder()
            model = self._default_model
        detector = self.detector_arg or meta.detector or DEFAULT_DETECTOR
        preset = self.options.preset or meta.box_preset
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
            return self.options.keep_regions is not False
        if self.options.keep_regions is not None:
            return self.options.keep_regions
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
                if not excluded(src.path, src.root, excludes):
                    sources.append(src)
                    counts[root] += 1
        self.stage("scanning", len(sources), len(sources))
        if not sources and not issues and not (self.dir / DB_FILE).is_file():
            raise LdotError(f"no images found under {', '.join(display_path(os.fsencode(r)) for r in absolute)} "
                            "(looked for .jpg, .jpeg, .png, .webp, .bmp, .gif, .tif and similar files): "
                            "nothing to index")
        for root, count in counts.items():
            if count == 0 and not any(under(i.path, root) for i in issues):
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
        if self.options.ann:
            store.update_meta(ann_mode=self.options.ann)
        if self.options.memory_budget:
            store.update_meta(memory_budget=self.options.memory_budget)
        return model

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from models.hub.load import load_bi_encoder

            self._encoder = load_bi_encoder(self.model, device=self.options.device, towers=("image",))
        return self._encoder

    @property
    def detector(self) -> Any:
        if self._detector is None:
            if self.detector_name is None:
                raise LdotError(f"index {self.name!r} keeps no region features: it has no detector to run")
            from feature_extraction.detector.weights import open_detector  # torchvision: only for region features

            self._detector = open_detector(self.detector_name, self.options.device)
        return self._detector

    # -- the run -------------------------------------------------------------------------------------
    def plan(self, paths: Iterable[str | os.PathLike[str]], excludes: Sequence[str] = ()) -> Any:
        """Look at the inputs before anything is created or downloaded (a typo fails here): the executor's plan."""
        return self.executor.plan([os.fspath(p) for p in paths], tuple(excludes))

    def run(self, paths: Iterable[str | os.PathLike[str]], excludes: Sequence[str] = (), reindex: bool = False,
            retry_failed: bool = False, plan: Any = None) -> IndexReport:
        """Bring the index in step with the inputs. ``retry_failed``: try files skipped by earlier runs again
        even though they did not change. ``plan``: the result of `plan` when the caller looked first."""
        started = time.monotonic()
        report = IndexReport(self.name)
        plan = plan if plan is not None else self.plan(paths, excludes)
        self.dir.mkdir(parents=True, exist_ok=True)
        with writer_lock(self.dir):
            with self.open(reindex) as store:
                try:
                    self.executor.run(store, plan, tuple(excludes), retry_failed, reindex, report)
                except ImageDBError as exc:
                    raise damaged_regions(self.name, exc) from None
                counts = store.counts()
                report.images, report.vectors = counts.get("indexed", 0), counts["vectors"]
        report.elapsed_s = time.monotonic() - started
        return report

    # -- steps every executor takes ------------------------------------------------------------------
    def plan_files(self, store: IndexStore, scan: Scan, retry_failed: bool, report: IndexReport) -> list[WalkedFile]:
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

    def record_walk_issues(self, store: IndexStore, scan: Scan, report: IndexReport) -> None:
        if not scan.issues:
            return
        rows = []
        for issue in scan.issues:
            root = next((r for r in scan.roots if under(issue.path, r)), scan.roots[0])
            rows.append(FileRow(os.fsencode(issue.path), os.fsencode(root), 0, 0, None, "skipped", issue.reason, 0,
                                None))
            report.skipped.append((issue.path, issue.reason))
        with store.transaction() as db:
            store.put_files(db, rows)

    def skip(self, store: IndexStore, failed: Sequence[tuple[WalkedFile, str | None, str, bool]], report: IndexReport) -> None:
        rows = []
        for src, digest, reason, retry in failed:
            rows.append(file_row(src, digest, None, reason, retry))
            report.skipped.append((src.path, reason))
        if rows:
            with store.transaction() as db:
                store.put_files(db, rows)

    def collect_garbage(self, store: IndexStore) -> None:
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

    def save(self, store: IndexStore, report: IndexReport) -> None:
        """Bring the vector files in step with the catalogue (the run's last step)."""
        self.stage("saving", 0, 1)
        report.faiss = store.sync_faiss(kind=None)
        self.stage("saving", 1, 1)


def damaged_regions(name: str, exc: ImageDBError) -> IndexStoreError:
    """A damaged region store: its file, what is wrong, and the way out."""
    return IndexStoreError(f"the region store of index {name!r} is damaged ({exc}): rebuild the index with "
                       f"`ldot index FOLDER --name {name} --reindex`")


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


def encode_image_file(path: Path, store: IndexStore, device: str = "auto") -> np.ndarray:
    """Detector + image tower for one image outside the index (``ldot search --image``), on the same
    stored form of its regions the index encodes."""
    from feature_extraction.detector.weights import open_detector
    from feature_extraction.images.decode import load_image
    from feature_extraction.uniter_db import record_view, regions_to_record, resolve_cut
    from models.hub.load import load_bi_encoder

    meta = store.meta
    if meta.detector is None or meta.model is None:
        raise IndexStoreError(f"index {store.name!r} was built without a detector: its images are encoded from "
                              "their pixels")
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
