"""Batched region-feature extraction of many image files into a UNITER image DB, resumable.

``extract_to_db`` walks the given paths, skips what the DB already holds (unchanged files)
and what failed before (unchanged known-bad files, unless ``retry_failed``), decodes and
preprocesses the rest in worker processes, runs the detector in batches and commits each
batch atomically with the files that failed in the meantime. Interrupt it at any point
(Ctrl-C, kill -9, power loss): a re-run finishes the job, having lost at most one batch.

The library never renders anything: pass ``progress`` (a `models.core.progress.ProgressFn`; stage
``extracting``, ``info`` holds written, failed, skipped and elapsed_s) to draw a progress bar.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from feature_extraction.errors import DetectorError
from feature_extraction.images.decode import DEFAULT_MAX_PIXELS
from feature_extraction.images.pool import (
    DecodedImage,
    DecodeFailure,
    PreprocessFn,
    iter_decoded,
)
from feature_extraction.images.walk import (
    ImageSource,
    KeyFn,
    WalkIssue,
    collect_images,
    suffixed_key,
)
from feature_extraction.types import RegionFeatures
from feature_extraction.uniter_db import (
    FailureRecord,
    ImageRecord,
    SourceStamp,
    UniterImageDBWriter,
    record_view,
    regions_to_record,
    resolve_cut,
)
from models.core.progress import ProgressFn
from models.core.progress import report as report_progress

if TYPE_CHECKING:
    import torch

DetectorInput = tuple["torch.Tensor", float, tuple[int, int]]  # ((3, h, w) float32 tensor, scale, (H, W))
_MAX_FAILED_BATCHES = 3  # consecutive batches on which every image failed in the detector: give up
_FAILURE_COMMIT_EVERY = 64  # commit staged failures at least this often even without a batch


@runtime_checkable
class RegionDetector(Protocol):
    """What the pipeline needs from a detector (``feature_extraction.detector.network`` provides one).

    ``preprocess`` runs in worker processes and must be importable by reference (a module-level
    function or a staticmethod); ``extract`` runs in the calling process.
    """

    def extract(self, batch: list[DetectorInput], preset: str,
                with_soft_labels: bool = False) -> list[RegionFeatures]:
        """One :class:`RegionFeatures` per input, in input order. A detector whose ``extract`` also takes
        ``on_image`` (called with the count done as each image of the batch is done) gets progress per image."""
        ...


# Called after each committed batch with the (source, record) pairs it stored, each record exactly as
# the DB reader returns it: lets a caller consume features as they land (``ldot index`` encodes and
# commits vectors batch by batch, with the same numbers a resumed run reads back).
BatchFn = Callable[[list[tuple[ImageSource, ImageRecord]]], None]


@dataclass(frozen=True)
class FileFailure:
    """A file that was not extracted, and why."""

    path: str
    key: str
    reason: str
    permanent: bool  # False: retried automatically by the next run (missing codec, detector error, ...)


@dataclass
class ExtractReport:
    """What one :func:`extract_to_db` run did."""

    db_path: Path  # the LMDB directory written
    candidates: int  # image files found under the inputs
    written: int = 0  # records committed by this run
    skipped_existing: int = 0  # already in the DB from an earlier run, file unchanged
    skipped_known_bad: int = 0  # failed in an earlier run, file unchanged, not retried
    failures: list[FileFailure] = field(default_factory=list)  # this run's failures
    walk_issues: list[WalkIssue] = field(default_factory=list)  # skipped while walking
    elapsed_s: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)


def extract_to_db(paths: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                  detector: RegionDetector, preset: str = "uniter", *, key_fn: KeyFn | None = None,
                  batch_size: int = 8, num_workers: int = 2, with_soft_labels: bool = False,
                  progress: ProgressFn | None = None, retry_failed: bool = False,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, decode_timeout_s: float | None = 60.0,
                  compress: bool = False, preprocess: PreprocessFn | None = None,
                  exclude: Iterable[str | os.PathLike[str]] = (), include_hidden: bool = False,
                  start_method: str | None = None, on_batch: BatchFn | None = None) -> ExtractReport:
    """Extract region features of every image under ``paths`` into the UNITER DB in ``out_dir``.

    Args:
        paths: image files and/or directories (walked recursively; see :mod:`.walk`).
        out_dir: the image DB directory (``<out_dir>/feat_th0.2_max100_min10`` for ``uniter``,
            ``<out_dir>/feat_numbb36`` for ``lxmert36``); created if needed.
        detector: a :class:`RegionDetector`.
        preset: ``uniter`` (10..100 boxes, conf > 0.2) or ``lxmert36`` (36 boxes).
        key_fn: ``(path, root) -> key``; default: the path relative to its input root.
        batch_size: images per detector call, and per committed transaction.
        num_workers: decode/preprocess processes (0: in this process, no timeout).
        with_soft_labels: also store the 1601-class soft labels (for MRC-kl pre-training).
        progress: a `models.core.progress.ProgressFn`, called after each commit (stage ``extracting``).
        retry_failed: retry files that failed before although unchanged.
        max_pixels: decompression-bomb cap (see :func:`~feature_extraction.images.decode.load_image`).
        decode_timeout_s: per-file decode+preprocess limit in workers.
        compress: write UNITER's ``_compressed`` variant (npz values).
        preprocess: the worker-side function; default ``detector.preprocess``, else
            ``feature_extraction.detector.network.preprocess``.
        exclude: more directories never walked (``out_dir`` and ``$LDOT_HOME`` always are).
        include_hidden: walk dot-files and dot-directories too.
        start_method: multiprocessing start method for the workers (default ``forkserver``).
        on_batch: called after each committed batch with its stored ``(source, regions)`` pairs.

    Raises:
        DBLockedError: another process is writing this DB.
        DetectorError: the detector failed on every image of several batches in a row.
    """
    started = time.monotonic()
    cut = resolve_cut(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    issues: list[WalkIssue] = []
    sources = collect_images(paths, exclude=[out, *_home_dirs(), *exclude], key_fn=key_fn,
                             include_hidden=include_hidden, on_issue=issues.append)
    prep = preprocess or _default_preprocess(detector)
    with UniterImageDBWriter(out, cut, compress=compress) as db:
        report = ExtractReport(db_path=db.db_path, candidates=len(sources), walk_issues=issues)
        todo = _plan(sources, db, retry_failed, report)
        run = _Run(db, detector, preset, todo, with_soft_labels, report, progress, on_batch)
        run.notify()
        decoded = iter_decoded([s.path for s in todo], prep, num_workers=num_workers, max_pixels=max_pixels,
                               timeout_s=decode_timeout_s, max_in_flight=max(2 * batch_size, 2 * num_workers),
                               start_method=start_method)
        run.consume(decoded, batch_size)
    report.elapsed_s = time.monotonic() - started
    return report


def _home_dirs() -> list[Path]:
    from models.core.home import ldot_home

    return [ldot_home()]


def _default_preprocess(detector: RegionDetector) -> PreprocessFn:
    fn = getattr(detector, "preprocess", None)
    if fn is not None:
        return fn
    from feature_extraction.detector.network import (
        preprocess,  # the real one, written alongside
    )

    return preprocess


def _plan(sources: Sequence[ImageSource], db: UniterImageDBWriter, retry_failed: bool,
          report: ExtractReport) -> list[ImageSource]:
    """The sources still to extract; counts the skipped ones into ``report``."""
    stamps, failures = db.sources(), db.failures()
    todo = []
    for src in sources:
        src = _avoid_live_collision(src, stamps)
        if src.key in db and _unchanged(stamps.get(src.key), src):
            report.skipped_existing += 1
            continue
        known = failures.get(src.path)
        if (known is not None and known.permanent and not retry_failed
                and (known.size, known.mtime_ns) == (src.size, src.mtime_ns)):
            report.skipped_known_bad += 1
            continue
        todo.append(src)
    return todo


def _avoid_live_collision(src: ImageSource, stamps: dict[str, SourceStamp]) -> ImageSource:
    """Never overwrite the record of another file that still exists (e.g. the same relative name
    under a root extracted by an earlier run): take the collision-suffixed key instead."""
    stamp = stamps.get(src.key)
    if stamp is None or stamp.path == src.path or not os.path.exists(stamp.path):
        return src
    return dataclasses.replace(src, key=suffixed_key(src.key, src.path))


def _unchanged(stamp: SourceStamp | None, src: ImageSource) -> bool:
    """A stored record still stands for ``src``: same file, same size and mtime (or no stamp:
    a DB written by other tools, trusted by key)."""
    if stamp is None:
        return True
    return (stamp.path, stamp.size, stamp.mtime_ns) == (src.path, src.size, src.mtime_ns)


class _Run:
    """The consuming side of one extraction: batches, detector calls, commits, counts."""

    def __init__(self, db: UniterImageDBWriter, detector: RegionDetector, preset: str,
                 todo: list[ImageSource], with_soft_labels: bool, report: ExtractReport,
                 progress: ProgressFn | None, on_batch: BatchFn | None = None) -> None:
        self.db, self.detector, self.preset = db, detector, preset
        self.on_batch = on_batch
        self.todo, self.with_soft_labels = todo, with_soft_labels
        self.report, self.progress = report, progress
        self.known_failed = set(db.failures())
        self.started = time.monotonic()
        self.per_image = _takes_on_image(detector)
        self.failed_batches = 0
        self.staged_failures = 0

    def consume(self, results: Iterable[DecodedImage | DecodeFailure], batch_size: int) -> None:
        pending: list[DecodedImage] = []
        for item in results:
            if isinstance(item, DecodeFailure):
                self.fail(self.todo[item.index], item.reason, item.permanent)
                if self.staged_failures >= _FAILURE_COMMIT_EVERY:
                    self.commit()
                else:
                    self.notify()
                continue
            pending.append(item)
            if len(pending) >= batch_size:
                self.run_batch(pending)
                pending = []
        if pending:
            self.run_batch(pending)
        self.commit()

    def run_batch(self, items: list[DecodedImage]) -> None:
        outputs = self.detect(items)
        if outputs is None:
            outputs = [self.detect_one(it) for it in items]
        stored = [(self.todo[it.index], rec) for it, out in zip(items, outputs) if (rec := self.store(it, out))]
        self.failed_batches = 0 if stored else self.failed_batches + 1
        self.commit()
        if stored and self.on_batch is not None:
            self.on_batch(stored)
        if self.failed_batches >= _MAX_FAILED_BATCHES:
            raise DetectorError(f"the detector failed on every image of {_MAX_FAILED_BATCHES} batches in a row; "
                                f"last: {self.report.failures[-1].reason}")

    def detect(self, items: list[DecodedImage]) -> list[RegionFeatures | str] | None:
        """Detector output for the batch, or None when the batch call failed as a whole."""
        extra: dict[str, Any] = {"on_image": self.notify_within} if self.per_image and self.progress else {}
        try:
            outputs = self.detector.extract([_detector_input(it) for it in items], self.preset,
                                            with_soft_labels=self.with_soft_labels, **extra)
        except Exception:
            return None
        if not isinstance(outputs, (list, tuple)) or len(outputs) != len(items):
            return None
        return list(outputs)

    def detect_one(self, item: DecodedImage) -> RegionFeatures | str:
        """One image alone (after a failed batch); an error text when it fails again."""
        try:
            outputs = self.detector.extract([_detector_input(item)], self.preset,
                                            with_soft_labels=self.with_soft_labels)
        except Exception as exc:
            return f"detector failed ({type(exc).__name__}: {exc})"
        if not isinstance(outputs, (list, tuple)) or len(outputs) != 1:
            return "detector returned a wrong number of results"
        return outputs[0]

    def store(self, item: DecodedImage, output: RegionFeatures | str) -> ImageRecord | None:
        """Stage one image's record; returns it as a reader would see it, or None when it failed."""
        src = self.todo[item.index]
        if isinstance(output, str):
            self.fail(src, output, permanent=False)
            return None
        if not isinstance(output, RegionFeatures):
            self.fail(src, f"detector returned {type(output).__name__}, not RegionFeatures", permanent=False)
            return None
        try:
            record = regions_to_record(output, self.db.cut, self.with_soft_labels)
            self.db.put(src.key, record, SourceStamp(src.path, src.size, src.mtime_ns))
        except DetectorError as exc:
            self.fail(src, str(exc), permanent=False)
            return None
        if src.path in self.known_failed:
            self.db.clear_failure(src.path)
        self.report.written += 1
        return record_view(record)

    def fail(self, src: ImageSource, reason: str, permanent: bool) -> None:
        self.db.put_failure(src.path, FailureRecord(reason, src.size, src.mtime_ns, permanent))
        self.report.failures.append(FileFailure(src.path, src.key, reason, permanent))
        self.staged_failures += 1

    def commit(self) -> None:
        self.db.commit()
        self.staged_failures = 0
        self.notify()

    def notify(self, within: int = 0) -> None:
        """Report progress: the images committed, plus ``within`` done by the detector in the running batch."""
        if self.progress is None:
            return
        r = self.report
        report_progress(self.progress, "extracting", r.written + r.failed + within, len(self.todo), "images",
                        written=r.written, failed=r.failed, skipped=r.skipped_existing + r.skipped_known_bad,
                        elapsed_s=time.monotonic() - self.started)

    def notify_within(self, done: int) -> None:
        self.notify(done)


def _takes_on_image(detector: RegionDetector) -> bool:
    """Whether a detector's ``extract`` reports each image of a batch (``on_image=``)."""
    import inspect

    try:
        return "on_image" in inspect.signature(detector.extract).parameters
    except (TypeError, ValueError):
        return False


def _detector_input(item: DecodedImage) -> DetectorInput:
    import torch

    return torch.from_numpy(item.pixels), item.scale, item.size  # (3, h, w) float32
