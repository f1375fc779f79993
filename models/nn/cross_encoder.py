"""Cross-encoders for re-ranking the bi-encoder's top M, behind one interface.

``load_reranker(source).score(texts, features, norm_bb, mask=None) -> FloatTensor (n,)`` scores n
(text, image) pairs; higher is a better match.

- UNITER ITM (official UNITER/LightningDOT layout): UNITER body over ``[CLS] text [SEP] + regions``,
  BERT pooler, ``rank_output = Linear(768, 1)``.
- LXMERT's image-text matching head through ``transformers.LxmertForPreTraining``
  (hub ``unc-nlp/lxmert-base-uncased``, trained on 36-box BUTD features): score = matched - unmatched logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from models.nn.config import CrossEncoderConfig
from models.nn.encoder import Inputs
from models.nn.layers import UniterBody, box7_from_norm_bb
from models.nn.tokenizer import Tokenizer, pad_ids

if TYPE_CHECKING:
    from transformers import LxmertForPreTraining

ArrayLike = torch.Tensor | np.ndarray


class Reranker(Protocol):
    """What `ldot search --rerank` and `ldot eval --rerank-k` need of a cross-encoder."""

    def score(self, texts: Sequence[str], features: ArrayLike, norm_bb: ArrayLike,
              mask: ArrayLike | None = None) -> torch.Tensor: ...


class CrossEncoder(nn.Module):
    """UNITER for image-text retrieval: ``bert`` (UNITER body) + ``rank_output`` on the pooled [CLS]."""

    def __init__(self, config: CrossEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = UniterBody(config.body, config.img_dim, config.pos_dim)
        self.rank_output = nn.Linear(config.body.hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, text_mask: torch.Tensor, feat: torch.Tensor, box7: torch.Tensor,
                region_mask: torch.Tensor | None) -> torch.Tensor:
        sequence = self.bert(input_ids, text_mask, feat, box7, region_mask)  # (B, L + N, H)
        return self.rank_output(self.bert.pooler(sequence)).squeeze(-1)  # (B,)


def _as_tensor(x: ArrayLike, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(x).to(device=device, dtype=dtype)


class _PairScorer:
    """Shared batching: tokenise each distinct text once, score pairs in chunks, return float32 (n,)."""

    batch_size = 64
    inputs: Inputs = "regions"  # what `score` reads (ViLT's re-ranker reads "pixels")
    # measured on 2 cores, base UNITER: 45 ms per pair with 36 regions, 123 ms with 100 (the range a CPU may expect)
    cpu_seconds_per_pair = (0.045, 0.13)

    def __init__(self, tokenizer: Tokenizer, device: torch.device, max_text_len: int) -> None:
        self.tokenizer = tokenizer
        self.device = device
        self.max_text_len = max_text_len
        self._ids: dict[str, list[int]] = {}

    def _token_rows(self, texts: Sequence[str]) -> list[list[int]]:
        for text in set(texts) - self._ids.keys():
            self._ids[text] = self.tokenizer.encode(text, self.max_text_len)
        return [self._ids[t] for t in texts]

    @torch.inference_mode()
    def score(self, texts: Sequence[str], features: ArrayLike, norm_bb: ArrayLike,
              mask: ArrayLike | None = None) -> torch.Tensor:
        if len(texts) != len(features) or len(features) != len(norm_bb):
            raise ValueError(f"score needs one text per image: got {len(texts)} texts, {len(features)} images")
        rows = self._token_rows(texts)
        out = []
        for start in range(0, len(rows), self.batch_size):
            stop = start + self.batch_size
            ids, text_mask = pad_ids(rows[start:stop], self.tokenizer.pad_id)
            region_mask = None if mask is None else torch.as_tensor(mask[start:stop]).to(self.device).bool()
            out.append(self._score_batch(ids.to(self.device), text_mask.to(self.device),
                                         features[start:stop], norm_bb[start:stop], region_mask).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def _score_batch(self, ids: torch.Tensor, text_mask: torch.Tensor, features: ArrayLike, norm_bb: ArrayLike,
                     region_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class UniterReranker(_PairScorer):
    """UNITER ITM re-ranker."""

    def __init__(self, model: CrossEncoder, tokenizer: Tokenizer) -> None:
        self.model = model
        device = model.rank_output.weight.device
        super().__init__(tokenizer, device, model.config.body.max_position_embeddings)

    def _score_batch(self, ids: torch.Tensor, text_mask: torch.Tensor, features: ArrayLike, norm_bb: ArrayLike,
                     region_mask: torch.Tensor | None) -> torch.Tensor:
        dtype = self.model.rank_output.weight.dtype
        feat = _as_tensor(features, self.device, dtype)
        bb = _as_tensor(norm_bb, self.device, dtype)
        return self.model(ids, text_mask, feat, box7_from_norm_bb(bb), region_mask)


class LxmertReranker(_PairScorer):
    """LXMERT's cross-modality matching head (`LxmertForPreTraining.cross_relationship_score`)."""

    def __init__(self, model: LxmertForPreTraining, tokenizer: Tokenizer) -> None:
        self.model = model
        device = next(model.parameters()).device
        super().__init__(tokenizer, device, model.config.max_position_embeddings)

    def _score_batch(self, ids: torch.Tensor, text_mask: torch.Tensor, features: ArrayLike, norm_bb: ArrayLike,
                     region_mask: torch.Tensor | None) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        feat = _as_tensor(features, self.device, dtype)
        pos = _as_tensor(norm_bb, self.device, dtype)[..., :4]  # LXMERT reads x1/W, y1/H, x2/W, y2/H
        out = self.model(input_ids=ids, attention_mask=text_mask, token_type_ids=torch.zeros_like(ids),
                         visual_feats=feat, visual_pos=pos,
                         visual_attention_mask=None if region_mask is None else region_mask.long())
        logits = out.cross_relationship_score  # (B, 2): [not matched, matched]
        return logits[:, 1] - logits[:, 0]
