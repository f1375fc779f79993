"""ViLT (Kim et al., 2021) as a cross-encoder that reads pixels: no detector, no region features.

``ViltForImageAndTextRetrieval`` (transformers) scores one (text, image) pair per row: ``[CLS] text [SEP]`` (BERT
uncased word-pieces, at most ``max_position_embeddings`` = 40) and the image's 32x32 patches in one transformer; the
score is ``rank_output`` on the pooled [CLS] (``logits[:, 0]``), higher is a better match.

Preprocessing is `ViltImageProcessor`'s, read from the model's ``preprocessor_config.json`` (never hard-coded):
the shortest edge resized to ``shortest_edge`` (384) with the longest kept at most ``int(1333 / 800 * 384)`` = 639,
both rounded down to a multiple of ``size_divisor`` (32), bicubic with antialiasing on the uint8 image; then
``(x / 255 - mean) / std``. Images of a batch are zero-padded bottom-right to the largest, with a ``pixel_mask``
(1 on the image): a pair's score does not depend on what it is batched with. Decoding (EXIF rotation, CMYK, 16-bit,
HEIC) is ldot's own (`feature_extraction.images.decode`); this module takes the decoded (H, W, 3) uint8 array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.core.errors import CheckpointError
from models.nn.tokenizer import Tokenizer, pad_ids

VILT_HEAD = "ViltForImageAndTextRetrieval"  # the transformers class (config.json's architectures) re-ranking needs
VILT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what a ViLT folder holds its weights in, preferred first
PREPROCESSOR_FILE = "preprocessor_config.json"  # the image processor's settings, beside the model's config.json
# ViltImageProcessor's bound on the longer edge: the COCO aspect ratio of its training resolution (800 x 1333).
MAX_LONGER_EDGE, MAX_SHORTER_EDGE = 1333, 800
# PIL resampling ids (what a preprocessor_config.json names) -> torchvision's modes.
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class PixelPreprocessing:
    """What `ViltImageProcessor` does to an image, as its ``preprocessor_config.json`` says."""

    shortest_edge: int = 384
    size_divisor: int = 32
    resample: str = "bicubic"
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def longest_edge(self) -> int:
        return int(MAX_LONGER_EDGE / MAX_SHORTER_EDGE * self.shortest_edge)

    @classmethod
    def from_processor_config(cls, data: Any, what: str = "preprocessor_config.json") -> PixelPreprocessing:
        """From a parsed ``preprocessor_config.json``; every value is checked (a hub file is input like any other)."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{what} is not a JSON object")
        size = data.get("size", {"shortest_edge": 384})
        shortest = size.get("shortest_edge") if isinstance(size, dict) else size
        fields: dict[str, Any] = {"shortest_edge": shortest, "size_divisor": data.get("size_divisor", 32)}
        for name in ("shortest_edge", "size_divisor"):
            value = fields[name]
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
                raise CheckpointError(f"{what}: {name} {value!r} is not a whole number of pixels in 1..4096")
        resample = data.get("resample", 3)
        if resample not in RESAMPLE:
            raise CheckpointError(f"{what}: resample {resample!r} is not one of {sorted(RESAMPLE)} (nearest, bilinear, "
                                  "bicubic)")
        fields["resample"] = RESAMPLE[resample]
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            value = data.get(flag, True)
            if not isinstance(value, bool):
                raise CheckpointError(f"{what}: {flag} {value!r} is not true/false")
            fields[flag] = value
        factor = data.get("rescale_factor", 1 / 255)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not (0 < factor <= 1):
            raise CheckpointError(f"{what}: rescale_factor {factor!r} is not in (0, 1]")
        fields["rescale_factor"] = float(factor)
        for name, key in (("mean", "image_mean"), ("std", "image_std")):
            value = data.get(key, [0.5, 0.5, 0.5])
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value] * 3
            if (not isinstance(value, list) or len(value) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in value)):
                raise CheckpointError(f"{what}: {key} {value!r} is not three finite numbers")
            if name == "std" and any(v <= 0 for v in value):
                raise CheckpointError(f"{what}: image_std {value!r} must be positive")
            fields[name] = tuple(float(v) for v in value)
        return cls(**fields)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to (`ViltImageProcessor.resize`'s arithmetic); at least
        one ``size_divisor`` each way (a very thin image would otherwise have no patch)."""
        shorter, longer = self.shortest_edge, self.longest_edge
        if height < width:
            new_h, new_w = float(shorter), width * (shorter / height)
        else:
            new_h, new_w = height * (shorter / width), float(shorter)
        if max(new_h, new_w) > longer:
            scale = longer / max(new_h, new_w)
            new_h, new_w = new_h * scale, new_w * scale
        new_h, new_w = int(new_h + 0.5), int(new_w + 0.5)
        d = self.size_divisor
        return max(d, new_h // d * d), max(d, new_w // d * d)

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        """A decoded (H, W, 3) uint8 RGB image -> (3, h, w) float32 pixel values."""
        array = np.asarray(rgb)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or 0 in array.shape:
            raise ValueError(f"expected a decoded (H, W, 3) uint8 RGB image, got {array.dtype} {array.shape}")
        if not array.flags.writeable:  # torch wants a writable buffer (decoded images may be read-only views)
            array = array.copy()
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        if self.do_resize:
            from torchvision.transforms.v2 import InterpolationMode
            from torchvision.transforms.v2 import functional as tvf

            size = list(self.output_size(array.shape[0], array.shape[1]))
            image = tvf.resize(image, size, interpolation=InterpolationMode(self.resample), antialias=True)
        if self.do_normalize:  # rescale and normalise fused, as the processor does
            scale = 1.0 / self.rescale_factor if self.do_rescale else 1.0
            mean = torch.tensor(self.mean) * scale
            std = torch.tensor(self.std) * scale
            return (image.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
        if self.do_rescale:
            return image.to(torch.float32) * self.rescale_factor
        return image.to(torch.float32)


def pad_pixels(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, h, w) images -> (pixel_values (B, 3, H, W) zero-padded bottom-right, pixel_mask (B, H, W) long)."""
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    values = torch.zeros((len(images), 3, height, width), dtype=images[0].dtype)
    mask = torch.zeros((len(images), height, width), dtype=torch.long)
    for i, im in enumerate(images):
        values[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = 1
    return values, mask


class ViltReranker:
    """``ViltForImageAndTextRetrieval`` behind the re-ranker interface, for images given as pixels.

    ``prepare(rgb)`` preprocesses one decoded image (do it once per image); ``score_pixels(texts, images)``
    scores the pairs (texts[i], images[i]) in batches of `batch_size` and returns float32 (n,).
    """

    inputs = "pixels"  # what a caller hands `score_pixels` (the region re-rankers' is "regions")
    batch_size = 32
    # measured on the 2-core development machine, ViLT-B/32 at 384 x 576 (full-size config, random weights): the
    # range a CPU may expect per pair (benchmarks/rerank_live.py prints the figure)
    cpu_seconds_per_pair = (0.05, 0.15)

    def __init__(self, model: Any, tokenizer: Tokenizer, preprocessing: PixelPreprocessing) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prepare = preprocessing
        self.device = next(model.parameters()).device
        self.max_text_tokens = int(model.config.max_position_embeddings)
        self._ids: dict[str, list[int]] = {}

    def token_rows(self, texts: Sequence[str]) -> list[list[int]]:
        """``[CLS] word-pieces [SEP]`` of each text, cut to the model's `max_text_tokens` (its [SEP] kept)."""
        for text in set(texts) - self._ids.keys():
            self._ids[text] = self.tokenizer.encode(text, self.max_text_tokens)
        return [self._ids[t] for t in texts]

    def truncates(self, text: str) -> bool:
        """Whether ``text`` is longer than the model reads."""
        return len(self.tokenizer.encode(text)) > self.max_text_tokens

    @torch.inference_mode()
    def score_pixels(self, texts: Sequence[str], images: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(texts) != len(images):
            raise ValueError(f"score needs one text per image: got {len(texts)} texts, {len(images)} images")
        rows = self.token_rows(texts)
        dtype = next(self.model.parameters()).dtype
        out = []
        for start in range(0, len(rows), self.batch_size):
            stop = start + self.batch_size
            ids, mask = pad_ids(rows[start:stop], self.tokenizer.pad_id)
            values, pixel_mask = pad_pixels(images[start:stop])
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                token_type_ids=torch.zeros_like(ids).to(self.device),
                                pixel_values=values.to(self.device, dtype), pixel_mask=pixel_mask.to(self.device)).logits
            out.append(logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def score_images(self, texts: Sequence[str], images: Sequence[np.ndarray]) -> torch.Tensor:
        """Pairs of texts and decoded (H, W, 3) uint8 images (each image preprocessed here)."""
        return self.score_pixels(texts, [self.prepare(im) for im in images])
