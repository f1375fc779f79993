"""Selection presets on constructed detections where the rules can be checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from feature_extraction.detector.config import DetectorConfig
from feature_extraction.detector.network import RawDetections
from feature_extraction.detector.ops import legacy_iou_matrix
from feature_extraction.detector.preprocess import ImageScale
from feature_extraction.detector.selection import (
    LxmertSelection,
    UniterSelection,
    get_preset,
    per_class_nms_max_conf,
)

K = 5  # foreground classes in these constructed cases
CFG = DetectorConfig(num_classes=K)


def _raw(boxes, fg_probs, deltas=None, scale=ImageScale((100, 100), (100, 100))) -> RawDetections:
    """Detections whose softmax gives exactly ``fg_probs`` (R, K) plus a background column."""
    fg = torch.as_tensor(fg_probs, dtype=torch.float64)
    probs = torch.cat([fg, (1 - fg.sum(1, keepdim=True)).clamp_min(1e-6)], dim=1)
    r = len(fg)
    return RawDetections(
        proposals=torch.as_tensor(boxes, dtype=torch.float32),
        objectness=torch.zeros(r),
        features=torch.arange(r, dtype=torch.float32)[:, None].repeat(1, 8),
        cls_logits=probs.log().float(),
        attr_logits=torch.zeros(r, 4),
        box_deltas=torch.zeros(r, 4 * K) if deltas is None else torch.as_tensor(deltas, dtype=torch.float32),
        scale=scale,
    )


def _grid_boxes(n: int, size: float = 10.0, gap: float = 20.0) -> list[list[float]]:
    """n non-overlapping boxes on a row-major grid."""
    per_row = 10
    return [[(i % per_row) * gap, (i // per_row) * gap, (i % per_row) * gap + size, (i // per_row) * gap + size]
            for i in range(n)]


def _probs(confs: list[float]) -> np.ndarray:
    out = np.full((len(confs), K), 0.0)
    out[:, 0] = confs
    out[:, 1:] = 0.001
    return out


def _feature_ids(rec) -> list[int]:
    return rec.features[:, 0].astype(int).tolist()


# ----------------------------------------------------------------------------- uniter
def test_uniter_keeps_conf_above_threshold_in_proposal_order():
    confs = [0.1, 0.5, 0.19, 0.9] + [0.3] * 10 + [0.05] * 6
    rec = UniterSelection().select(_raw(_grid_boxes(20), _probs(confs)), CFG)
    expect = [i for i, c in enumerate(confs) if c >= 0.2]
    assert _feature_ids(rec) == expect  # 11 boxes, index order (not sorted by confidence)
    np.testing.assert_allclose(rec.conf, [confs[i] for i in expect], rtol=1e-5)


def test_uniter_tops_up_to_min_boxes_by_confidence():
    confs = [0.5, 0.05, 0.3] + [0.01 * i for i in range(1, 16)]
    rec = UniterSelection().select(_raw(_grid_boxes(18), _probs(confs)), CFG)
    expect = sorted(range(18), key=lambda i: -confs[i])[:10]
    assert rec.num_boxes == 10 and _feature_ids(rec) == expect


def test_uniter_caps_at_max_boxes_by_confidence():
    rng = np.random.default_rng(0)
    confs = rng.uniform(0.25, 0.95, 130).tolist()
    rec = UniterSelection().select(_raw(_grid_boxes(130), _probs(confs)), CFG)
    assert rec.num_boxes == 100
    assert _feature_ids(rec) == sorted(range(130), key=lambda i: -confs[i])[:100]


def test_uniter_with_fewer_proposals_than_min_returns_all():
    rec = UniterSelection().select(_raw(_grid_boxes(4), _probs([0.1, 0.01, 0.02, 0.03])), CFG)
    assert sorted(_feature_ids(rec)) == [0, 1, 2, 3]


def test_uniter_conf_is_max_over_classes_where_the_box_survives_nms():
    # Box 1 overlaps box 0 heavily. Class 0: box 0 (0.6) suppresses box 1 (0.5).
    # Class 1: box 1 (0.3) beats box 0 (0.1). So box 1's max_conf is 0.3, not its best score 0.5.
    boxes = [[0, 0, 50, 50], [1, 1, 51, 51]] + _grid_boxes(12, gap=60)[2:]
    probs = np.full((12, K), 0.001)
    probs[0, :2] = [0.6, 0.1]
    probs[1, :2] = [0.5, 0.3]
    rec = UniterSelection().select(_raw(boxes, probs), CFG)
    conf = dict(zip(_feature_ids(rec), rec.conf))
    assert conf[0] == pytest.approx(0.6) and conf[1] == pytest.approx(0.3)


def _reference_max_conf(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """Straightforward per-class greedy NMS (written from the rule, one class at a time)."""
    iou = legacy_iou_matrix(torch.as_tensor(boxes)).numpy()
    max_conf = np.zeros(len(boxes))
    for c in range(scores.shape[1]):
        order = np.argsort(scores[:, c], kind="stable")[::-1]
        removed = np.zeros(len(boxes), bool)
        for i in order:
            if removed[i]:
                continue
            max_conf[i] = max(max_conf[i], scores[i, c])
            removed |= iou[i] >= thresh
    return max_conf


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=25), st.integers(min_value=1, max_value=6), st.integers(0, 10**6))
def test_vectorised_per_class_nms_matches_the_sequential_rule(n, c, seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 60, (n, 2)).astype(np.float32)
    wh = rng.uniform(1, 40, (n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = rng.dirichlet(np.ones(c + 1), n)[:, :c].astype(np.float32)
    got = per_class_nms_max_conf(torch.as_tensor(boxes), torch.as_tensor(scores), 0.3).numpy()
    np.testing.assert_array_equal(got, _reference_max_conf(boxes, scores, 0.3).astype(np.float32))


def test_legacy_iou_uses_plus_one_areas():
    iou = legacy_iou_matrix(torch.tensor([[0.0, 0, 9, 9], [5, 0, 14, 9]]))
    assert iou[0, 1].item() == pytest.approx(50 / 150)  # 10x10 boxes (inclusive pixels) sharing 5x10


# ----------------------------------------------------------------------------- lxmert
def test_lxmert_keeps_the_36_best_after_nms():
    rng = np.random.default_rng(1)
    confs = rng.uniform(0.1, 0.9, 60).tolist()
    rec = LxmertSelection().select(_raw(_grid_boxes(60), _probs(confs)), CFG)
    assert rec.num_boxes == 36
    assert _feature_ids(rec) == sorted(range(60), key=lambda i: -confs[i])[:36]
    assert (rec.object_ids == 0).all()


def test_lxmert_uses_the_top_class_regressed_box():
    boxes = _grid_boxes(12)
    probs = _probs([0.5] * 12)
    probs[3] = [0.05, 0.05, 0.8, 0.05, 0.05]  # class 2 on, box 3
    deltas = np.zeros((12, 4 * K), np.float32)
    deltas[3, 8:12] = [10.0, 0.0, 0.0, 5 * math.log(2.0)]  # class 2: shift x by one width, double the height
    scale = ImageScale((200, 400), (100, 100))  # original is 2x taller, 4x wider than the network input
    rec = LxmertSelection().select(_raw(boxes, probs, deltas, scale), CFG)
    row = _feature_ids(rec).index(3)
    x0, y0, x1, y1 = boxes[3]
    expect = np.array([x0 + 10, y0 - 5, x1 + 10, y1 + 5]) * [4, 2, 4, 2]
    np.testing.assert_allclose(rec.boxes[row], np.maximum(expect, 0), atol=1e-4)
    assert rec.object_ids[row] == 2 and rec.conf[row] == pytest.approx(0.8)


def test_lxmert_tries_the_next_threshold_when_too_few_survive():
    # 12 boxes, each a slight shift of the previous one: at IoU 0.6 few survive, at 0.99 all do.
    boxes = [[i * 1.0, 0, 50 + i * 1.0, 50] for i in range(12)]
    raw = _raw(boxes, _probs([0.9 - 0.01 * i for i in range(12)]))
    assert LxmertSelection(nms_thresholds=(0.6,)).select(raw, CFG).num_boxes < 10  # documented: fewer, no padding
    assert LxmertSelection(nms_thresholds=(0.6, 0.99)).select(raw, CFG).num_boxes == 12


def test_lxmert_with_few_proposals_returns_them_all():
    rec = LxmertSelection().select(_raw(_grid_boxes(7), _probs([0.3] * 7)), CFG)
    assert rec.num_boxes == 7


def test_presets_by_name():
    assert isinstance(get_preset("uniter"), UniterSelection) and isinstance(get_preset("lxmert36"), LxmertSelection)
    custom = UniterSelection(max_boxes=50)
    assert get_preset(custom) is custom


@pytest.mark.parametrize("preset", ["uniter", "lxmert36"])
def test_no_proposals_gives_an_empty_record(preset):
    rec = get_preset(preset).select(_raw(np.zeros((0, 4)), np.zeros((0, K))), CFG, with_soft_labels=True)
    assert rec.num_boxes == 0 and rec.boxes.shape == (0, 4) and rec.features.shape == (0, 8)
    assert rec.soft_labels.shape == (0, K + 1) and rec.image_size == (100, 100)
