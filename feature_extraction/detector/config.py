"""Configuration of the Bottom-Up-Attention Faster R-CNN (R101-C4, Visual Genome).

``DetectorConfig`` describes the network and its fixed inference settings; ``RuntimeOptions``
describes *how* it runs (speed switches that do not change results beyond fp rounding).

The values of the full preset reproduce the LXMERT demo's port behind ``unc-nlp/frcnn-vg-finetuned``
and py-bottom-up-attention's ``faster_rcnn_R_101_C4_attr_caffemaxpool`` config with the demo
overrides (300 post-NMS proposals). The hub's ``config.yaml`` could not be read offline: the values
below are reconstructed from the reference code defaults and the published BUTD settings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from models.core.config import config_from_dict


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture and inference settings of the detector (one comment per field)."""

    stem_channels: int = 64  # output channels of the 7x7 stem conv
    res2_channels: int = 256  # output channels of res2; res3, res4 and res5 double it stage by stage
    res2_bottleneck: int = 64  # bottleneck width of res2; doubles stage by stage like the outputs
    stage_blocks: tuple[int, int, int] = (3, 4, 23)  # blocks in res2, res3, res4 (ResNet-101)
    res5_blocks: int = 3  # blocks of the res5 RoI head
    bn_eps: float = 1e-5  # epsilon of the frozen batch norms
    rpn_hidden: int = 512  # channels of the RPN 3x3 conv
    anchor_sizes: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)  # anchor side lengths (input pixels)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # anchor aspect ratios h/w (size-major order)
    feature_stride: int = 16  # stride of res4, where the RPN runs and RoIs are pooled
    rpn_pre_nms_topk: int = 6000  # proposals kept by objectness before the RPN NMS
    rpn_post_nms_topk: int = 300  # proposals kept after the RPN NMS
    rpn_nms_thresh: float = 0.7  # IoU threshold of the RPN NMS
    rpn_min_size: float = 0.0  # proposals need width and height > this (input pixels)
    rpn_box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # RPN delta weights
    roi_box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # box head delta weights
    box_scale_clamp: float = math.log(1000.0 / 16)  # max dw/dh before exp, as in detectron2
    pooler_resolution: int = 14  # RoIPool output size (res5 runs at this size, stride 1)
    num_classes: int = 1600  # object classes without background (background is the LAST logit)
    num_attrs: int = 400  # attribute classes (the 401st logit is dropped)
    cls_embed_dim: int = 256  # class embedding width fed to the attribute head
    attr_hidden: int = 512  # hidden width of the attribute head
    pixel_mean_bgr: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)  # BGR means subtracted
    min_size: int = 600  # target length of the shorter image side
    max_size: int = 1000  # cap on the longer image side

    @property
    def res4_channels(self) -> int:
        """Channels of the res4 map (RPN and RoIPool input)."""
        return self.res2_channels * 4

    @property
    def res5_channels(self) -> int:
        """Width of a region feature (2048 for the full model)."""
        return self.res2_channels * 8

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map location."""
        return len(self.anchor_sizes) * len(self.anchor_ratios)

    def to_dict(self) -> dict:
        """JSON-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: object, what: str = "") -> "DetectorConfig":
        """Inverse of :meth:`to_dict`; unknown keys and wrong shapes are a `ConfigError` (the one config policy)."""
        return config_from_dict(cls, data, what)


def butd_r101_config() -> DetectorConfig:
    """The full-size BUTD R101-C4 detector of ``unc-nlp/frcnn-vg-finetuned`` / py-bottom-up-attention."""
    return DetectorConfig()


def tiny_config() -> DetectorConfig:
    """A few-channel, one-block-per-stage detector for fast tests (same code paths, random weights)."""
    return DetectorConfig(
        stem_channels=8,
        res2_channels=16,
        res2_bottleneck=4,
        stage_blocks=(1, 1, 2),
        res5_blocks=2,
        rpn_hidden=16,
        num_classes=20,
        num_attrs=8,
        cls_embed_dim=16,
        attr_hidden=32,
        min_size=96,
        max_size=160,
        rpn_pre_nms_topk=400,
        rpn_post_nms_topk=60,
    )


CONFIGS = {"butd-r101-vg": butd_r101_config, "tiny": tiny_config}


@dataclass
class RuntimeOptions:
    """How the detector runs; none of these change results beyond floating-point rounding."""

    fold_bn: bool = True  # fold the frozen batch norms into the conv weights at load time
    channels_last: bool = True  # NHWC memory format for the convolutions (faster with oneDNN on CPU)
    polyphase_res5: bool = True  # run res5 as 4 independent 7x7 phase maps (exact: res5 is stride 1, dilation 2)
    dedup_res5: bool = True  # compute res5 once per distinct pooled phase map (exact: same input, same output)
    roi_chunk: int | None = 32  # RoIs per res5 chunk (bounds memory; None = all at once)
    # pixels (after resizing) per backbone call: batches of same-size images run together up to this (bounds the
    # activations: ~0.15 GB per 600x1000 image on a CPU); None = the whole batch at once
    backbone_pixels: int | None = 2_400_000

    @classmethod
    def plain(cls) -> "RuntimeOptions":
        """The straightforward port: every optimisation off (the benchmark's baseline)."""
        return cls(fold_bn=False, channels_last=False, polyphase_res5=False, dedup_res5=False, roi_chunk=None,
                   backbone_pixels=None)
