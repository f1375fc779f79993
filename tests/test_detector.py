"""The detector on a tiny random configuration: preprocessing, runtime options, batching, records."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from feature_extraction.detector.config import (
    DetectorConfig,
    RuntimeOptions,
    tiny_config,
)
from feature_extraction.detector.network import BUTDDetector, cell_anchors, unique_rows
from feature_extraction.detector.preprocess import preprocess, resized_size
from feature_extraction.detector.weights import load_detector
from feature_extraction.types import RegionFeatures
from tests.detector_fixtures import random_hub_state_dict, synthetic_image

CFG = tiny_config()


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return random_hub_state_dict(CFG, seed=3)


@pytest.fixture(scope="module")
def tiny_model(tiny_state) -> BUTDDetector:
    return load_detector(tiny_state, CFG)


@pytest.fixture()
def model(tiny_model) -> BUTDDetector:
    return copy.deepcopy(tiny_model)


def _images(sizes=((120, 150), (90, 200), (120, 150), (200, 110)), seed=10):
    return [synthetic_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]


# ----------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize(
    "hw, expect",
    [((480, 640), (600, 800)), ((640, 480), (800, 600)), ((300, 1200), (250, 1000)), ((600, 800), (600, 800)),
     ((333, 500), (600, 901)), ((100, 3000), (33, 1000))],
)
def test_resized_size(hw, expect):
    assert resized_size(*hw) == expect


def test_preprocess_is_bgr_minus_means_and_keeps_original_size():
    rgb = np.zeros((60, 80, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    tensor, scale = preprocess(rgb)
    assert tensor.shape == (3, 600, 800) and tensor.dtype == torch.float32
    mean = DetectorConfig().pixel_mean_bgr
    torch.testing.assert_close(tensor[:, 5, 5], torch.tensor([0 - mean[0], 0 - mean[1], 255 - mean[2]]))
    assert scale.original_size == (60, 80) and scale.resized_size == (600, 800)
    assert scale.yx == pytest.approx((0.1, 0.1))


@pytest.mark.parametrize("bad", [np.zeros((5, 5), np.uint8), np.zeros((5, 5, 4), np.uint8),
                                 np.zeros((5, 5, 3), np.float32), np.zeros((0, 5, 3), np.uint8), "img",
                                 np.zeros((1, 3000, 3), np.uint8)])
def test_preprocess_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        preprocess(bad)


def test_preprocess_runs_in_a_worker_process():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        out = pool.apply(preprocess, (_images()[0], CFG))
    torch.testing.assert_close(out.tensor, preprocess(_images()[0], CFG).tensor)


# ----------------------------------------------------------------------------- network pieces
def test_cell_anchors_are_size_major_unrounded():
    anchors = cell_anchors((64, 128), (0.5, 1.0, 2.0))
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    torch.testing.assert_close(h / w, torch.tensor([0.5, 1, 2, 0.5, 1, 2]))
    torch.testing.assert_close((w * h).sqrt(), torch.tensor([64.0] * 3 + [128.0] * 3))
    assert anchors[0, 0].item() == pytest.approx(-64 / np.sqrt(0.5) / 2)  # not rounded
    torch.testing.assert_close(anchors[:, :2], -anchors[:, 2:])  # centred on 0 (offset 0)


def test_anchor_grid_centres_at_stride_multiples(model):
    grid = model.proposal_generator.anchor_generator.grid(2, 3)  # (2*3*A, 4)
    a = CFG.num_anchors
    centres = (grid[:, :2] + grid[:, 2:]) / 2
    expect = torch.tensor([[16.0 * x, 16.0 * y] for y in range(2) for x in range(3) for _ in range(a)])
    torch.testing.assert_close(centres, expect)


def test_unique_rows_is_exact():
    x = torch.randn(6, 10)
    rows = torch.cat([x, x[[1, 3]], -torch.zeros(1, 10), torch.zeros(1, 10)])
    idx, inv = unique_rows(rows)
    assert len(idx) == 8  # 6 distinct + (-0.0) + (0.0): distinct bit patterns are kept apart
    assert torch.equal(rows[idx][inv], rows)


@pytest.mark.parametrize(
    "options",
    [RuntimeOptions.plain(), RuntimeOptions(polyphase_res5=False, dedup_res5=False),
     RuntimeOptions(dedup_res5=False, roi_chunk=8), RuntimeOptions(channels_last=False, fold_bn=False)],
)
def test_runtime_options_do_not_change_results(tiny_state, options):
    images = [preprocess(im, CFG) for im in _images()]
    ref = load_detector(tiny_state, CFG, options=RuntimeOptions()).detect(images)
    got = load_detector(tiny_state, CFG, options=options).detect(images)
    for a, b in zip(ref, got):
        assert torch.equal(a.proposals, b.proposals) or torch.allclose(a.proposals, b.proposals, atol=1e-3)
        torch.testing.assert_close(a.features, b.features, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.cls_logits, b.cls_logits, rtol=1e-4, atol=1e-4)


def test_memory_per_call_does_not_grow_with_the_batch(model):
    """RoI pooling, res5 and the box head see one image's proposals at a time, and the backbone
    at most ``backbone_pixels`` pixels per call, whatever the batch size (8 images pooled together took 5.8 GB)."""
    images = [preprocess(im, CFG) for im in _images() * 2]  # 8 images, two of each size
    one_by_one = [model.detect([im])[0] for im in images]
    seen: dict[str, list[int]] = {"res5": [], "backbone": []}
    plain_res5, plain_backbone = model.res5_features, model.backbone_features

    def res5(pooled):
        seen["res5"].append(len(pooled))
        return plain_res5(pooled)

    def backbone(tensors):
        seen["backbone"].append(sum(int(t.shape[-1]) * int(t.shape[-2]) for t in tensors))
        return plain_backbone(tensors)

    model.res5_features, model.backbone_features = res5, backbone
    largest = max(int(im.tensor.shape[-1]) * int(im.tensor.shape[-2]) for im in images)
    model.options = RuntimeOptions(backbone_pixels=2 * largest)
    batched = model.detect(images)
    assert max(seen["res5"]) == max(len(r.proposals) for r in one_by_one) <= CFG.rpn_post_nms_topk
    assert len(seen["res5"]) == len(images)
    assert len(seen["backbone"]) >= len(images) // 2 and max(seen["backbone"]) <= 2 * largest
    for a, b in zip(one_by_one, batched):  # same results as one image per call, in input order
        assert a.scale == b.scale
        torch.testing.assert_close(a.features, b.features, rtol=1e-4, atol=1e-4)


def test_polyphase_res5_equals_dilated_res5(model):
    pooled = torch.randn(5, CFG.res4_channels, 14, 14).relu()
    pooled[1] = pooled[0]  # a duplicate RoI
    pooled[2, :, 0::2] = pooled[2, :, 1::2]  # even rows == odd rows: phases coincide
    model.options = RuntimeOptions(fold_bn=False, channels_last=False, polyphase_res5=False, dedup_res5=False)
    with torch.inference_mode():
        direct = model.res5_features(pooled)
        model.options = RuntimeOptions(channels_last=False)
        fast = model.res5_features(pooled)
    torch.testing.assert_close(fast, direct, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("preset", ["uniter", "lxmert36"])
def test_batch_equals_one_by_one(model, preset):
    images = [preprocess(im, CFG) for im in _images()]
    batched = model.extract(images, preset, with_soft_labels=True)
    for im, rec in zip(images, batched):
        single = model.extract([im], preset, with_soft_labels=True)[0]
        assert rec.num_boxes == single.num_boxes
        np.testing.assert_allclose(rec.boxes, single.boxes, atol=1e-3)
        np.testing.assert_allclose(rec.features.astype(np.float32), single.features.astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(rec.conf, single.conf, atol=1e-5)
        assert np.array_equal(rec.object_ids, single.object_ids)


@pytest.mark.parametrize("preset", ["uniter", "lxmert36"])
def test_records_are_well_formed_and_in_original_pixels(model, preset):
    raw_images = _images()
    records = model.extract([preprocess(im, CFG) for im in raw_images], preset, with_soft_labels=True)
    for im, rec in zip(raw_images, records):
        h, w = im.shape[:2]
        assert isinstance(rec, RegionFeatures) and rec.image_size == (h, w)
        n = rec.num_boxes
        assert n > 0
        assert rec.features.dtype == np.float16 and rec.features.shape == (n, CFG.res5_channels)
        assert rec.boxes.dtype == np.float32 and rec.boxes.shape == (n, 4)
        assert (rec.boxes[:, [0, 2]] <= w + 1e-3).all() and (rec.boxes[:, [1, 3]] <= h + 1e-3).all()
        assert (rec.boxes >= 0).all() and (rec.boxes[:, 2:] >= rec.boxes[:, :2]).all()
        np.testing.assert_allclose(rec.norm_bb[:, :4], rec.boxes / np.array([w, h, w, h], np.float32), atol=1e-6)
        assert rec.object_ids.max() < CFG.num_classes and rec.attr_ids.max() < CFG.num_attrs
        assert rec.soft_labels.shape == (n, CFG.num_classes + 1)
        np.testing.assert_allclose(rec.soft_labels.astype(np.float32).sum(1), 1.0, atol=1e-2)
        assert ((rec.conf > 0) & (rec.conf <= 1)).all() and ((rec.attr_conf > 0) & (rec.attr_conf <= 1)).all()


def test_boxes_scale_back_to_the_original_image(model):
    """Records hold boxes in original pixels: resized-image boxes times original/resized per axis."""
    from feature_extraction.detector.selection import LXMERT36, UNITER

    image = preprocess(_images(((103, 251),))[0], CFG)  # anisotropic rounding: factors differ per axis
    (h, w), (rh, rw) = image.scale.original_size, image.scale.resized_size
    factors = np.array([w / rw, h / rh, w / rw, h / rh], np.float32)
    assert factors[0] != factors[1]
    raw = model.detect([image])[0]
    uniter = UNITER.select(raw, CFG)
    props = raw.proposals.numpy() * factors
    matched = [np.abs(props - b).max(axis=1).min() for b in uniter.boxes]
    assert max(matched) < 1e-3  # every kept box is a proposal, scaled
    lx = LXMERT36.select(raw, CFG)
    assert lx.boxes[:, [0, 2]].max() <= w + 1e-3 and lx.boxes[:, [1, 3]].max() <= h + 1e-3
    assert lx.boxes[:, [0, 2]].max() > rw or lx.boxes[:, [1, 3]].max() > rh or w <= rw


def test_unknown_preset(model):
    with pytest.raises(ValueError, match="preset"):
        model.extract([preprocess(_images()[0], CFG)], "butd")


def test_pipeline_style_inputs(model):
    """The extraction pipeline passes ``(tensor, h / H, (H, W))`` and runs ``detector.preprocess`` in workers."""
    import pickle

    prep = pickle.loads(pickle.dumps(model.preprocess))  # picklable without the model, uses its config
    rgb = _images(((103, 251),))[0]
    tensor, scale = prep(rgb)
    assert float(scale) == pytest.approx(tensor.shape[1] / 103)
    item = (torch.from_numpy(tensor.numpy().copy()), float(scale), (103, 251))
    a = model.extract([item], "uniter")[0]
    b = model.extract([preprocess(rgb, CFG)], "uniter")[0]
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.features, b.features)
    with pytest.raises(TypeError):
        model.extract([object()], "uniter")
