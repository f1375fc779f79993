"""Box arithmetic shared by the RPN, the box head and the selection rules."""

from __future__ import annotations

from typing import Sequence

import torch


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights: Sequence[float], clamp: float) -> torch.Tensor:
    """detectron2's Box2BoxTransform.apply_deltas: deltas (R, 4k) on boxes (R, 4) -> (R, 4k)."""
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=clamp)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=clamp)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.empty_like(deltas)
    out[:, 0::4] = pred_ctr_x - 0.5 * pred_w
    out[:, 1::4] = pred_ctr_y - 0.5 * pred_h
    out[:, 2::4] = pred_ctr_x + 0.5 * pred_w
    out[:, 3::4] = pred_ctr_y + 0.5 * pred_h
    return out


def clip_boxes_(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """Clamp (R, 4) boxes into [0, width] x [0, height] in place."""
    boxes[:, 0].clamp_(min=0, max=width)
    boxes[:, 1].clamp_(min=0, max=height)
    boxes[:, 2].clamp_(min=0, max=width)
    boxes[:, 3].clamp_(min=0, max=height)
    return boxes


def legacy_iou_matrix(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU with py-faster-rcnn's +1 pixel convention, float32, same op order as its cpu_nms."""
    boxes = boxes.float()
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    xx1 = torch.maximum(x1[:, None], x1[None, :])
    yy1 = torch.maximum(y1[:, None], y1[None, :])
    xx2 = torch.minimum(x2[:, None], x2[None, :])
    yy2 = torch.minimum(y2[:, None], y2[None, :])
    w = torch.clamp(xx2 - xx1 + 1, min=0.0)
    h = torch.clamp(yy2 - yy1 + 1, min=0.0)
    inter = w * h
    return inter / (areas[:, None] + areas[None, :] - inter)
