"""Dual encoders that read pixels (CLIP, SigLIP): `transformers`' own towers, ldot's encoding interface.

The vectors are the model's ``get_text_features`` / ``get_image_features``, L2-normalised (the cosine is what
CLIP's logit scale and SigLIP's scale and bias only rescale). The image tower reads what `preprocess_pixels`
makes of a decoded RGB image: the model's own image processor (``preprocessor_config.json``: resize, centre
crop, rescale, normalise), done with the same torchvision operations `transformers`' processor uses, in the
decoding worker processes. Texts go through the model's own tokenizer, cut at its maximum (SigLIP's padded
to ``max_length``, as it was trained).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from models.core.errors import CheckpointError
from models.core.progress import ProgressFn, report
from models.nn.encoder import Inputs, encode_in_batches

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# the worker-side preprocessing of a model that reads pixels (picklable): decoded (H, W, 3) uint8 RGB ->
# ((3, h, w) float32 pixels, h / H)
PixelPreprocess = Callable[[np.ndarray], "tuple[torch.Tensor, float]"]

# the architectures, by `model_type` in config.json: (transformers model class, image processor class, text padding,
# the image tower alone: what indexing loads)
ARCHITECTURES = {"clip": ("CLIPModel", "CLIPImageProcessor", "longest", "CLIPVisionModelWithProjection"),
                 "siglip": ("SiglipModel", "SiglipImageProcessor", "max_length", "SiglipVisionModel")}
# PIL resampling codes (what preprocessor_config.json holds) -> torchvision's interpolation names
_RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC"}
MAX_SIDE = 4096  # sizes read from a processor config are checked against this before anything is allocated


@dataclass(frozen=True)
class PixelSpec:
    """The image processor's settings, checked (picklable: it travels to the decoding workers)."""

    resize: tuple[str, int, int] | None  # ("shortest_edge", n, 0) or ("exact", height, width); None: no resize
    resample: str  # torchvision InterpolationMode name
    crop: tuple[int, int] | None  # centre crop (height, width)
    rescale: float | None  # multiply by this (1/255) before normalising
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @classmethod
    def from_config(cls, raw: dict[str, Any], defaults: dict[str, Any], where: str) -> PixelSpec:
        """From a ``preprocessor_config.json`` (``raw``) over the processor class's own defaults."""
        def get(key: str) -> Any:
            return raw[key] if key in raw and raw[key] is not None else defaults.get(key)

        def side(value: Any, what: str) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIDE:
                raise CheckpointError(f"{where}: {what} {value!r} is not a size in pixels (1-{MAX_SIDE})")
            return value

        def triple(value: Any, what: str, positive: bool = False) -> tuple[float, float, float]:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value] * 3
            if (not isinstance(value, (list, tuple)) or len(value) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                               and (v > 0 or not positive) for v in value)):
                raise CheckpointError(f"{where}: {what} {value!r} is not three finite numbers")
            first, second, third = (float(v) for v in value)
            return first, second, third

        resize = None
        if get("do_resize"):
            size = get("size")
            if isinstance(size, int) and not isinstance(size, bool):
                size = {"shortest_edge": size} if not defaults.get("default_to_square", True) else \
                    {"height": size, "width": size}
            if isinstance(size, dict) and "shortest_edge" in size and size.get("longest_edge") is None:
                resize = ("shortest_edge", side(size["shortest_edge"], "size.shortest_edge"), 0)
            elif isinstance(size, dict) and "height" in size and "width" in size:
                resize = ("exact", side(size["height"], "size.height"), side(size["width"], "size.width"))
            else:
                raise CheckpointError(f"{where}: size {size!r} is not one ldot reads (shortest_edge, or height and "
                                      "width)")
        resample = get("resample")
        resample = 2 if resample is None else resample
        if resample not in _RESAMPLE:
            raise CheckpointError(f"{where}: resample {resample!r} is not one ldot reads "
                                  f"({', '.join(f'{k} {v.lower()}' for k, v in _RESAMPLE.items())})")
        crop = None
        if get("do_center_crop"):
            size = get("crop_size")
            if isinstance(size, int) and not isinstance(size, bool):
                size = {"height": size, "width": size}
            if not isinstance(size, dict) or "height" not in size or "width" not in size:
                raise CheckpointError(f"{where}: crop_size {size!r} is not a height and width")
            crop = (side(size["height"], "crop_size.height"), side(size["width"], "crop_size.width"))
        rescale = None
        if get("do_rescale"):
            factor = get("rescale_factor")
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor < 1e3:
                raise CheckpointError(f"{where}: rescale_factor {factor!r} is not a positive number")
            rescale = float(factor)
        mean = std = None
        if get("do_normalize"):
            mean = triple(get("image_mean"), "image_mean")
            std = triple(get("image_std"), "image_std", positive=True)
        return cls(resize, _RESAMPLE[resample], crop, rescale, mean, std)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every preprocessed image when it is fixed (a crop, or an exact resize)."""
        if self.crop is not None:
            return self.crop
        if self.resize is not None and self.resize[0] == "exact":
            return self.resize[1], self.resize[2]
        return None


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The processor's resize to ``size`` on the shorter side (``get_resize_output_image_size``, not square)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def preprocess_pixels(rgb: np.ndarray, spec: PixelSpec) -> tuple[torch.Tensor, float]:
    """A decoded (H, W, 3) uint8 RGB image -> ((3, h, w) float32 model input, h / H), as the model's own image
    processor makes it (`transformers`' torchvision backend: uint8 antialiased resize, centre crop with zero
    padding when the image is smaller, then rescale and normalise fused into one float32 normalisation)."""
    from torchvision.transforms.v2 import functional as tvf

    rgb = np.ascontiguousarray(rgb)
    image = torch.from_numpy(rgb if rgb.flags.writeable else rgb.copy()).permute(2, 0, 1)
    height = image.shape[1]
    if spec.resize is not None:
        kind, a, b = spec.resize
        size = _shortest_edge_size(image.shape[1], image.shape[2], a) if kind == "shortest_edge" else (a, b)
        image = tvf.resize(image, list(size), interpolation=getattr(tvf.InterpolationMode, spec.resample),
                           antialias=True)
    if spec.crop is not None:
        crop_h, crop_w = spec.crop
        h, w = image.shape[1:]
        if crop_w > w or crop_h > h:
            pad = [(crop_w - w) // 2 if crop_w > w else 0, (crop_h - h) // 2 if crop_h > h else 0,
                   (crop_w - w + 1) // 2 if crop_w > w else 0, (crop_h - h + 1) // 2 if crop_h > h else 0]
            image = tvf.pad(image, pad, fill=0)
            h, w = image.shape[1:]
        if (crop_h, crop_w) != (h, w):
            image = tvf.crop(image, int((h - crop_h) / 2.0), int((w - crop_w) / 2.0), crop_h, crop_w)
    scale = image.shape[1] / height
    if spec.mean is not None and spec.std is not None:
        factor = 1.0 / spec.rescale if spec.rescale else 1.0
        mean = (torch.tensor(spec.mean) * factor).tolist() if spec.rescale else list(spec.mean)
        std = (torch.tensor(spec.std) * factor).tolist() if spec.rescale else list(spec.std)
        pixels = tvf.normalize(image.to(torch.float32), mean, std)
    elif spec.rescale:
        pixels = image.to(torch.float32) * spec.rescale
    else:
        pixels = image.to(torch.float32)
    return pixels.contiguous(), scale


class _Towers(Protocol):
    """What a two-tower `transformers` model (``CLIPModel``, ``SiglipModel``) adds to `PreTrainedModel`."""

    def get_text_features(self, **inputs: torch.Tensor) -> object: ...

    def get_image_features(self, *, pixel_values: torch.Tensor) -> object: ...


class DualEncoder(nn.Module):
    """A CLIP or SigLIP model (``transformers``) with ldot's encoding interface (`models.nn.encoder.Encoder`):
    unit vectors, cosine score; `encode_images` takes what `pixel_preprocess` made of each image."""

    inputs: Inputs = "pixels"

    model: PreTrainedModel

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pixels: PixelSpec, model_type: str,
                 max_text_tokens: int) -> None:
        super().__init__()
        if model_type not in ARCHITECTURES:
            raise CheckpointError(f"{model_type!r} is not a dual-encoder architecture ldot reads (clip, siglip)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pixels = pixels
        self.model_type = model_type
        self.padding = ARCHITECTURES[model_type][2]
        self.max_text_tokens = max_text_tokens  # special tokens included (CLIP 77, SigLIP 64)
        config = model.config
        self.image_only = not hasattr(config, "text_config")  # the image tower alone (indexing loads no more)
        self.project_dim = int(getattr(config, "projection_dim", 0) or
                               (config.hidden_size if self.image_only else config.text_config.hidden_size))
        self._specials = len(tokenizer("").get("input_ids", []))  # what the tokenizer adds to every text

    @property
    def pixel_preprocess(self) -> PixelPreprocess:
        """The worker-side preprocessing (picklable): decoded RGB -> ((3, h, w) float32, scale)."""
        return functools.partial(preprocess_pixels, spec=self.pixels)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- texts -----------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's own tokenization: cut at its maximum; SigLIP padded to it."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of strings, not one string")
        out = self.tokenizer(list(texts), padding=self.padding, truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")
        return {k: out[k] for k in ("input_ids", "attention_mask") if k in out}

    def text_tokens(self, text: str) -> tuple[int, int]:
        """(tokens of ``text``, tokens the model reads), the tokenizer's start/end tokens not counted."""
        ids = self.tokenizer(text, truncation=False)["input_ids"]
        return len(ids) - self._specials, self.max_text_tokens - self._specials

    def text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unit vectors of tokenized texts (with gradients: fine-tuning uses it)."""
        if self.image_only:
            raise RuntimeError("this dual encoder was loaded with its image tower only")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        towers = cast(_Towers, self.model)  # both towers: not `image_only`
        return nn.functional.normalize(_features(towers.get_text_features(**inputs)).float(), dim=-1)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit vectors of preprocessed images (B, 3, h, w) (with gradients: fine-tuning uses it)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        if self.image_only:  # CLIPVisionModelWithProjection / SiglipVisionModel: the same tower and projection
            out = self.model(pixel_values=pixel_values)
            features = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
        else:
            features = _features(cast(_Towers, self.model).get_image_features(pixel_values=pixel_values))
        return nn.functional.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (n, D) float32 unit vectors."""
        return encode_in_batches(texts, batch_size, lambda chunk: self.text_features(self.tokenize(chunk)).cpu(),
                                 self.project_dim)

    # -- images ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Preprocessed images (B, 3, h, w) -> (B, D) float32 unit vectors."""
        pixel_values = torch.as_tensor(pixel_values)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"expected pixel values (B, 3, h, w), got {tuple(pixel_values.shape)}")
        return self.image_features(pixel_values).cpu()

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Any], batch_size: int = 32, progress: ProgressFn | None = None,
                      stage: str = "encoding images") -> torch.Tensor:
        """Preprocessed images ((3, h, w) arrays, or anything with a ``pixels`` one) -> (n, D) unit vectors."""
        out = torch.empty(len(images), self.project_dim)
        for start in range(0, len(images), batch_size):
            chunk = [np.asarray(getattr(im, "pixels", im), dtype=np.float32) for im in images[start:start + batch_size]]
            out[start:start + len(chunk)] = self.encode_pixels(torch.from_numpy(np.stack(chunk)))
            report(progress, stage, start + len(chunk), len(images), "images")
        return out

    @staticmethod
    def score(text_vectors: torch.Tensor, image_vectors: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (n_text, n_image) of the unit vectors."""
        return text_vectors @ image_vectors.T


def _features(out: object) -> torch.Tensor:
    """``get_*_features``' result: a tensor in some `transformers` versions, an output with it pooled in others."""
    return out if isinstance(out, torch.Tensor) else getattr(out, "pooler_output")
