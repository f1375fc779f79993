"""The Bottom-Up-Attention Faster R-CNN (ResNet-101 C4, Visual Genome 1600 objects / 400 attributes).

Built from torch/torchvision parts; module names equal the key names of the live hub weights
(``unc-nlp/frcnn-vg-finetuned``) minus BatchNorm's ``num_batches_tracked``, so loading is a pure renaming
(``feature_extraction.detector.weights``).

Pipeline per image (shapes for the full model on a 600x800 input)::

    image (3, 600, 800) -> stem + res2..res4 -> res4 (1024, 38, 50)
    res4 -> RPN (12 anchors / location) -> 300 proposals (boxes in resized-image pixels)
    RoIPool 14x14 @ 1/16 on res4 -> res5 (stride 1, dilation 2) -> mean -> features (300, 2048)
    features -> cls_score (1601, background last), bbox_pred (1600 x 4), attributes (401)
    selection preset (``feature_extraction.detector.selection``) -> RegionFeatures
"""

from __future__ import annotations

import functools
import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, roi_pool

from feature_extraction.detector.config import DetectorConfig, RuntimeOptions
from feature_extraction.detector.ops import apply_deltas, clip_boxes_
from feature_extraction.detector.preprocess import ImageScale, Preprocessed, preprocess
from feature_extraction.detector.selection import (
    LxmertSelection,
    UniterSelection,
    get_preset,
)
from feature_extraction.types import RegionFeatures


# --------------------------------------------------------------------------- building blocks
class FrozenBatchNorm2d(nn.Module):
    """Inference-only batch norm with fixed statistics (buffers named like nn.BatchNorm2d's)."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvNorm(nn.Module):
    """Bias-free conv followed by a frozen batch norm; ``fold_bn`` merges the two (exact up to rounding)."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel, kernel), requires_grad=False)
        self.norm = FrozenBatchNorm2d(c_out, eps)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.folded = False

    def forward(self, x: torch.Tensor, padding: int | None = None, dilation: int | None = None) -> torch.Tensor:
        pad = self.padding if padding is None else padding
        dil = self.dilation if dilation is None else dilation
        if self.folded:
            return F.conv2d(x, self.weight, self.norm.bias, self.stride, pad, dil)
        return self.norm(F.conv2d(x, self.weight, None, self.stride, pad, dil))

    @torch.no_grad()
    def fold_bn(self) -> None:
        """Fold the norm into the conv; the norm's buffers become an identity map plus the folded bias.

        The state dict keeps its names and stays a valid (equivalent) checkpoint.
        """
        if self.folded:
            return
        norm = self.norm
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)  # (C,)
        bias = norm.bias - norm.running_mean * scale
        self.weight.mul_(scale.view(-1, 1, 1, 1))
        norm.weight.fill_(1.0)
        norm.bias.copy_(bias)
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0 - norm.eps)
        self.folded = True


class Bottleneck(nn.Module):
    """ResNet bottleneck with the stride in the first 1x1 conv (MSRA/caffe style)."""

    def __init__(
        self, c_in: int, c_out: int, width: int, stride: int = 1, dilation: int = 1, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.shortcut = ConvNorm(c_in, c_out, 1, stride, eps=eps) if c_in != c_out else None
        self.conv1 = ConvNorm(c_in, width, 1, stride, eps=eps)
        self.conv2 = ConvNorm(width, width, 3, 1, padding=dilation, dilation=dilation, eps=eps)
        self.conv3 = ConvNorm(width, c_out, 1, eps=eps)

    def forward(self, x: torch.Tensor, undilated: bool = False) -> torch.Tensor:
        """``undilated`` runs the 3x3 conv with dilation 1 / padding 1 (used on polyphase res5 maps)."""
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out, 1, 1) if undilated else self.conv2(out))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


def _stage(c_in: int, c_out: int, width: int, blocks: int, stride: int, dilation: int, eps: float) -> nn.Sequential:
    layers = [Bottleneck(c_in, c_out, width, stride, dilation, eps)]
    layers += [Bottleneck(c_out, c_out, width, 1, dilation, eps) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Stem(nn.Module):
    """7x7/2 conv + norm + ReLU + caffe max-pool (kernel 3, stride 2, no padding, ceil mode)."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, channels, 7, 2, padding=3, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


class Backbone(nn.Module):
    """stem + res2 + res3 + res4 (output stride 16)."""

    res2: nn.Sequential  # added by name in __init__, one per entry of ``stage_blocks``
    res3: nn.Sequential
    res4: nn.Sequential

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        eps = cfg.bn_eps
        self.stem = Stem(cfg.stem_channels, eps)
        c_in, c_out, width = cfg.stem_channels, cfg.res2_channels, cfg.res2_bottleneck
        for i, blocks in enumerate(cfg.stage_blocks):
            stride = 1 if i == 0 else 2
            self.add_module(f"res{i + 2}", _stage(c_in, c_out, width, blocks, stride, 1, eps))
            c_in, c_out, width = c_out, c_out * 2, width * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.res4(self.res3(self.res2(x)))  # (N, 1024, H/16, W/16)


class _BufferList(nn.Module):
    """Buffers named ``0``, ``1``, ... (the hub stores the cell anchors as ``cell_anchors.0``)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(str(i), t)

    def __getitem__(self, i: int) -> torch.Tensor:
        return getattr(self, str(i))


def cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> torch.Tensor:
    """Anchors centred on (0, 0), size-major then ratio (h/w), unrounded: (len(sizes) * len(ratios), 4)."""
    rows = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(rows, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.stride = cfg.feature_stride
        self.cell_anchors = _BufferList([cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios)])

    def grid(self, height: int, width: int) -> torch.Tensor:
        """All anchors of a (height, width) map: (height * width * A, 4), rows y-major, x fastest, then A."""
        cells = self.cell_anchors[0].float()  # boxes stay float32 even when the network runs in half precision
        dev = cells.device
        xs = torch.arange(0, width * self.stride, step=self.stride, dtype=torch.float32, device=dev)
        ys = torch.arange(0, height * self.stride, step=self.stride, dtype=torch.float32, device=dev)
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        sx, sy = sx.reshape(-1), sy.reshape(-1)
        shifts = torch.stack((sx, sy, sx, sy), dim=1)  # (HW, 4)
        return (shifts.view(-1, 1, 4) + cells.view(1, -1, 4)).reshape(-1, 4)


class RPNHead(nn.Module):
    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        a = cfg.num_anchors
        self.conv = nn.Conv2d(cfg.res4_channels, cfg.rpn_hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(cfg.rpn_hidden, a, 1)
        self.anchor_deltas = nn.Conv2d(cfg.rpn_hidden, a * 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)  # (N, A, H, W), (N, 4A, H, W)


class ProposalGenerator(nn.Module):
    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.anchor_generator = AnchorGenerator(cfg)
        self.rpn_head = RPNHead(cfg)


class BoxPredictor(nn.Module):
    """Class logits (background last), class-specific box deltas, and the attribute head."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        d = cfg.res5_channels
        self.cls_score = nn.Linear(d, cfg.num_classes + 1)
        self.bbox_pred = nn.Linear(d, cfg.num_classes * 4)
        self.cls_embedding = nn.Embedding(cfg.num_classes + 1, cfg.cls_embed_dim)
        self.fc_attr = nn.Linear(d + cfg.cls_embed_dim, cfg.attr_hidden)
        self.attr_score = nn.Linear(cfg.attr_hidden, cfg.num_attrs + 1)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cls_logits = self.cls_score(feats)  # (R, K + 1)
        deltas = self.bbox_pred(feats)  # (R, 4K)
        top = cls_logits.argmax(dim=-1)  # over all classes, background included (as the reference)
        hidden = F.relu(self.fc_attr(torch.cat([feats, self.cls_embedding(top)], dim=-1)))
        return cls_logits, self.attr_score(hidden), deltas  # attr: (R, num_attrs + 1)


class RoIHeads(nn.Module):
    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        c_in, c_out = cfg.res4_channels, cfg.res5_channels
        # res5 at the pooled resolution: first block stride 1, all 3x3 convs dilation 2 / padding 2.
        self.res5 = _stage(c_in, c_out, cfg.res2_bottleneck * 8, cfg.res5_blocks, 1, 2, cfg.bn_eps)
        self.box_predictor = BoxPredictor(cfg)


# --------------------------------------------------------------------------- outputs
@dataclass
class RawDetections:
    """Everything the box head computes for one image, before any selection."""

    proposals: torch.Tensor  # (R, 4) RPN boxes in resized-image pixels, sorted by objectness
    objectness: torch.Tensor  # (R,) RPN logits
    features: torch.Tensor  # (R, D) mean-pooled res5 features
    cls_logits: torch.Tensor  # (R, K + 1) background last
    attr_logits: torch.Tensor  # (R, num_attrs + 1)
    box_deltas: torch.Tensor  # (R, 4K) class-specific regression
    scale: ImageScale  # sizes before/after resize


@dataclass
class StageTimes:
    """Seconds spent per stage (summed over calls); filled when ``timings`` is passed."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, name: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[name] += now - start
        return now


# --------------------------------------------------------------------------- the detector
class BUTDDetector(nn.Module):
    """Bottom-Up-Attention Faster R-CNN. Build with a config, load weights with ``load_detector``."""

    def __init__(self, config: DetectorConfig | None = None, options: RuntimeOptions | None = None) -> None:
        super().__init__()
        self.config = config or DetectorConfig()
        self.options = options or RuntimeOptions()
        self.backbone = Backbone(self.config)
        self.proposal_generator = ProposalGenerator(self.config)
        self.roi_heads = RoIHeads(self.config)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        # Picklable (no model inside): what the extraction pipeline runs in its worker processes.
        self.preprocess = functools.partial(preprocess, config=self.config)

    # ----------------------------------------------------------------- setup
    def conv_norms(self) -> list[ConvNorm]:
        return [m for m in self.modules() if isinstance(m, ConvNorm)]

    def optimize(self, options: RuntimeOptions | None = None) -> "BUTDDetector":
        """Apply runtime options (BN folding, memory format) after the weights are loaded."""
        if options is not None:
            self.options = options
        if self.options.fold_bn:
            for m in self.conv_norms():
                m.fold_bn()
        fmt = torch.channels_last if self.options.channels_last else torch.contiguous_format
        for module in self.modules():
            if isinstance(module, (ConvNorm, nn.Conv2d)):
                module.weight.data = module.weight.data.contiguous(memory_format=fmt)
        return self

    @property
    def device(self) -> torch.device:
        return self.roi_heads.box_predictor.cls_score.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.roi_heads.box_predictor.cls_score.weight.dtype

    def _fmt(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.options.channels_last else x.contiguous()

    # ----------------------------------------------------------------- stages
    def backbone_features(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """res4 maps (1, C, h, w) per image; images of equal size run as one batch (no padding)."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            groups[(img.shape[-2], img.shape[-1])].append(i)
        out: dict[int, torch.Tensor] = {}
        for idxs in groups.values():
            batch = torch.stack([images[i] for i in idxs]).to(self.device, self.dtype)
            feats = self.backbone(self._fmt(batch))
            for j, i in enumerate(idxs):
                out[i] = feats[j : j + 1]
        return [out[i] for i in range(len(images))]

    def propose(self, res4: torch.Tensor, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """RPN on one res4 map (1, C, H, W) -> (boxes (R, 4), logits (R,)) sorted by logit."""
        cfg = self.config
        pg = self.proposal_generator
        logits, deltas = pg.rpn_head(res4)
        _, a, h, w = logits.shape
        logits = logits[0].permute(1, 2, 0).reshape(-1).float()  # (H*W*A,)
        deltas = deltas[0].reshape(a, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4).float()  # (H*W*A, 4)
        anchors = pg.anchor_generator.grid(h, w)
        k = min(cfg.rpn_pre_nms_topk, logits.numel())
        scores, order = logits.sort(descending=True)
        scores, top = scores[:k], order[:k]
        boxes = apply_deltas(deltas[top], anchors[top], cfg.rpn_box_weights, cfg.box_scale_clamp)
        clip_boxes_(boxes, image_size[0], image_size[1])
        ok = ((boxes[:, 2] - boxes[:, 0]) > cfg.rpn_min_size) & ((boxes[:, 3] - boxes[:, 1]) > cfg.rpn_min_size)
        if not bool(ok.all()):
            boxes, scores = boxes[ok], scores[ok]
        keep = nms(boxes, scores, cfg.rpn_nms_thresh)[: cfg.rpn_post_nms_topk]
        boxes, scores = boxes[keep], scores[keep]
        scores, order = scores.sort(descending=True)
        return boxes[order], scores

    def pool(self, res4: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor]) -> torch.Tensor:
        """RoIPool (res at 1/stride) of every image's proposals, concatenated: (sum R, C, P, P)."""
        cfg = self.config
        pooled = []
        for feat, boxes in zip(res4, proposals):
            rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1).to(feat.dtype)
            pooled.append(
                roi_pool(feat.contiguous(), rois, cfg.pooler_resolution, spatial_scale=1.0 / cfg.feature_stride)
            )
        return torch.cat(pooled)

    def res5_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """res5 + spatial mean of pooled RoIs (R, C, P, P) -> (R, D), honouring the runtime options."""
        opts = self.options
        if pooled.shape[0] == 0:  # an image without a single proposal (blank, or degenerate weights)
            return pooled.new_zeros(0, self.config.res5_channels)
        if not opts.polyphase_res5:
            return self._run_res5_chunked(pooled, undilated=False)
        r, c, p, _ = pooled.shape
        if p % 2:
            raise ValueError("polyphase res5 needs an even pooler resolution")
        # A dilation-2, stride-1 res5 never mixes the 4 parity classes of pixels: run them as 4 maps.
        phases = pooled.reshape(r, c, p // 2, 2, p // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(r * 4, c, p // 2, p // 2)
        if opts.dedup_res5:
            unique_idx, inverse = unique_rows(phases.reshape(r * 4, -1))
            if len(unique_idx) == r * 4:  # nothing to share: skip the gather copy
                feats = self._run_res5_chunked(phases, undilated=True)
            else:
                feats = self._run_res5_chunked(phases[unique_idx], undilated=True)[inverse]
        else:
            feats = self._run_res5_chunked(phases, undilated=True)
        return feats.reshape(r, 4, -1).mean(dim=1)

    def _run_res5_chunked(self, x: torch.Tensor, undilated: bool) -> torch.Tensor:
        chunk = self.options.roi_chunk
        step = len(x) if not chunk else chunk * (4 if undilated else 1)
        outs = []
        for start in range(0, len(x), max(step, 1)):
            y = self._fmt(x[start : start + step])
            for block in self.roi_heads.res5:
                y = block(y, undilated=undilated)
            outs.append(y.mean(dim=(2, 3)))
        if not outs:
            return x.new_zeros(0, self.config.res5_channels)
        return torch.cat(outs)

    # ----------------------------------------------------------------- full passes
    @torch.inference_mode()
    def detect(self, images: Sequence[DetectorInput], timings: StageTimes | None = None,
               on_image: Callable[[int], None] | None = None) -> list[RawDetections]:
        """Run the network on preprocessed images; no selection. Batch results equal one-by-one runs.
        ``on_image(n)``: called as each image is done (``n`` of this call so far), for progress per image.

        Memory does not grow with the batch: the backbone sees at most ``options.backbone_pixels`` pixels per
        call, and the RPN, RoI pooling, res5 and the box head run one image at a time (300 pooled RoIs are
        ~240 MB in float32; a batch of 8 pooled together, and copied twice by the polyphase res5, took ~5.8 GB).
        """
        prepared = [as_preprocessed(im) for im in images]
        out: list[RawDetections] = []
        for group in self._backbone_groups(prepared):
            t = time.perf_counter()
            res4 = deque(self.backbone_features([im.tensor for im in group]))
            if timings:
                timings.add("backbone", t)
            for im in group:
                out.append(self._detect_one(res4.popleft(), im, timings))  # each map freed once its image is done
                if on_image is not None:
                    on_image(len(out))
        return out

    def _backbone_groups(self, images: list[Preprocessed]) -> list[list[Preprocessed]]:
        """Consecutive runs of images whose pixels sum to at most ``options.backbone_pixels`` (one image at least)."""
        budget = self.options.backbone_pixels
        groups: list[list[Preprocessed]] = []
        pixels = 0
        for im in images:
            size = int(im.tensor.shape[-1]) * int(im.tensor.shape[-2])
            if not groups or (budget is not None and pixels + size > budget):
                groups.append([])
                pixels = 0
            groups[-1].append(im)
            pixels += size
        return groups

    def _detect_one(self, res4: torch.Tensor, im: Preprocessed, timings: StageTimes | None) -> RawDetections:
        """RPN, RoI pooling, res5 and the box head of one image's res4 map."""
        t = time.perf_counter()
        boxes, scores = self.propose(res4, im.scale.resized_size)
        t = timings.add("rpn", t) if timings else t
        pooled = self.pool([res4], [boxes])
        t = timings.add("roi_pool", t) if timings else t
        feats = self.res5_features(pooled).float()
        del pooled
        t = timings.add("res5", t) if timings else t
        cls_logits, attr_logits, deltas = self.roi_heads.box_predictor(feats.to(self.dtype))
        if timings:
            timings.add("box_predictor", t)
        return RawDetections(boxes, scores, feats, cls_logits.float(), attr_logits.float(), deltas.float(), im.scale)

    def extract(
        self,
        images: Sequence[DetectorInput],
        preset: str | UniterSelection | LxmertSelection = "uniter",
        with_soft_labels: bool = False,
        timings: StageTimes | None = None,
        on_image: Callable[[int], None] | None = None,
    ) -> list[RegionFeatures]:
        """Region features of each image under a selection preset (``"uniter"`` or ``"lxmert36"``).

        ``images`` are :func:`preprocess` results, or the pipeline's ``(tensor, scale, (H, W))`` tuples.
        One record per image, in order; boxes in original-image pixels. ``on_image``: see `detect`.
        """
        selector = get_preset(preset)
        raws = self.detect(images, timings, on_image)
        t = time.perf_counter()
        with torch.inference_mode():
            out = [selector.select(raw, self.config, with_soft_labels) for raw in raws]
        if timings:
            timings.add("selection", t)
        return out


DetectorInput = Preprocessed | tuple  # Preprocessed, (tensor, ImageScale) or (tensor, scale, (H, W))


def as_preprocessed(item: DetectorInput) -> Preprocessed:
    """Normalise a detector input: a :class:`Preprocessed`, ``(tensor, ImageScale)``, or the extraction
    pipeline's ``(tensor (3, h, w), h / H, (H, W))`` -- the per-axis factors come from the two sizes."""
    if isinstance(item, Preprocessed):
        return item
    if len(item) == 2 and isinstance(item[1], ImageScale):
        return Preprocessed(torch.as_tensor(item[0]), item[1])
    if len(item) == 3:
        tensor = torch.as_tensor(item[0])
        height, width = (int(v) for v in item[2])
        return Preprocessed(tensor, ImageScale((height, width), (int(tensor.shape[-2]), int(tensor.shape[-1]))))
    raise TypeError(f"not a detector input: {type(item).__name__}")


def unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact de-duplication of the rows of a 2-D float tensor.

    Returns ``(unique_idx, inverse)`` with ``rows[unique_idx][inverse]`` bitwise equal to ``rows``.
    Rows are grouped by an integer hash of their bits, then confirmed with an exact comparison, so a
    hash collision can only cost speed, never correctness.
    """
    n = rows.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=rows.device), torch.zeros(0, dtype=torch.long, device=rows.device)
    bits = rows.contiguous().view(torch.int32) if rows.dtype == torch.float32 else rows.float().contiguous().view(torch.int32)
    # Hash a strided sample of each row's bits (cheap); equal rows always hash alike, and every candidate
    # duplicate is confirmed on the full row below.
    sample = bits[:, :: max(1, bits.shape[1] // 2048)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    mult = torch.randint(1, 2**31 - 1, (sample.shape[1],), generator=gen, dtype=torch.int64).to(rows.device)
    hashes = (sample.to(torch.int64) * mult).sum(dim=1)  # integer arithmetic: exact and order-free
    _, first_of = torch.unique(hashes, return_inverse=True)
    rep: dict[int, list[int]] = {}
    inverse = torch.empty(n, dtype=torch.long)
    unique: list[int] = []
    for i, g in enumerate(first_of.tolist()):
        for u in rep.get(g, [])[:8]:  # bounded work if many distinct rows share a sampled hash
            if torch.equal(bits[unique[u]], bits[i]):
                inverse[i] = u
                break
        else:
            rep.setdefault(g, []).append(len(unique))
            inverse[i] = len(unique)
            unique.append(i)
    return torch.tensor(unique, dtype=torch.long, device=rows.device), inverse.to(rows.device)
