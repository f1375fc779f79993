"""BERT/UNITER building blocks, named so official state dicts map onto them one to one.

Module and parameter names follow transformers' `BertModel` (which LightningDOT's checkpoints use):
``embeddings.word_embeddings``, ``encoder.layer.N.attention.self.query``, ``pooler.dense`` ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.nn.config import TransformerConfig

MASK_VALUE = -10000.0  # the official additive attention mask: (1 - m) * -10000

# A few rows (one short query: ~10 tokens) through oneDNN's linear is ~1.35x faster than through MKL's sgemm on
# this AVX2 CPU (12 BERT-base layers: 33 vs 44 ms, benchmarks/search.py); from ~48 rows on MKL wins, and by far
# for image batches, so only small inference calls take this path.
ONEDNN_MAX_ROWS = 32
_onednn_ok = torch.backends.mkldnn.is_available()


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose few-row fp32 CPU inference runs through oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global _onednn_ok
        if (_onednn_ok and x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not torch.is_grad_enabled() and x.numel() <= ONEDNN_MAX_ROWS * x.shape[-1]):
            try:
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")
            except RuntimeError:  # a build or CPU without the op: the plain path from now on
                _onednn_ok = False
        return F.linear(x, self.weight, self.bias)


def extended_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 or bool mask -> (B, 1, 1, L) additive mask, as the official code builds it."""
    mask = mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * MASK_VALUE


class TextEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.padding_idx)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids: (B, L)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        emb = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        emb = emb + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(emb))  # (B, L, H)


class ImageEmbeddings(nn.Module):
    """UNITER region embedding: LN(LN(W f) + LN(W_pos box7) + type_emb(1)).

    ``mask_embedding`` (row 0 kept at zero) is added to the features of masked regions in SMRM pre-training.
    """

    def __init__(self, cfg: TransformerConfig, img_dim: int, pos_dim: int = 7) -> None:
        super().__init__()
        self.img_linear = Linear(img_dim, cfg.hidden_size)
        self.img_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.pos_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.pos_linear = Linear(pos_dim, cfg.hidden_size)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, feat: torch.Tensor, box7: torch.Tensor, type_embeddings: torch.Tensor,
                region_masks: torch.Tensor | None = None) -> torch.Tensor:
        # feat: (B, N, img_dim), box7: (B, N, 7), type_embeddings: (B, N, H) or (H,)
        if region_masks is not None:
            with torch.no_grad():
                self.mask_embedding.weight[0].zero_()
            feat = feat + self.mask_embedding(region_masks.long())
        img = self.img_layer_norm(self.img_linear(feat))
        pos = self.pos_layer_norm(self.pos_linear(box7))
        return self.dropout(self.LayerNorm(img + pos + type_embeddings))  # (B, N, H)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.query = Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.dropout

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, length, width = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, heads, L, H/heads)
            return x.view(b, length, self.num_heads, width // self.num_heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(
            heads(self.query(hidden)), heads(self.key(hidden)), heads(self.value(hidden)),
            attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0)
        return ctx.transpose(1, 2).reshape(b, length, width)  # (B, L, H)


class SelfOutput(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ctx: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(ctx)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = SelfOutput(cfg)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, mask), hidden)


class Intermediate(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden))  # erf GELU, as BERT


class Output(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class Layer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attended = self.attention(hidden, mask)
        return self.output(self.intermediate(attended), attended)


class Encoder(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, mask)
        return hidden


class Pooler(nn.Module):
    """BERT's pooler (dense + tanh on position 0). Unused by the bi-encoder, used by the UNITER cross-encoder."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(sequence[:, 0]))


class Projection(nn.Sequential):
    """LightningDOT's `encode_proj`: Linear(H, 2H) -> GELU -> LayerNorm(2H, 1e-12) -> Linear(2H, D).

    Indices 0, 2, 3 hold weights (index 1, the GELU, has none), as in the official state dicts.
    """

    def __init__(self, hidden_size: int, project_dim: int) -> None:
        super().__init__(
            Linear(hidden_size, hidden_size * 2),
            nn.GELU(),
            nn.LayerNorm(hidden_size * 2, eps=1e-12),
            Linear(hidden_size * 2, project_dim),
        )


class BertBody(nn.Module):
    """transformers' BertModel layout: embeddings, encoder, pooler."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if attention_mask is None else extended_attention_mask(attention_mask, self.dtype)
        return self.encoder(self.embeddings(input_ids), mask)  # (B, L, H)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype


class UniterBody(nn.Module):
    """UNITER's single-stream body: text embeddings, region embeddings, encoder, pooler."""

    def __init__(self, cfg: TransformerConfig, img_dim: int, pos_dim: int = 7) -> None:
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.img_embeddings = ImageEmbeddings(cfg, img_dim, pos_dim)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    def embed_regions(self, feat: torch.Tensor, box7: torch.Tensor,
                      region_masks: torch.Tensor | None = None) -> torch.Tensor:
        """Region embeddings with token type 1 (B, N, H)."""
        type_emb = self.embeddings.token_type_embeddings.weight[1]
        return self.img_embeddings(feat.to(self.dtype), box7.to(self.dtype), type_emb, region_masks)

    def forward(self, input_ids: torch.Tensor | None, text_mask: torch.Tensor | None,
                feat: torch.Tensor | None, box7: torch.Tensor | None, region_mask: torch.Tensor | None,
                region_masks: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``[text tokens] + [regions]`` (either part may be absent) -> (B, L + N, H).

        Padding in each part is masked out, which is equivalent to the official compact gather of the
        valid text and region positions.
        """
        parts, masks = [], []
        if input_ids is not None:
            parts.append(self.embeddings(input_ids))
            masks.append(torch.ones_like(input_ids, dtype=torch.bool) if text_mask is None else text_mask.bool())
        if feat is not None:
            if box7 is None:
                raise ValueError("region features need their boxes (box7)")
            parts.append(self.embed_regions(feat, box7, region_masks))
            masks.append(torch.ones(feat.shape[:2], dtype=torch.bool, device=feat.device)
                         if region_mask is None else region_mask.bool())
        hidden = torch.cat(parts, dim=1)
        mask = torch.cat(masks, dim=1)
        return self.encoder(hidden, extended_attention_mask(mask, hidden.dtype))


def box7_from_norm_bb(norm_bb: torch.Tensor) -> torch.Tensor:
    """(…, 6) [x1,y1,x2,y2,w,h] normalised -> (…, 7) with the area w*h appended, as UNITER does."""
    return torch.cat([norm_bb, norm_bb[..., 4:5] * norm_bb[..., 5:6]], dim=-1)
