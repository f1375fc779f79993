"""Which regions of an image become its features: the two published selection rules.

``uniter``   -- BUTD ``generate_tsv`` as used for UNITER / LightningDOT (BUTD-UNITER-NLVR2 ``generate_npz``):
    for every non-background class, NMS (IoU 0.3, py-faster-rcnn convention: +1 pixel areas, suppress at
    IoU >= threshold) over the *proposal* boxes scored by that class; a proposal's ``max_conf`` is its highest
    class probability among the classes where it survived (0 if none). Keep ``max_conf >= 0.2``; if that
    leaves fewer than 10, take the 10 highest ``max_conf``; if more than 100, the 100 highest; otherwise the
    survivors in proposal order. Boxes are the un-regressed RPN proposals, features are pooled from them,
    ``conf`` is ``max_conf``. (Ties in ``max_conf`` are broken towards the later proposal, as a stable
    ascending argsort reversed; the reference used numpy's unstable quicksort.)

``lxmert36`` -- the LXMERT demo (``modeling_frcnn.py`` ROIOutputs / py-bottom-up-attention's demo): per
    proposal take the top non-background class, its probability and its regressed (clipped) box; one
    class-agnostic NMS (torchvision convention) over those boxes; keep the first 36. The NMS thresholds are
    tried in order until at least ``min_boxes`` (10) survive; the demo uses the single threshold 0.6. If no
    threshold leaves 10, the survivors of the last threshold are returned (the demo crashes there). So an
    image gives 36 boxes whenever >= 36 survive the NMS, else fewer -- never padded. Features are still
    pooled from the proposals (not the regressed boxes), ``conf`` is the top-class probability.

Both return boxes in original-image pixels (resized-image boxes times ``original/resized`` per axis).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import nms

from feature_extraction.detector.config import DetectorConfig
from feature_extraction.detector.ops import apply_deltas, clip_boxes_, legacy_iou_matrix
from feature_extraction.types import BOX_PRESETS, BoxCut, RegionFeatures, box_preset, normalize_boxes


def per_class_nms_max_conf(boxes: torch.Tensor, scores: torch.Tensor, iou_thresh: float) -> torch.Tensor:
    """``max_conf`` of BUTD: greedy NMS per class (column of ``scores``) over shared boxes.

    boxes (R, 4), scores (R, C) -> (R,) the max over classes of the scores of kept boxes (0 if never kept).
    Vectorised over classes: step t visits every class's t-th best box at once.
    """
    r, c = scores.shape
    if r == 0:
        return scores.new_zeros(0)
    overlap = legacy_iou_matrix(boxes) >= iou_thresh  # (R, R), as float64 ``ovr >= thresh`` on float32 ovr
    # Descending order, ties towards the later index (numpy ``argsort()[::-1]`` of a stable sort).
    order = torch.flip(torch.argsort(scores.t(), dim=1, stable=True), dims=[1])  # (C, R)
    suppressed = torch.zeros(c, r, dtype=torch.bool, device=scores.device)
    kept = torch.zeros(c, r, dtype=torch.bool, device=scores.device)
    rows = torch.arange(c, device=scores.device)
    for t in range(r):
        i = order[:, t]  # (C,) the t-th best box of each class
        alive = ~suppressed[rows, i]
        kept[rows, i] = alive
        suppressed |= alive[:, None] & overlap[i]
    return torch.where(kept.t(), scores, torch.zeros((), dtype=scores.dtype, device=scores.device)).amax(dim=1)


def descending_order(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``values`` high to low; ties towards the later index."""
    return torch.flip(torch.argsort(values, stable=True), dims=[0])


@dataclass(frozen=True)
class UniterSelection:
    """BUTD / UNITER adaptive boxes (see the module docstring)."""

    nms_thresh: float = 0.3  # per-class NMS IoU over the proposals
    conf_thresh: float = 0.2  # keep max_conf >= this
    min_boxes: int = 10  # at least this many boxes (when the image has that many proposals)
    max_boxes: int = 100  # at most this many boxes

    def keep_indices(self, max_conf: torch.Tensor) -> torch.Tensor:
        """Indices of the kept proposals given their ``max_conf`` (R,)."""
        keep = torch.nonzero(max_conf >= self.conf_thresh).flatten()
        if len(keep) < self.min_boxes:
            return descending_order(max_conf)[: self.min_boxes]
        if len(keep) > self.max_boxes:
            return descending_order(max_conf)[: self.max_boxes]
        return keep

    def select(self, raw, config: DetectorConfig, with_soft_labels: bool = False) -> RegionFeatures:
        probs = torch.softmax(raw.cls_logits.float(), dim=-1)  # (R, K + 1)
        boxes = _to_original(raw.proposals, raw.scale)
        max_conf = per_class_nms_max_conf(boxes, probs[:, :-1], self.nms_thresh)
        keep = self.keep_indices(max_conf)
        fg = probs[keep, :-1]
        conf = max_conf[keep]
        object_ids = fg.argmax(dim=1) if len(keep) else torch.zeros(0, dtype=torch.long)
        return _record(raw, keep, boxes[keep], conf, object_ids, probs[keep] if with_soft_labels else None)


@dataclass(frozen=True)
class LxmertSelection:
    """LXMERT demo boxes: top-class regressed boxes, class-agnostic NMS, first 36 (module docstring)."""

    nms_thresholds: tuple[float, ...] = (0.6,)  # tried in order until >= min_boxes survive
    min_boxes: int = 10  # fewest acceptable survivors for a threshold
    max_boxes: int = 36  # boxes kept (first ones after NMS, i.e. highest scores)

    def select(self, raw, config: DetectorConfig, with_soft_labels: bool = False) -> RegionFeatures:
        probs = torch.softmax(raw.cls_logits.float(), dim=-1)  # (R, K + 1)
        max_scores, max_classes = probs[:, :-1].max(dim=1)
        r = len(max_classes)
        cols = (max_classes * 4)[:, None] + torch.arange(4, device=max_classes.device)  # (R, 4)
        deltas = raw.box_deltas.float().gather(1, cols)  # the top class's deltas
        top_boxes = apply_deltas(deltas, raw.proposals.float(), config.roi_box_weights, config.box_scale_clamp)
        clip_boxes_(top_boxes, *raw.scale.resized_size)
        keep = torch.zeros(0, dtype=torch.long, device=top_boxes.device)
        for thresh in self.nms_thresholds:
            keep = nms(top_boxes, max_scores, thresh)[: self.max_boxes] if r else keep
            if len(keep) >= self.min_boxes:
                break
        boxes = _to_original(top_boxes[keep], raw.scale)
        return _record(
            raw, keep, boxes, max_scores[keep], max_classes[keep], probs[keep] if with_soft_labels else None
        )


def _to_original(boxes: torch.Tensor, scale) -> torch.Tensor:
    """Resized-image boxes (R, 4) -> original-image pixels, per-axis factors as the reference."""
    sy, sx = scale.yx
    out = boxes.float().clone()
    out[:, 0::2] *= sx
    out[:, 1::2] *= sy
    return out


def _record(raw, keep, boxes, conf, object_ids, soft_labels) -> RegionFeatures:
    attr_probs = torch.softmax(raw.attr_logits[keep].float()[:, :-1], dim=-1)  # drop the last logit
    if len(keep):
        attr_conf, attr_ids = attr_probs.max(dim=1)
    else:
        attr_conf, attr_ids = attr_probs.new_zeros(0), torch.zeros(0, dtype=torch.long)
    height, width = raw.scale.original_size
    boxes_np = boxes.cpu().numpy().astype(np.float32)
    return RegionFeatures(
        features=raw.features[keep].cpu().numpy().astype(np.float16),
        boxes=boxes_np,
        norm_bb=normalize_boxes(boxes_np, height, width),
        conf=conf.float().cpu().numpy().astype(np.float32),
        object_ids=object_ids.cpu().numpy().astype(np.int64),
        attr_ids=attr_ids.cpu().numpy().astype(np.int64),
        attr_conf=attr_conf.float().cpu().numpy().astype(np.float32),
        image_size=(int(height), int(width)),
        soft_labels=None if soft_labels is None else soft_labels.cpu().numpy().astype(np.float16),
    )


def selection_for(cut: BoxCut) -> UniterSelection | LxmertSelection:
    """The selection rule that gives a preset's boxes: a fixed count is LXMERT's first-N after NMS, a threshold with
    bounds is UNITER's (the numbers come from the one registry, `feature_extraction.types.BOX_PRESETS`)."""
    if cut.fixed:
        return LxmertSelection(max_boxes=cut.num_bb)
    return UniterSelection(conf_thresh=cut.conf_th, min_boxes=cut.min_bb, max_boxes=cut.max_bb)


PRESETS: dict[str, UniterSelection | LxmertSelection] = {name: selection_for(cut) for name, cut in BOX_PRESETS.items()}
UNITER = PRESETS["uniter"]
LXMERT36 = PRESETS["lxmert36"]


def get_preset(preset: str | UniterSelection | LxmertSelection) -> UniterSelection | LxmertSelection:
    """A preset by name (``"uniter"``, ``"lxmert36"``) or a selection object passed through."""
    if isinstance(preset, (UniterSelection, LxmertSelection)):
        return preset
    box_preset(preset)  # an unknown name: the one error of every preset lookup
    return PRESETS[preset]
