"""Fine-tuning a dual encoder (CLIP, SigLIP) with the loop LightningDOT's bi-encoders train with.

The same run: contrastive loss over the batch (InfoNCE both ways, CMR's form, with hard negatives when mined),
validation recall, best model, checkpoints and resume, ``log.jsonl``. What differs is the input: each image is
the model's own preprocessing of its file (`PixelLookup`: decoded by ldot, read while the model computes), each
caption the model's own tokens; scores are cosines over the model's learned temperature at the start of the run
(CLIP: 1/100). The result is a `save_pretrained` folder, so it loads like any other dual encoder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from models.core.errors import LdotError
from models.nn import losses
from models.nn.dual import DualEncoder, PixelPreprocess

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from models.nn.pretraining import PairBatch
    from models.training.data import PixelRecord

BASE_DIR = "dual"  # in a run folder: the model's config, image processor and tokenizer (no weights)


@dataclass(frozen=True)
class _TextLimits:
    max_position_embeddings: int  # what the loop cuts captions to ([start] tokens [end])


@dataclass(frozen=True)
class DualTrainConfig:
    model_type: str
    temperature: float  # scores are cosine / temperature in the loss
    max_text_tokens: int

    @property
    def text(self) -> _TextLimits:
        return _TextLimits(self.max_text_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "temperature": self.temperature, "max_text_tokens": self.max_text_tokens}


class _Encoding:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class _Backend:
    """The part of a `tokenizers.Tokenizer` the training data reads, over the model's own tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[_Encoding]:
        out = self.tokenizer(list(texts), add_special_tokens=add_special_tokens, truncation=False)
        return [_Encoding(list(ids)) for ids in out["input_ids"]]

    def decode_batch(self, rows: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)


class DualTokenizer:
    """A dual encoder's tokenizer as the training loop sees one: ``cls_id`` / ``sep_id`` / ``pad_id`` frame each
    caption (CLIP: start and end of text; SigLIP has no start token: its rows are re-framed by the model)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.hf = tokenizer
        self.backend = _Backend(tokenizer)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.cls_id = int(bos if bos is not None else eos)
        self.sep_id = int(eos)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        self.mask_id = None

    def save(self, directory: Path) -> None:
        self.hf.save_pretrained(str(Path(directory) / BASE_DIR))


class DualForTraining(nn.Module):
    """A `DualEncoder` with what the loop calls: ``pair_vectors``, ``retrieval_loss``, ``itm``, ``text_vectors``,
    ``record_vectors``, ``export_state``."""

    kind = "dual-encoder"
    inputs = "pixels"  # its training images are `PixelRecord`s of what `prepare` makes of each image file
    num_region_labels = 0

    def __init__(self, encoder: DualEncoder, temperature: float | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        if temperature is None:
            scale = getattr(encoder.model, "logit_scale", None)
            temperature = float(1.0 / torch.exp(scale.detach().float()).item()) if scale is not None else 0.01
        self.config = DualTrainConfig(encoder.model_type, temperature, encoder.max_text_tokens)

    @property
    def pixel_preprocess(self) -> PixelPreprocess:
        return self.encoder.pixel_preprocess

    def prepare(self, rgb: np.ndarray) -> torch.Tensor:
        """A decoded (H, W, 3) RGB image -> the (3, h, w) float32 pixels the image tower reads."""
        pixels, _ = self.encoder.pixel_preprocess(rgb)
        return torch.as_tensor(pixels, dtype=torch.float32)

    @property
    def logit_scale(self) -> float:
        return 1.0 / self.config.temperature

    def text_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loop's ``[start] tokens [end] [pad]...`` rows -> unit vectors (CLIP reads them as they are; SigLIP
        without the start token, padded to its length as it was trained)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        if self.encoder.padding == "max_length":
            input_ids, mask = input_ids[:, 1:], mask[:, 1:]
            width = self.encoder.max_text_tokens
            pad = self.encoder.tokenizer.pad_token_id
            if input_ids.shape[1] < width:
                fill = width - input_ids.shape[1]
                input_ids = torch.cat([input_ids, input_ids.new_full((len(input_ids), fill), pad)], dim=1)
                mask = torch.cat([mask, mask.new_zeros((len(mask), fill))], dim=1)
            input_ids, mask = input_ids[:, :width], mask[:, :width]
        inputs = {"input_ids": input_ids}
        if "attention_mask" in self.encoder.tokenizer.model_input_names:
            inputs["attention_mask"] = mask
        return self.encoder.text_features(inputs)

    def record_vectors(self, records: Sequence[PixelRecord]) -> torch.Tensor:
        """`PixelRecord`s (all of one size: the processor's crop or resize) -> unit vectors."""
        return self.encoder.image_features(torch.stack([torch.as_tensor(r.pixels) for r in records]))

    def pair_vectors(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.pixel_values is None:
            raise LdotError("a dual encoder trains on images' pixels: these batches hold region features")
        return self.text_vectors(batch.input_ids, batch.text_mask), self.encoder.image_features(batch.pixel_values)

    def retrieval_loss(self, text: torch.Tensor, image: torch.Tensor, batch: PairBatch,
                       neg_text: torch.Tensor | None = None, neg_image: torch.Tensor | None = None) -> torch.Tensor:
        """CMR's two cross-entropies over the batch (and hard negatives), on cosines / temperature."""
        return losses.contrastive_loss(text, image, batch, neg_text, neg_image, temperature=self.config.temperature,
                                       weight=0.5)

    def itm(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        text, image = self.pair_vectors(batch)
        acc = losses.in_batch_accuracy(text.detach(), image.detach(), batch.image_ids)
        return self.retrieval_loss(text, image, batch), {"acc": acc}

    def export_state(self) -> dict[str, torch.Tensor]:
        return self.encoder.model.state_dict()


def start_model(source: str) -> tuple[DualForTraining, DualTokenizer, Path]:
    """The dual encoder to fine-tune (a registry name, hf:ORG/NAME or a folder), its tokenizer and its folder."""
    from models.hub.dual import load_dual_encoder
    from models.hub.installed import check_model_files
    from models.hub.load import resolve_source

    path = resolve_source(source)
    check_model_files(path)
    encoder = load_dual_encoder(path)
    return DualForTraining(encoder), DualTokenizer(encoder.tokenizer), path


def write_base(run_dir: Path, model: DualForTraining, source_dir: Path) -> None:
    """What a resumed run and the exported model need besides the weights: config, image processor, tokenizer."""
    base = run_dir / BASE_DIR
    base.mkdir(parents=True, exist_ok=True)
    model.encoder.model.config.save_pretrained(str(base))
    shutil.copyfile(source_dir / "preprocessor_config.json", base / "preprocessor_config.json")


def rebuild(run_dir: Path, model_config: dict[str, Any]) -> tuple[DualForTraining, DualTokenizer]:
    """The run's model (weights to be loaded from its checkpoint) and tokenizer, from its base folder."""
    import transformers

    from models.hub.dual import check_dual_config, load_tokenizer, pixel_spec
    from models.nn.dual import ARCHITECTURES

    base = run_dir / BASE_DIR
    model_type = check_dual_config(base / "config.json", str(base))
    cls = getattr(transformers, ARCHITECTURES[model_type][0])
    config = cls.config_class.from_pretrained(str(base))
    tokenizer = load_tokenizer(base)
    encoder = DualEncoder(cls(config), tokenizer, pixel_spec(base, model_type), model_type,
                          int(model_config["max_text_tokens"]))
    return DualForTraining(encoder, float(model_config["temperature"])), DualTokenizer(tokenizer)


def export(run_dir: Path, target_tmp: Path, state: dict[str, torch.Tensor], model_config: dict[str, Any]) -> None:
    """Write the trained model as `save_pretrained` does (weights, config, image processor, tokenizer)."""
    model, _ = rebuild(run_dir, model_config)
    prefix = "encoder.model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model.encoder.model.load_state_dict(state)
    model.encoder.model.save_pretrained(str(target_tmp))
    for path in (run_dir / BASE_DIR).iterdir():
        if path.is_file() and not (target_tmp / path.name).exists():
            shutil.copyfile(path, target_tmp / path.name)
    info = json.loads((target_tmp / "config.json").read_text())
    if info.get("model_type") != model_config["model_type"]:  # pragma: no cover - a broken run folder
        raise LdotError(f"{run_dir} holds a {info.get('model_type')} config, not {model_config['model_type']}")
