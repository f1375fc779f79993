"""Ragged per-image region sets and their zero-padded batches (one place for the padding rule)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch


class RegionRecord(Protocol):
    """One image's regions."""

    @property
    def features(self) -> np.ndarray: ...  # (n, img_dim) float16/32

    @property
    def norm_bb(self) -> np.ndarray: ...  # (n, 6) x1/W, y1/H, x2/W, y2/H, w/W, h/H

    @property
    def soft_labels(self) -> np.ndarray | None: ...  # (n, C) background FIRST, or None


def stack_regions(records: Sequence[RegionRecord], soft_labels: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Ragged region sets -> zero-padded (B, N, dim), (B, N, 6), valid (B, N)[, soft (B, N, C)]."""
    width = max(len(r.features) for r in records)
    dim = np.asarray(records[0].features).shape[1]
    feat = torch.zeros(len(records), width, dim)
    bb = torch.zeros(len(records), width, 6)
    valid = torch.zeros(len(records), width, dtype=torch.bool)
    soft = None
    if soft_labels:
        missing = [i for i, r in enumerate(records) if getattr(r, "soft_labels", None) is None]
        if missing:
            raise ValueError("the mrckl task needs soft labels, and an image has none (use an image DB "
                             "written with soft labels, or drop mrckl from the tasks)")
        soft = torch.zeros(len(records), width, np.asarray(records[0].soft_labels).shape[1])
    for r, rec in enumerate(records):
        n = len(rec.features)
        feat[r, :n] = torch.from_numpy(np.asarray(rec.features, dtype=np.float32))
        bb[r, :n] = torch.from_numpy(np.asarray(rec.norm_bb, dtype=np.float32))
        valid[r, :n] = True
        if soft is not None:
            soft[r, :n] = torch.from_numpy(np.asarray(rec.soft_labels, dtype=np.float32))
    return feat, bb, valid, soft


def region_object_ids(record: object) -> np.ndarray | None:
    """The detector class of each region (0..C-1, no background), or None when the record has none.

    From ``object_ids`` (our detector's records), else the argmax of ``soft_labels`` with the background FIRST
    (the training contract: UNITER image DBs and `models.training.data.region_lookup`)."""
    ids = getattr(record, "object_ids", None)
    if ids is not None:
        return np.asarray(ids, dtype=np.int64).reshape(-1)
    soft = getattr(record, "soft_labels", None)
    if soft is not None:
        soft = np.asarray(soft, dtype=np.float32)
        return soft[:, 1:].argmax(axis=-1).astype(np.int64)
    return None


def stack_object_ids(records: Sequence[object], width: int) -> torch.Tensor | None:
    """(B, width) detector class per region (-1: padding or unknown), or None when no record has any."""
    rows = [region_object_ids(r) for r in records]
    if all(r is None for r in rows):
        return None
    out = torch.full((len(records), width), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        if row is not None:
            out[b, : min(len(row), width)] = torch.as_tensor(row[:width])
    return out
