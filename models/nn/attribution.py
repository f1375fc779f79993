"""Which detected boxes drive a bi-encoder score: region attribution for a (query vector, image) pair.

The score is ``q . f(regions)``. A box matters as much as the score drops when the image tower reads the
image without it (the box masked out of attention, exactly as if the detector had not found it). Trying
every box costs one image-tower pass per box, so the candidates come first from one forward and backward
pass: gradient x input at each region's embedding, a first-order estimate of that drop (in
benchmarks/regions.py its top box alone beats a random box 93-98% of the time; each region's own projected
output state dotted with ``q`` did no better than chance). Only the best candidates (a budget of `REMOVAL_BUDGET` passes shared by the results, at
least `MIN_CANDIDATES` each) are then removed one at a time (batched), and the boxes are ranked by the
measured drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from models.nn.layers import box7_from_norm_bb
from models.nn.regions import RegionRecord, stack_regions

if TYPE_CHECKING:
    from models.nn.bi_encoder import BiEncoder, ImageTower

REMOVAL_BUDGET = 96  # image-tower passes with one box removed, shared by the results of one query
MIN_CANDIDATES = 4


@dataclass(frozen=True)
class BoxWeight:
    index: int  # region row in the image's record
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 as fractions of the width and height
    weight: float  # the score drop when this box is removed


@torch.inference_mode()
def _scores(tower: ImageTower, query: torch.Tensor, feat: torch.Tensor, box7: torch.Tensor,
            valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image scores (B,), per-region proxy scores (B, N)) for query vectors (B, D)."""
    states = tower.sequence(feat, box7, valid)  # (B, 1 + N, H)
    projected = tower.encode_proj(states).float()  # (B, 1 + N, D)
    scores = torch.einsum("bd,bld->bl", query, projected)
    proxy = scores[:, 1:].masked_fill(~valid, float("-inf"))
    return scores[:, 0], proxy


def gradient_proxy(tower: ImageTower, query: torch.Tensor, feat: torch.Tensor, box7: torch.Tensor,
                   valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B,), per-region first-order estimates of the score drop when a region is removed (B, N)):
    gradient x input at the region embeddings (one forward and one backward pass for all images)."""
    kept: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        output = output.detach().requires_grad_(True)
        kept["emb"] = output
        return output

    with torch.inference_mode(False), torch.enable_grad():
        handle = tower.bert.img_embeddings.register_forward_hook(hook)
        try:
            states = tower.sequence(feat.clone(), box7.clone(), valid.clone())
            scores = (query.clone() * tower.encode_proj(states[:, 0]).float()).sum(-1)
            (grad,) = torch.autograd.grad(scores.sum(), kept["emb"])
        finally:
            handle.remove()
        proxy = (grad * kept["emb"]).sum(-1).float().detach()
    return scores.detach(), proxy.masked_fill(~valid, float("-inf"))


@torch.inference_mode()
def removal_scores(tower: ImageTower, query: torch.Tensor, feat: torch.Tensor, box7: torch.Tensor, valid: torch.Tensor,
                   remove: Sequence[Sequence[int]]) -> np.ndarray:
    """Scores with one box removed: ``out[b, j]`` = score of image b without box ``remove[b][j]`` (NaN: none)."""
    width = max((len(r) for r in remove), default=0)
    out = np.full((len(remove), width), np.nan, np.float32)
    rows, cols, boxes = [], [], []
    for b, picks in enumerate(remove):
        for j, i in enumerate(picks):
            rows.append(b)
            cols.append(j)
            boxes.append(i)
    if not rows:
        return out
    idx = torch.as_tensor(rows, device=feat.device)
    mask = valid[idx].clone()
    mask[torch.arange(len(rows)), torch.as_tensor(boxes, device=feat.device)] = False
    states = tower.sequence(feat[idx], box7[idx], mask)
    scores = (query[idx] * tower.encode_proj(states[:, 0]).float()).sum(-1).cpu().numpy()
    out[rows, cols] = scores
    return out


def prepare(model: BiEncoder, records: Sequence[RegionRecord]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-padded features, 7-d boxes and valid masks of region records, on the model's device."""
    feat, bb, valid, _ = stack_regions(records)
    device, dtype = model.device, model.dtype
    return feat.to(device, dtype), box7_from_norm_bb(bb.to(device, dtype)), valid.to(device)


@torch.inference_mode()
def region_weights(model: BiEncoder, queries: np.ndarray, records: Sequence[RegionRecord], budget: int = REMOVAL_BUDGET,
                   max_boxes: int = 3) -> tuple[np.ndarray, list[list[BoxWeight]]]:
    """For each (query vector, image regions) pair: its score and the boxes whose removal lowers it most.

    ``model`` is a `BiEncoder` with its image tower; ``queries`` (B, D) the text (or image) vectors. Each image
    gets ``max(MIN_CANDIDATES, budget // B)`` candidate boxes (all of them when it has fewer), removed one at a
    time; a box is returned only when removing it lowers the score (at most ``max_boxes``, largest drop first).
    """
    candidates = max(MIN_CANDIDATES, budget // max(1, len(records)))
    if not records:
        return np.zeros(0, np.float32), []
    tower = model.img_model
    feat, box7, valid = prepare(model, records)
    query = torch.as_tensor(np.asarray(queries, np.float32), device=feat.device)
    scores, proxy = gradient_proxy(tower, query, feat, box7, valid)
    picks = []
    for b in range(len(records)):
        n = int(valid[b].sum())
        k = min(candidates, n)
        picks.append(torch.topk(proxy[b, :n], k).indices.tolist() if k else [])
    removed = removal_scores(tower, query, feat, box7, valid, picks)
    base = scores.cpu().numpy()
    out = []
    for b, record in enumerate(records):
        drops = [(float(base[b] - removed[b, j]), i) for j, i in enumerate(picks[b])]
        drops.sort(key=lambda t: -t[0])
        corners = np.clip(np.asarray(record.norm_bb, np.float32)[:, :4], 0, 1).tolist()
        out.append([BoxWeight(i, (corners[i][0], corners[i][1], corners[i][2], corners[i][3]), drop)
                    for drop, i in drops[:max_boxes] if drop > 0])
    return base, out
