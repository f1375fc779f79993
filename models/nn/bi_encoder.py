"""The LightningDOT bi-encoder: a BERT text tower and a UNITER image tower scored by a raw dot product."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch
from torch import nn

from models.core.errors import ModelError
from models.core.progress import ProgressFn, report
from models.nn.config import BiEncoderConfig
from models.nn.encoder import Inputs, encode_in_batches
from models.nn.layers import BertBody, Projection, UniterBody, box7_from_norm_bb
from models.nn.regions import RegionRecord

if TYPE_CHECKING:
    from models.nn.tokenizer import Tokenizer

# what an encoder is given as its tokenizer: one, a path to its files, a zero-argument callable that returns one,
# or None (the config's ``tokenizer`` path)
TokenizerSpec: TypeAlias = "Tokenizer | str | Path | Callable[[], Tokenizer] | None"


def tokenizer_from_spec(spec: TokenizerSpec, named: str, lowercase: bool) -> Tokenizer:
    """The `Tokenizer` an encoder was given (``spec``), or the one its config names (``named``, a path).

    Raises:
        ModelError: neither gives one.
    """
    from models.nn.tokenizer import Tokenizer

    if isinstance(spec, Tokenizer):
        return spec
    if isinstance(spec, (str, Path)):
        return Tokenizer.from_path(Path(spec).expanduser(), lowercase=lowercase)
    if callable(spec):
        return spec()
    if named and Path(named).expanduser().exists():
        return Tokenizer.from_path(Path(named).expanduser(), lowercase=lowercase)
    if not named:
        raise ModelError("this model names no tokenizer: pass tokenizer= a vocab.txt/tokenizer.json path")
    raise ModelError(f"this model's tokenizer {named!r} is found (or fetched) by models.load_bi_encoder: load the "
                     "model with it, or pass tokenizer= a path")


class TextTower(nn.Module):
    """Official `txt_model`: BertModel + projection of the last-layer [CLS] state."""

    def __init__(self, cfg: BiEncoderConfig) -> None:
        super().__init__()
        self.bert = BertBody(cfg.text)
        self.encode_proj = Projection(cfg.text.hidden_size, cfg.project_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        sequence = self.bert(input_ids, attention_mask)  # (B, L, H)
        return self.encode_proj(sequence[:, 0])  # (B, D)


class ImageTower(nn.Module):
    """Official `img_model`: UNITER over ``[CLS] + regions`` + projection of the [CLS] state."""

    def __init__(self, cfg: BiEncoderConfig) -> None:
        super().__init__()
        self.cls_token_id = cfg.cls_token_id
        self.bert = UniterBody(cfg.image, cfg.img_dim, cfg.pos_dim)
        self.encode_proj = Projection(cfg.image.hidden_size, cfg.project_dim)

    def sequence(self, feat: torch.Tensor, box7: torch.Tensor, mask: torch.Tensor | None,
                 region_masks: torch.Tensor | None = None) -> torch.Tensor:
        """All output states (B, 1 + N, H): position 0 is [CLS], then one per region."""
        cls = torch.full((feat.shape[0], 1), self.cls_token_id, dtype=torch.long, device=feat.device)
        return self.bert(cls, None, feat, box7, mask, region_masks)

    def forward(self, feat: torch.Tensor, box7: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode_proj(self.sequence(feat, box7, mask)[:, 0])  # (B, D)


class BiEncoder(nn.Module):
    """Two towers, no shared weights; score = raw dot product of the two 768-d vectors.

    The tokenizer is resolved on the first `encode_text` (loading the weights never needs it): pass a
    `Tokenizer`, a path to tokenizer files, or a zero-argument callable that returns one (what the loader in
    `models.hub` passes, so that finding or fetching tokenizer files stays out of the network code).
    """

    inputs: Inputs = "regions"  # `models.nn.encoder.Encoder`: encode_images takes region sets

    def __init__(self, config: BiEncoderConfig, tokenizer: TokenizerSpec = None) -> None:
        super().__init__()
        self.config = config
        self.txt_model = TextTower(config)
        self.img_model = ImageTower(config)
        self._tokenizer = tokenizer
        self.loaded_towers: tuple[str, ...] = ("text", "image")  # a search loads the text tower alone

    # -- tokenizer -----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        tokenizer = tokenizer_from_spec(self._tokenizer, self.config.tokenizer, self.config.lowercase)
        self._tokenizer = tokenizer
        return tokenizer

    def _anchor(self) -> torch.Tensor:
        tower = self.txt_model if "text" in self.loaded_towers else self.img_model
        return tower.encode_proj[0].weight if isinstance(tower.encode_proj[0], nn.Linear) else \
            next(p for p in tower.parameters() if p.is_floating_point())  # an int8 tower (models.nn.quantize)

    @property
    def max_text_tokens(self) -> int:
        """Word-pieces a text can have, [CLS] and [SEP] included (longer texts are cut)."""
        return self.config.text.max_position_embeddings

    def text_tokens(self, text: str) -> tuple[int, int]:
        """(word-pieces of ``text``, word-pieces the model reads), [CLS] and [SEP] not counted."""
        return len(self.tokenizer.encode(text)) - 2, self.max_text_tokens - 2

    @property
    def device(self) -> torch.device:
        return self._anchor().device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor().dtype

    # -- public encoding API -------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (n, D) float32 vectors. ``[CLS] word-pieces [SEP]``, no length cut below the model's."""
        return encode_in_batches(
            texts, batch_size, lambda chunk: self.encode_token_ids(*self.tokenizer.batch(chunk, self.max_text_tokens)),
            self.config.project_dim)

    @torch.inference_mode()
    def encode_token_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids already holding ``[CLS] ... [SEP]`` (n, L) -> (n, D) float32."""
        if "text" not in self.loaded_towers:
            raise RuntimeError("this bi-encoder was loaded with its image tower only (towers=('image',))")
        input_ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
        return self.txt_model(input_ids, attention_mask).float()

    @torch.inference_mode()
    def encode_regions(self, features: torch.Tensor | np.ndarray, norm_bb: torch.Tensor | np.ndarray,
                       mask: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Region features (B, N, img_dim) + boxes (B, N, 6) [+ valid mask (B, N)] -> (B, D) float32."""
        if "image" not in self.loaded_towers:
            raise RuntimeError("this bi-encoder was loaded with its text tower only (towers=('text',))")
        feat = torch.as_tensor(features, device=self.device).to(self.dtype)
        bb = torch.as_tensor(norm_bb, device=self.device).to(self.dtype)
        if feat.ndim != 3 or bb.shape[:2] != feat.shape[:2] or bb.shape[-1] != 6:
            raise ValueError(f"expected features (B, N, {self.config.img_dim}) and norm_bb (B, N, 6), "
                             f"got {tuple(feat.shape)} and {tuple(bb.shape)}")
        if feat.shape[-1] != self.config.img_dim:
            raise ValueError(f"region features have {feat.shape[-1]} dims; this model expects {self.config.img_dim}")
        if mask is not None:
            mask = torch.as_tensor(mask, device=self.device).bool()
        return self.img_model(feat, box7_from_norm_bb(bb), mask).float()

    @torch.inference_mode()
    def encode_images(self, records: Sequence[RegionRecord], batch_size: int = 64,
                      progress: ProgressFn | None = None, stage: str = "encoding images") -> torch.Tensor:
        """Per-image region sets -> (n, D) float32, in input order.

        ``records`` are anything with ``features`` (n_i, img_dim) and ``norm_bb`` (n_i, 6) arrays (e.g.
        `feature_extraction.types.RegionFeatures`). Images are batched by similar region counts to keep
        padding small; ``progress`` hears of each batch (``stage``, images done, of ``len(records)``).
        """
        from models.nn.regions import stack_regions

        order = sorted(range(len(records)), key=lambda i: len(records[i].features))
        out = torch.empty(len(records), self.config.project_dim)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            feat, bb, mask, _ = stack_regions([records[i] for i in idx])
            out[idx] = self.encode_regions(feat, bb, mask).cpu()
            report(progress, stage, min(start + batch_size, len(order)), len(order), "images")
        return out

    @staticmethod
    def score(text_vectors: torch.Tensor, image_vectors: torch.Tensor) -> torch.Tensor:
        """Raw dot products (n_text, n_image); no normalisation, no temperature."""
        return text_vectors @ image_vectors.T
