"""Region features of a benchmark's image files, extracted once into a UNITER image DB in the cache."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from feature_extraction.uniter_db import FeatureStore, is_image_db
from ldot_cli.data.errors import DatasetError
from ldot_cli.data.retrieval_sets import RetrievalSet
from models.core.errors import LdotError
from models.core.fileio import SHARED, atomic_write_json
from models.core.progress import Progress, ProgressFn, report

if TYPE_CHECKING:
    from feature_extraction.detector.network import BUTDDetector
    from feature_extraction.pipeline import ExtractReport, RegionDetector


def feature_cache_dir(image_root: Path) -> Path:
    """Where the features of the image files under ``image_root`` are cached (one UNITER image DB)."""
    from models.core.home import features_dir

    root = image_root.resolve()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", root.name)[:40] or "images"
    return features_dir() / f"{slug}-{hashlib.sha1(os.fsencode(root)).hexdigest()[:12]}"


def ensure_features(rset: RetrievalSet, detector: RegionDetector | None = None, device: str = "auto",
                    progress: ProgressFn | None = None, num_workers: int = 2) -> Path:
    """Make sure every image of ``rset`` has features in a UNITER image DB; returns (and sets) its folder.

    A UNITER image DB given by the user is used as it is. For image files, features are extracted once
    into `feature_cache_dir` (resumable; only new or changed files are processed), so a second run only
    re-encodes. ``detector`` defaults to the project's BUTD detector (loaded only when something is left
    to extract).
    """
    if rset.image_db is not None:
        return rset.image_db
    assert rset.image_root is not None
    cache = feature_cache_dir(rset.image_root)
    paths = rset.image_paths()
    keys = [im.key for im in rset.images]
    if not _cache_complete(cache, keys, paths):
        if detector is None:
            detector = load_default_detector(device)
        report = _extract(paths, keys, cache, detector, progress, num_workers)
        failures = getattr(report, "failures", [])
        if failures:
            first = failures[0]
            raise DatasetError(f"feature extraction failed for {len(failures)} image(s) of {rset.image_root} "
                               f"(first: {first.path}: {first.reason})")
        atomic_write_json(cache / "ldot-source.json", {"image_root": str(rset.image_root.resolve())}, mode=SHARED)
    missing = _missing_keys(cache, keys)
    if missing:
        raise DatasetError(f"the feature cache {cache} lacks {len(missing)} image(s) after extraction "
                           f"(first: {missing[0]})")
    rset.image_db = cache
    return cache


def _missing_keys(img_dir: Path, keys: Sequence[str]) -> list[str]:
    if not is_image_db(img_dir):
        return list(keys)
    store = FeatureStore(img_dir)
    try:
        return store.missing(keys)
    finally:
        store.close()


def _cache_complete(img_dir: Path, keys: Sequence[str], paths: Sequence[Path]) -> bool:
    """Every key is stored, and (where the DB records it) from an unchanged file."""
    if not is_image_db(img_dir):
        return False
    store = FeatureStore(img_dir)
    try:
        if store.missing(keys):
            return False
        sources = getattr(store.db, "sources", None)
        stamps = sources() if callable(sources) else {}
    finally:
        store.close()
    for key, path in zip(keys, paths):
        stamp = stamps.get(key)
        if stamp is None:
            continue
        st = path.stat()
        if (stamp.size, stamp.mtime_ns) != (st.st_size, st.st_mtime_ns):
            return False
    return True


def load_default_detector(device: str = "auto") -> BUTDDetector:
    """The BUTD detector used to extract features of image files (downloaded on first use)."""
    from feature_extraction.detector.weights import open_detector
    from models.hub.catalogue import DEFAULT_DETECTOR
    from models.hub.fetch import ensure_model

    ensure_model(DEFAULT_DETECTOR)
    return open_detector(DEFAULT_DETECTOR, device)


def _extract(paths: Sequence[Path], keys: Sequence[str], out_dir: Path, detector: RegionDetector,
             progress: ProgressFn | None, num_workers: int) -> ExtractReport:
    """Extract region features of ``paths`` into the UNITER image DB ``out_dir``, stored under ``keys``."""
    from feature_extraction.pipeline import extract_to_db

    key_of = {os.path.abspath(p): k for p, k in zip(paths, keys)}

    def key_fn(path: str, root: str) -> str:
        return key_of.get(os.path.abspath(path), os.path.basename(path))

    def on_progress(p: Progress) -> None:
        report(progress, "extracting features", p.done, p.total, "images")

    try:
        return extract_to_db([str(p) for p in paths], out_dir, detector, "uniter", key_fn=key_fn,
                             num_workers=num_workers, progress=on_progress)
    except LdotError:
        raise
    except Exception as exc:  # the pipeline's own errors (DBLockedError, DetectorError …) and OS errors
        if isinstance(exc, OSError) or type(exc).__module__.startswith("feature_extraction"):
            raise DatasetError(f"feature extraction into {out_dir} failed: {exc}") from None
        raise
