"""``--min-score``: a level below which results are dropped, given as a number or as ``auto`` (the model's
calibrated level, `models.training.calibration`); when a model has no calibration, a level suggested from how
the query scores over the index itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ldot_cli.index.query import QueryError
from ldot_cli.index.store import IndexStore
from models.core.errors import LdotError, option


def parse_min_score(value: str | float | None, auto: Callable[[], float]) -> float | None:
    """``--min-score``: None, a number, or ``auto`` (``auto()`` gives the level)."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return auto()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise QueryError(f"{option('min_score')} must be a number or 'auto' (got {value!r})") from None
    if not np.isfinite(number):
        raise QueryError(f"{option('min_score')} must be a finite number (got {value!r})")
    return number


def model_dir(model_source: str) -> Path | None:
    """The folder of a model (where its calibration is kept), None when it is not one."""
    from models.hub.load import resolve_source

    try:
        path = resolve_source(model_source)
    except LdotError:
        return None
    return path if path.is_dir() else None


def auto_min_score(model_source: str, pixels: bool) -> float:
    """The model's calibrated ``--min-score auto`` level; ``pixels``: a dual encoder (its scores are cosines)."""
    from models.training.calibration import CalibrationError, auto_threshold

    directory = model_dir(model_source)
    if directory is None:
        raise CalibrationError(f"model {model_source!r} is not a model dir: it has no score calibration")
    # scores are cosines for a dual encoder (CLIP's matching pairs mostly 0.2-0.35), raw dot products otherwise
    return auto_threshold(directory, model_source, "0.25" if pixels else "5.0")


def suggest_min_score(store: IndexStore, query_vector: Callable[[], np.ndarray], sample: int = 2000,
                      keep: float = 0.1) -> str | None:
    """A ``--min-score`` for a query from the index's own score spread: its scores against up to ``sample``
    stored vectors, and the level that keeps about the top ``keep`` of them (None for an empty index; the
    query is encoded, by ``query_vector()``, only when there are vectors)."""
    _, vectors = store.sample_vectors(sample)
    if not len(vectors):
        return None
    scores = vectors @ query_vector()[0]
    low, median, high = np.quantile(scores, [0.0, 0.5, 1.0])
    level = float(np.quantile(scores, 1.0 - keep))
    return (f"this query scores {low:.3g} to {high:.3g} (median {median:.3g}) over {len(scores):,} images of "
            f"index {store.name!r}: e.g. {option('min_score')} {level:.3g} keeps about the top {100 * keep:g}%")
