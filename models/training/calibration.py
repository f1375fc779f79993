"""Score calibration of a bi-encoder: how its raw dot products of matching and non-matching pairs are spread.

Written into a model dir as ``calibration.json`` when the model is trained (on its validation pairs) or
evaluated (on the benchmark's pairs). ``ldot search --min-score auto`` reads it: results must score above
the `AUTO_QUANTILE` quantile of the non-matching pairs' scores, so a non-match passes with probability
``1 - AUTO_QUANTILE`` (0.1%) on data like the calibration set.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.core.errors import LdotError, option
from models.core.fileio import atomic_write_text
from models.hub.installed import MUTABLE_FILES

CALIBRATION_FILE = MUTABLE_FILES[0]
AUTO_QUANTILE = 0.999  # of non-matching pairs' scores: a non-match passes `auto` 0.1% of the time
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
MAX_NEGATIVES = 2_000_000  # non-matching pairs sampled from the score matrix


class CalibrationError(LdotError):
    """A model without a usable score calibration."""


def calibrate(text_vectors: np.ndarray, image_vectors: np.ndarray, caption_image: Sequence[int], source: str,
              max_negatives: int = MAX_NEGATIVES, seed: int = 0) -> dict[str, Any]:
    """The score distributions of matching (caption, its image) and non-matching pairs of a retrieval set."""
    text = np.asarray(text_vectors, np.float32)
    image = np.asarray(image_vectors, np.float32)
    owner = np.asarray(caption_image, np.int64)
    if len(text) == 0 or len(image) < 2:
        raise CalibrationError("calibration needs captions and at least two images")
    positives = np.einsum("ij,ij->i", text, image[owner])
    rng = np.random.default_rng(seed)
    total = len(text) * (len(image) - 1)
    if total <= max_negatives:
        scores = text @ image.T
        keep = np.ones_like(scores, dtype=bool)
        keep[np.arange(len(text)), owner] = False
        negatives = scores[keep]
    else:
        rows = rng.integers(0, len(text), max_negatives)
        cols = rng.integers(0, len(image) - 1, max_negatives)
        cols = cols + (cols >= owner[rows])  # skip each caption's own image
        negatives = np.einsum("ij,ij->i", text[rows], image[cols])
    return summarize(positives, negatives, source)


def summarize(positives: np.ndarray, negatives: np.ndarray, source: str) -> dict[str, Any]:
    positives = np.asarray(positives, np.float64)
    negatives = np.asarray(negatives, np.float64)
    threshold = float(np.quantile(negatives, AUTO_QUANTILE))
    lo, hi = float(min(positives.min(), negatives.min())), float(max(positives.max(), negatives.max()))
    edges = np.linspace(lo, hi, 41)
    return {
        "version": 1,
        "source": source,
        "created": time.time(),
        "pairs": {"match": len(positives), "non_match": len(negatives)},
        "match_quantiles": {str(q): float(np.quantile(positives, q)) for q in QUANTILES},
        "non_match_quantiles": {str(q): float(np.quantile(negatives, q)) for q in QUANTILES},
        "histogram": {"edges": edges.tolist(), "match": np.histogram(positives, edges)[0].tolist(),
                      "non_match": np.histogram(negatives, edges)[0].tolist()},
        "auto": {"quantile": AUTO_QUANTILE, "threshold": threshold,
                 "match_pass_rate": float(np.mean(positives > threshold)),
                 "non_match_pass_rate": float(np.mean(negatives > threshold))},
        "auc": auc(positives, negatives),
    }


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(a random matching pair scores above a random non-matching one) (ties count half)."""
    neg = np.sort(np.asarray(negatives, np.float64))
    pos = np.asarray(positives, np.float64)
    below = np.searchsorted(neg, pos, side="left")
    upto = np.searchsorted(neg, pos, side="right")
    return float(np.mean((below + upto) / 2) / len(neg))


def calibration_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / CALIBRATION_FILE


def save_calibration(model_dir: str | Path, calibration: dict[str, Any]) -> Path:
    path = calibration_path(model_dir)
    atomic_write_text(path, json.dumps(calibration, indent=1) + "\n")
    return path


def load_calibration(model_dir: str | Path) -> dict[str, Any] | None:
    """The model's calibration, or None when it has none (or an unreadable one)."""
    path = calibration_path(model_dir)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("auto"), dict) or "threshold" not in data["auto"]:
        return None
    return data


def auto_threshold(model_dir: str | Path, model_name: str, example: str = "5.0") -> float:
    """The ``--min-score auto`` level of a model; a clear error when it was never calibrated (``example``: a
    number on the model's own scale, for the hint: raw dot products of LightningDOT, cosines of CLIP)."""
    data = load_calibration(model_dir)
    if data is None:
        raise CalibrationError(f"model {model_name!r} has no score calibration ({CALIBRATION_FILE} in its model dir): "
                               "it is written when the model is trained or evaluated (`ldot eval ... --model "
                               f"{model_name}`); meanwhile give a number, e.g. {option('min_score')} {example}")
    return float(data["auto"]["threshold"])
