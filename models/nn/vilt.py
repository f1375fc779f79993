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

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.core.errors import CheckpointError
from models.nn.bi_encoder import TokenizerSpec, tokenizer_from_spec
from models.nn.decomposed import VLDeformerObjective
from models.nn.encoder import Inputs, encode_in_batches
from models.nn.tokenizer import Tokenizer, pad_ids

if TYPE_CHECKING:
    from transformers import ViltForImageAndTextRetrieval

    from models.core.progress import ProgressFn
    from models.nn.dual import PixelPreprocess
    from models.nn.pretraining import PairBatch

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
    def from_processor_config(cls, data: object, what: str = "preprocessor_config.json") -> PixelPreprocessing:
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

    inputs: Inputs = "pixels"  # what a caller hands `score_pixels` (the region re-rankers' is "regions")
    batch_size = 32
    # the range a 2-core CPU may expect per pair (benchmarks/rerank_live.py: ViLT-B/32 at 384 x 512, 192 patches,
    # batches of 20: 1.47 s of CPU time a pair over 2 threads, so ~0.7 s of wall time on idle cores; 4.4 s of wall
    # time measured at a load average of 14 on the shared development machine)
    cpu_seconds_per_pair = (0.7, 1.5)

    def __init__(self, model: ViltForImageAndTextRetrieval, tokenizer: Tokenizer,
                 preprocessing: PixelPreprocessing) -> None:
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
                                pixel_values=values.to(self.device, dtype),
                                pixel_mask=pixel_mask.to(self.device)).logits
            out.append(logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def score_images(self, texts: Sequence[str], images: Sequence[np.ndarray]) -> torch.Tensor:
        """Pairs of texts and decoded (H, W, 3) uint8 images (each image preprocessed here)."""
        return self.score_pixels(texts, [self.prepare(im) for im in images])


# -- the decomposed ViLT (VLDeformer on a detector-free single-stream model) -------------------------------------------
@dataclass(frozen=True)
class ViltDecomposedConfig:
    """ONE ViLT transformer that encodes a text alone and an image's patches alone (VLDeformer's decomposition).

    ``vilt`` is the transformers ``ViltConfig`` (as a dict: the body's shape), ``processor`` the image processor's
    settings (``preprocessor_config.json``'s keys). Texts are ``[CLS] word-pieces [SEP]`` padded to ``text_len`` and
    pooled over every position (padding included: fixed length, as VLDeformer's); images are pooled over their real
    positions ([CLS] and their patches): their patch count varies with the aspect ratio and ViLT's embedding fills
    the rest with patches drawn at random, so a mean over those would vary from batch to batch.
    """

    vilt: dict[str, Any]
    processor: dict[str, Any]
    text_len: int = 40
    temperature: float = 0.005
    cls_token_id: int = 101
    sep_token_id: int = 102
    pad_token_id: int = 0
    tokenizer: str = ""  # path or registry name of the tokenizer (a model dir bundles its own)
    lowercase: bool = True

    def __post_init__(self) -> None:
        if self.text_len < 3:
            raise ValueError("text_len must be at least 3")
        max_text = int(self.vilt.get("max_position_embeddings", 40))
        if self.text_len > max_text:
            raise ValueError(f"text_len {self.text_len} is longer than ViLT's {max_text} text positions")

    @property
    def project_dim(self) -> int:
        return int(self.vilt["hidden_size"])

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, what: str = "") -> ViltDecomposedConfig:
        from models.core.config import config_from_dict

        return config_from_dict(cls, data, what)


def vilt_to_decomposed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``ViltForImageAndTextRetrieval`` state dict -> `ViltDecomposedEncoder` keys: the ``vilt.*`` body without
    its pooler; ``rank_output`` (the matching head) is dropped, as VLDeformer drops the ITM head."""
    out = {}
    for key, value in state.items():
        if key.startswith(("rank_output.", "vilt.pooler.")):
            continue
        if not key.startswith("vilt."):
            raise CheckpointError(f"unexpected key {key!r} in a ViLT retrieval checkpoint")
        out[key] = value
    if "vilt.embeddings.patch_embeddings.projection.weight" not in out:
        raise CheckpointError("not a ViLT checkpoint: no vilt.embeddings.patch_embeddings")
    return out


def _prepared_with_scale(prepare: PixelPreprocessing, rgb: np.ndarray) -> tuple[torch.Tensor, float]:
    pixels = prepare(rgb)
    return pixels, pixels.shape[1] / max(1, int(np.asarray(rgb).shape[0]))


class ViltDecomposedEncoder(VLDeformerObjective, torch.nn.Module):
    """A decomposed ViLT: ``vilt`` (transformers' ``ViltModel``, no pooler) run on texts alone and on pixels alone;
    tanh of the mean of the last states, L2-normalised: the score is the cosine."""

    kind = "decomposed-vilt"
    inputs: Inputs = "pixels"
    config: ViltDecomposedConfig

    def __init__(self, config: ViltDecomposedConfig, tokenizer: TokenizerSpec = None) -> None:
        super().__init__()
        from transformers import ViltConfig, ViltModel

        self.config = config
        vilt_config = ViltConfig.from_dict(config.vilt)
        vilt_config.max_image_length = -1  # every patch (a positive length samples patches at random)
        self.vilt = ViltModel(vilt_config, add_pooling_layer=False)
        self.prepare = PixelPreprocessing.from_processor_config(config.processor, "the model's processor settings")
        self._tokenizer = tokenizer
        self.loaded_towers: tuple[str, ...] = ("text", "image")
        self.num_region_labels = 0

    @property
    def tokenizer(self) -> Tokenizer:
        """The text tokenizer: as `BiEncoder.tokenizer` (what was passed, or ``config.tokenizer``)."""
        tokenizer = tokenizer_from_spec(self._tokenizer, self.config.tokenizer, self.config.lowercase)
        self._tokenizer = tokenizer
        return tokenizer

    @property
    def max_text_tokens(self) -> int:
        return self.config.text_len

    max_text_positions = max_text_tokens  # what training cuts captions to

    def text_tokens(self, text: str) -> tuple[int, int]:
        """(word-pieces of ``text``, word-pieces the model reads), [CLS] and [SEP] not counted."""
        return len(self.tokenizer.encode(text)) - 2, self.max_text_tokens - 2

    @property
    def pixel_preprocess(self) -> PixelPreprocess:
        """The decoding workers' preprocessing (picklable: the processor settings, not the model): decoded RGB ->
        ((3, h, w) float32, h / H), as `ldot index` and `ldot search --image` hand a model that reads pixels."""
        return functools.partial(_prepared_with_scale, self.prepare)

    @property
    def device(self) -> torch.device:
        return self.vilt.embeddings.cls_token.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vilt.embeddings.cls_token.dtype

    @property
    def logit_scale(self) -> float:
        return 1.0 / self.config.temperature

    # -- the two passes ------------------------------------------------------------------------------------
    def _states(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        try:
            from transformers.masking_utils import create_bidirectional_mask

            attention = create_bidirectional_mask(config=self.vilt.config, inputs_embeds=embeddings,
                                                  attention_mask=mask)
        except ImportError:  # transformers 4.x: the additive mask
            # (a method of 4.x's ModuleUtilsMixin, gone from the 5.x stubs mypy reads)
            attention = self.vilt.get_extended_attention_mask(mask, mask.shape)  # type: ignore[operator]
        hidden = self.vilt.encoder(embeddings, attention_mask=attention, return_dict=True).last_hidden_state
        return self.vilt.layernorm(hidden)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings as ViLT makes them (modality type 0)."""
        emb = self.vilt.embeddings
        zeros = torch.zeros_like(input_ids)
        return emb.text_embeddings(input_ids=input_ids, token_type_ids=zeros) + emb.token_type_embeddings(zeros)

    def embed_pixels(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] + patch embeddings as ViLT makes them (modality type 1) and their mask."""
        emb = self.vilt.embeddings
        image, mask, _ = emb.visual_embed(pixel_values.to(self.dtype), pixel_mask, max_image_length=-1)
        return image + emb.token_type_embeddings(torch.full_like(mask, 1, dtype=torch.long)), mask

    def joint_states(self, input_ids: torch.Tensor, text_mask: torch.Tensor, pixel_values: torch.Tensor,
                     pixel_mask: torch.Tensor) -> torch.Tensor:
        """Text and patches in one sequence: the source cross-encoder's own forward (how conversions are checked)."""
        image, image_mask = self.embed_pixels(pixel_values, pixel_mask)
        return self._states(torch.cat([self.embed_text(input_ids), image], dim=1),
                            torch.cat([text_mask.long(), image_mask.long()], dim=1))

    def _pool(self, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            mean = states.mean(dim=1)
        else:
            weights = mask.to(states.dtype)[..., None]
            mean = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        dropout = self.vilt.embeddings.dropout
        return torch.nn.functional.normalize(torch.tanh(dropout(mean)).float(), dim=-1)

    def text_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[CLS] ... [SEP]`` ids (B, L) -> unit vectors (B, H): cut / padded to ``text_len``, mean over all."""
        from models.nn.decomposed import fit_rows

        cfg = self.config
        ids, mask = fit_rows(input_ids, attention_mask, cfg.text_len, cfg.sep_token_id, cfg.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self._pool(self._states(self.embed_text(ids), mask), None)

    def image_vectors(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        """Padded pixels (B, 3, H, W) + mask (B, H, W) -> unit vectors (B, H), mean over each image's real positions."""
        image, mask = self.embed_pixels(pixel_values.to(self.device), pixel_mask.to(self.device))
        return self._pool(self._states(image, mask), mask)

    # -- training (the `DecomposedEncoder` contract) ----------------------------------------------------------
    def pair_vectors(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.pixel_values is None or batch.pixel_mask is None:
            raise ValueError("this model reads pixels: the batch holds region features only")
        return (self.text_vectors(batch.input_ids, batch.text_mask),
                self.image_vectors(batch.pixel_values, batch.pixel_mask))

    def record_vectors(self, records: Sequence[Any]) -> torch.Tensor:
        """Per-image pixel records (``pixels``: (3, h, w), as `prepare` makes them) -> unit vectors (B, H)."""
        values, mask = pad_pixels([r.pixels for r in records])
        return self.image_vectors(values, mask)

    def export_state(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    # -- encoding ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        return encode_in_batches(
            texts, batch_size,
            lambda chunk: self.text_vectors(*self.tokenizer.batch(chunk, self.config.text_len)).float().cpu(),
            self.config.project_dim)

    @torch.inference_mode()
    def encode_token_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_vectors(input_ids, attention_mask).float().cpu()

    @torch.inference_mode()
    def encode_pixels(self, images: Sequence[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
        """Images preprocessed by `prepare` ((3, h, w) each) -> (n, H) unit vectors."""
        out = []
        for start in range(0, len(images), batch_size):
            values, mask = pad_pixels(list(images[start:start + batch_size]))
            out.append(self.image_vectors(values, mask).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.config.project_dim)

    @torch.inference_mode()
    def encode_images(self, records: Sequence[Any], batch_size: int = 32, progress: ProgressFn | None = None,
                      stage: str = "encoding images") -> torch.Tensor:
        """`PixelRecord`s -> (n, H) unit vectors (the `BiEncoder` name); region records are refused: this model
        reads pixels, so the region path of `ldot index` cannot feed it."""
        from models.core.errors import ModelError
        from models.core.progress import report

        if records and not hasattr(records[0], "pixels"):
            raise ModelError("this decomposed ViLT reads pixels, not region features: index with a pixel index (a "
                             "model that reads pixels), not the detector's regions")
        out = []
        for start in range(0, len(records), batch_size):
            chunk = [torch.as_tensor(r.pixels) for r in records[start:start + batch_size]]  # decoded items: numpy
            out.append(self.encode_pixels(chunk, batch_size))
            report(progress, stage, min(start + batch_size, len(records)), len(records), "images")
        return torch.cat(out) if out else torch.empty(0, self.config.project_dim)

    def encode_rgb(self, images: Sequence[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        """Decoded (H, W, 3) uint8 images -> (n, H) unit vectors."""
        return self.encode_pixels([self.prepare(im) for im in images], batch_size)

    @staticmethod
    def score(text_vectors: torch.Tensor, image_vectors: torch.Tensor) -> torch.Tensor:
        return text_vectors @ image_vectors.T
