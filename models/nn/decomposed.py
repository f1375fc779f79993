"""A decomposed single-stream encoder (VLDeformer): one transformer, two passes, cosine score.

A single-stream cross-encoder (UNITER, VisualBERT: text tokens and regions in one sequence) is turned into ONE
individual encoder that runs on a text alone and on an image's regions alone, with the same weights
(as VLDeformer's official code, ``oscar/modeling/modeling_bert.py``):

- text: ``[CLS] caption [SEP]`` cut and padded to ``text_len``, token type 0;
- image: ``[CLS] tags [SEP]`` (the object names of the kept regions) padded to ``text_len``, token type 1 on the
  real tag tokens and 0 on padding, then ``max_regions`` region embeddings (extras cut, zero-padded);
- vector: the mean of EVERY last-layer state (padding included, so inputs have fixed lengths), dropout, tanh,
  L2-normalised: the score is the cosine.

`DecomposedEncoder` has the `BiEncoder` methods (`encode_text`, `encode_token_ids`, `encode_regions`,
`encode_images`, `score`), so indexing, search, evaluation and re-ranking take it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.core.progress import ProgressFn, report
from models.nn import losses
from models.nn.bi_encoder import BiEncoder, TokenizerSpec, tokenizer_from_spec
from models.nn.config import DecomposedConfig, TransformerConfig
from models.nn.encoder import Inputs, encode_in_batches
from models.nn.layers import (
    Encoder,
    ImageEmbeddings,
    Linear,
    Pooler,
    TextEmbeddings,
    box7_from_norm_bb,
    extended_attention_mask,
)
from models.nn.regions import RegionRecord, stack_object_ids, stack_regions

if TYPE_CHECKING:
    from models.nn.pretraining import PairBatch
    from models.nn.tokenizer import Tokenizer


class VisualBertRegionEmbeddings(nn.Module):
    """VisualBERT's visual embedding (before the shared LayerNorm): ``W f + b + type_emb(1) + pos_emb(0)``."""

    def __init__(self, cfg: TransformerConfig, img_dim: int) -> None:
        super().__init__()
        self.visual_projection = Linear(img_dim, cfg.hidden_size)
        self.visual_token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.visual_position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        constant = self.visual_token_type_embeddings.weight[1] + self.visual_position_embeddings.weight[0]
        return self.visual_projection(feat) + constant


class DecomposedBody(nn.Module):
    """The single-stream body: ``embeddings`` (text), ``img_embeddings`` (regions), ``encoder``, ``pooler``.

    Key names equal our UNITER body's (`UniterBody`) for ``region_embedding="uniter"``; for ``visualbert`` the
    region part is ``img_embeddings.{visual_projection, visual_token_type_embeddings, visual_position_embeddings}``.
    """

    def __init__(self, config: DecomposedConfig) -> None:
        super().__init__()
        cfg = config.body
        self.region_embedding = config.region_embedding
        self.embeddings = TextEmbeddings(cfg)
        if config.region_embedding == "uniter":
            self.img_embeddings: nn.Module = ImageEmbeddings(cfg, config.img_dim, config.pos_dim)
        else:
            self.img_embeddings = VisualBertRegionEmbeddings(cfg, config.img_dim)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)  # kept so a converted cross-encoder loads strictly; unused

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    def embed_regions(self, feat: torch.Tensor, norm_bb: torch.Tensor) -> torch.Tensor:
        feat = feat.to(self.dtype)
        if self.region_embedding == "uniter":
            type_emb = self.embeddings.token_type_embeddings.weight[1]
            return self.img_embeddings(feat, box7_from_norm_bb(norm_bb.to(self.dtype)), type_emb)
        return self.embeddings.dropout(self.embeddings.LayerNorm(self.img_embeddings(feat)))

    def forward(self, input_ids: torch.Tensor | None, text_mask: torch.Tensor | None,
                token_type_ids: torch.Tensor | None = None, feat: torch.Tensor | None = None,
                norm_bb: torch.Tensor | None = None, region_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last-layer states of ``[tokens] + [regions]`` (either part may be absent) -> (B, L + N, H).

        With both parts this is the source cross-encoder's own forward (how conversions are checked)."""
        parts, masks = [], []
        if input_ids is not None:
            parts.append(self.embeddings(input_ids, None, token_type_ids))
            masks.append(torch.ones_like(input_ids, dtype=torch.bool) if text_mask is None else text_mask.bool())
        if feat is not None:
            assert norm_bb is not None
            parts.append(self.embed_regions(feat, norm_bb))
            masks.append(torch.ones(feat.shape[:2], dtype=torch.bool, device=feat.device)
                         if region_mask is None else region_mask.bool())
        hidden = torch.cat(parts, dim=1)
        return self.encoder(hidden, extended_attention_mask(torch.cat(masks, dim=1), hidden.dtype))


def fit_rows(input_ids: torch.Tensor, mask: torch.Tensor | None, length: int, sep_id: int,
             pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] ... [SEP]`` rows (B, L) -> exactly ``length`` columns: long rows are cut (their [SEP] kept), short
    ones padded. Returns (ids, mask) (B, length)."""
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask).to(input_ids.device).long()
    lengths = mask.sum(dim=1)
    out = torch.full((len(input_ids), length), pad_id, dtype=torch.long, device=input_ids.device)
    out_mask = torch.zeros((len(input_ids), length), dtype=torch.long, device=input_ids.device)
    width = min(length, input_ids.shape[1])
    out[:, :width] = input_ids[:, :width]
    out_mask[:, :width] = mask[:, :width]
    long_rows = lengths > length
    if bool(long_rows.any()):
        out[long_rows, length - 1] = sep_id
    out = out.masked_fill(out_mask == 0, pad_id)
    return out, out_mask


class _Temperature(Protocol):
    @property
    def temperature(self) -> float: ...  # of the contrastive loss


class VLDeformerObjective:
    """VLDeformer's training objective for a decomposed encoder (``pair_vectors`` and ``config.temperature`` given
    by the model): the one definition the region and the ViLT decomposed encoders share."""

    config: _Temperature
    pair_vectors: Callable[[PairBatch], tuple[torch.Tensor, torch.Tensor]]

    def retrieval_loss(self, text: torch.Tensor, image: torch.Tensor, batch: PairBatch,
                       neg_text: torch.Tensor | None = None, neg_image: torch.Tensor | None = None) -> torch.Tensor:
        """VLDeformer's cross-modal InfoNCE: CE(text -> image) + CE(image -> text), cosine / temperature."""
        return losses.contrastive_loss(text, image, batch, neg_text, neg_image, temperature=self.config.temperature,
                                       weight=1.0)

    def itm(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        text, image = self.pair_vectors(batch)
        acc = losses.in_batch_accuracy(text.detach(), image.detach(), batch.image_ids)
        return self.retrieval_loss(text, image, batch), {"acc": acc}


class DecomposedEncoder(VLDeformerObjective, nn.Module):
    """One encoder for texts and for images (``bert`` = `DecomposedBody`); normalised vectors, cosine score."""

    kind = "decomposed"
    inputs: Inputs = "regions"  # `models.nn.encoder.Encoder`: encode_images takes region sets
    config: DecomposedConfig
    def __init__(self, config: DecomposedConfig, tokenizer: TokenizerSpec = None) -> None:
        super().__init__()
        self.config = config
        self.bert = DecomposedBody(config)
        self._tokenizer = tokenizer
        self.loaded_towers: tuple[str, ...] = ("text", "image")  # one encoder serves both
        self.num_region_labels = len(config.tags) + 1 if config.tags else 0
        self._tag_pieces: dict[int, list[int]] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        """The text tokenizer: as `BiEncoder.tokenizer` (what was passed, or ``config.tokenizer``)."""
        tokenizer = tokenizer_from_spec(self._tokenizer, self.config.tokenizer, self.config.lowercase)
        self._tokenizer = tokenizer
        return tokenizer

    @property
    def max_text_tokens(self) -> int:
        """Word-pieces a text can have, [CLS] and [SEP] included (longer texts are cut)."""
        return self.config.text_len

    text_tokens = BiEncoder.text_tokens  # [CLS] word-pieces [SEP], cut to max_text_tokens

    @property
    def device(self) -> torch.device:
        return self.bert.embeddings.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.bert.dtype

    # -- the two passes (with gradients: training uses them) ----------------------------------------
    def _pool(self, states: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.bert.embeddings.dropout(states.mean(dim=1)))
        return F.normalize(pooled.float(), dim=-1)

    def text_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[CLS] ... [SEP]`` ids (B, L) -> unit vectors (B, H) float32."""
        cfg = self.config
        ids, mask = fit_rows(input_ids, attention_mask, cfg.text_len, cfg.sep_token_id, cfg.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self._pool(self.bert(ids, mask, torch.zeros_like(ids)))

    def tag_rows(self, object_ids: torch.Tensor | None, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``[CLS] tags [SEP]`` part of ``count`` images: (ids, mask, token types), each (B, text_len).

        ``object_ids`` (B, N) long, -1 where there is no region: class ids into ``config.tags``. Without tags (no
        vocabulary, or no ids) the part is ``[CLS] [SEP]`` and padding."""
        cfg = self.config
        rows: list[list[int]] = []
        for b in range(count):
            pieces: list[int] = []
            if object_ids is not None and cfg.tags:
                for cid in object_ids[b].tolist():
                    if cid < 0:
                        continue
                    pieces.extend(self._pieces(int(cid)))
                    if len(pieces) >= cfg.text_len - 2:
                        break
            rows.append([cfg.cls_token_id, *pieces[: cfg.text_len - 2], cfg.sep_token_id])
        ids = torch.full((count, cfg.text_len), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros((count, cfg.text_len), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.as_tensor(row)
            mask[b, : len(row)] = 1
        return ids, mask, mask.clone()  # token type 1 on the real tag tokens, 0 on padding

    def _pieces(self, class_id: int) -> list[int]:
        if class_id not in self._tag_pieces:
            words = self.config.tags[class_id] if 0 <= class_id < len(self.config.tags) else ""
            self._tag_pieces[class_id] = (self.tokenizer.backend.encode(words, add_special_tokens=False).ids
                                          if words else [])
        return self._tag_pieces[class_id]

    def image_vectors(self, features: torch.Tensor, norm_bb: torch.Tensor, mask: torch.Tensor | None,
                      object_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Regions (B, N, img_dim) + boxes (B, N, 6) [+ valid (B, N), class ids (B, N)] -> unit vectors (B, H)."""
        cfg = self.config
        n_img, n = features.shape[0], min(features.shape[1], cfg.max_regions)
        feat = torch.zeros(n_img, cfg.max_regions, features.shape[2], dtype=self.dtype, device=self.device)
        bb = torch.zeros(n_img, cfg.max_regions, 6, dtype=self.dtype, device=self.device)
        valid = torch.zeros(n_img, cfg.max_regions, dtype=torch.bool, device=self.device)
        valid[:, :n] = True if mask is None else mask[:, :n].to(self.device).bool()
        keep = valid[:, :n, None]  # padding is zeroed: every position enters the mean, so padding must not vary
        feat[:, :n] = features[:, :n].to(device=self.device, dtype=self.dtype) * keep
        bb[:, :n] = norm_bb[:, :n].to(device=self.device, dtype=self.dtype) * keep
        if object_ids is not None:
            object_ids = object_ids[:, :n].masked_fill(~valid[:, :n].cpu(), -1)
        ids, tag_mask, types = self.tag_rows(object_ids, n_img)
        states = self.bert(ids.to(self.device), tag_mask.to(self.device), types.to(self.device), feat, bb, valid)
        return self._pool(states)

    # -- training ----------------------------------------------------------------------------------
    def pair_vectors(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.text_vectors(batch.input_ids, batch.text_mask)
        image = self.image_vectors(batch.features, batch.norm_bb, batch.region_mask, batch.object_ids)
        return text, image

    @property
    def logit_scale(self) -> float:
        return 1.0 / self.config.temperature

    def record_vectors(self, records: Sequence[RegionRecord]) -> torch.Tensor:
        """Per-image region records -> unit vectors (B, H) (validation, hard-negative mining)."""
        feat, bb, valid, _ = stack_regions(records)
        return self.image_vectors(feat, bb, valid, stack_object_ids(records, feat.shape[1]))

    def export_state(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    # -- public encoding API (BiEncoder's) ------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (n, H) unit vectors: ``[CLS] word-pieces [SEP]`` cut to ``text_len``."""
        return encode_in_batches(
            texts, batch_size, lambda chunk: self.encode_token_ids(*self.tokenizer.batch(chunk, self.config.text_len)),
            self.config.project_dim)

    @torch.inference_mode()
    def encode_token_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_vectors(input_ids, attention_mask).float()

    @torch.inference_mode()
    def encode_regions(self, features: torch.Tensor | np.ndarray, norm_bb: torch.Tensor | np.ndarray,
                       mask: torch.Tensor | np.ndarray | None = None,
                       object_ids: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Region features (B, N, img_dim) + boxes (B, N, 6) [+ valid (B, N), detector class ids (B, N)] ->
        (B, H) unit vectors. Without class ids the image has no tags."""
        feat = torch.as_tensor(features)
        bb = torch.as_tensor(norm_bb)
        if feat.ndim != 3 or bb.shape[:2] != feat.shape[:2] or bb.shape[-1] != 6:
            raise ValueError(f"expected features (B, N, {self.config.img_dim}) and norm_bb (B, N, 6), "
                             f"got {tuple(feat.shape)} and {tuple(bb.shape)}")
        if feat.shape[-1] != self.config.img_dim:
            raise ValueError(f"region features have {feat.shape[-1]} dims; this model expects {self.config.img_dim}")
        valid = None if mask is None else torch.as_tensor(mask).bool()
        ids = None if object_ids is None else torch.as_tensor(object_ids, dtype=torch.long)
        return self.image_vectors(feat.float(), bb.float(), valid, ids).float()

    @torch.inference_mode()
    def encode_images(self, records: Sequence[RegionRecord], batch_size: int = 64,
                      progress: ProgressFn | None = None, stage: str = "encoding images") -> torch.Tensor:
        """Per-image region sets (``features``, ``norm_bb``, and ``object_ids`` or ``soft_labels`` for the tags)
        -> (n, H) unit vectors in input order; ``progress`` hears of each batch (``stage``, images done)."""
        out = torch.empty(len(records), self.config.project_dim)
        for start in range(0, len(records), batch_size):
            chunk = list(records[start:start + batch_size])
            out[start:start + len(chunk)] = self.record_vectors(chunk).cpu()
            report(progress, stage, start + len(chunk), len(records), "images")
        return out

    @staticmethod
    def score(text_vectors: torch.Tensor, image_vectors: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (n_text, n_image) of the unit vectors."""
        return text_vectors @ image_vectors.T
