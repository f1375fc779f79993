"""LightningDOT pre-training: the bi-encoder plus the VMLM / MRFR / MRC heads, in the official layout.

``BiEncoderForPretraining.state_dict()`` IS the official ``LightningDot.pt`` layout: the bi-encoder under
``bert.`` (``bert.txt_model.*``, ``bert.img_model.*``) and the heads ``cls.predictions.*`` (BERT's
``BertOnlyMLMHead``), ``feat_regress.*`` (UNITER's ``RegionFeatureRegression``), ``region_classifier.*``
(``RegionClassification``) and ``itm_output.*`` (kept for the layout; LightningDOT's ITM task is CMR and
never uses it). So `models.hub.formats.bi_encoder_state` reads our files and the official one alike.

Tied weights, as the official code (check ``dvl/models/bi_encoder.py``):

- ``cls.predictions.decoder.weight`` IS the IMAGE tower's word embedding (``bert.img_model.bert.embeddings.
  word_embeddings.weight``), although VMLM predicts the TEXT tower's masked tokens;
- ``feat_regress.weight`` IS the image tower's ``img_linear.weight`` (used transposed: hidden -> img_dim).

Fusion ("add", the official ``cls_concat``): VMLM reads text token states + the image tower's [CLS] state;
MRFR and MRC read region states + the text tower's [CLS] state (last-layer states, before projection).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.nn import losses
from models.nn.bi_encoder import BiEncoder
from models.nn.config import BiEncoderConfig
from models.nn.layers import box7_from_norm_bb
from models.nn.regions import RegionRecord

NUM_REGION_LABELS = 1601  # Visual Genome: 1600 objects + background (index 0 in UNITER's order)
TASKS = ("itm", "mlm", "mrfr", "mrckl")
# Keys that alias another parameter (tied weights): (alias, source).
TIED = (("cls.predictions.decoder.weight", "bert.img_model.bert.embeddings.word_embeddings.weight"),
        ("feat_regress.weight", "bert.img_model.bert.img_embeddings.img_linear.weight"))


class PredictionTransform(nn.Module):
    """BERT's head transform: dense -> GELU -> LayerNorm."""

    def __init__(self, hidden: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPrediction(nn.Module):
    """``predictions``: transform, then a decoder tied to a word-embedding matrix, plus a free bias."""

    def __init__(self, hidden: int, embedding: nn.Parameter, eps: float = 1e-12) -> None:
        super().__init__()
        self.transform = PredictionTransform(hidden, eps)
        self.decoder = nn.Linear(embedding.shape[1], embedding.shape[0], bias=False)
        self.decoder.weight = embedding  # tied
        self.bias = nn.Parameter(torch.zeros(embedding.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias  # (M, V)


class MLMHead(nn.Module):
    """BERT's ``BertOnlyMLMHead`` layout: ``predictions.{transform.*, decoder.weight, bias}``."""

    def __init__(self, hidden: int, embedding: nn.Parameter, eps: float = 1e-12) -> None:
        super().__init__()
        self.predictions = LMPrediction(hidden, embedding, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


class RegionFeatureRegression(nn.Module):
    """MRFR head: Linear -> GELU -> LayerNorm, then ``img_linear``'s weight transposed (+ own bias)."""

    def __init__(self, hidden: int, img_dim: int, img_linear_weight: nn.Parameter) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))
        self.weight = img_linear_weight  # tied, (hidden, img_dim)
        self.bias = nn.Parameter(torch.zeros(img_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.net(x), self.weight.t(), self.bias)  # (M, img_dim)


class RegionClassification(nn.Module):
    """MRC head: Linear -> GELU -> LayerNorm -> Linear(hidden, labels)."""

    def __init__(self, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12),
                                 nn.Linear(hidden, num_labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (M, labels)


@dataclass
class PairBatch:
    """A padded batch of B (caption, image) pairs; row i of the text part matches row i of the image part."""

    input_ids: torch.Tensor  # (B, L) long: [CLS] word-pieces [SEP], padded with [PAD]
    text_mask: torch.Tensor  # (B, L) bool: real tokens
    features: torch.Tensor  # (B, N, img_dim) float: region features, zero-padded
    norm_bb: torch.Tensor  # (B, N, 6) float: normalised boxes
    region_mask: torch.Tensor  # (B, N) bool: real regions
    image_ids: torch.Tensor  # (B,) long: image index of each pair (same image twice = not a negative)
    soft_labels: torch.Tensor | None = None  # (B, N, C) float, background FIRST (MRC-kl only)
    object_ids: torch.Tensor | None = None  # (B, N) long: detector class of each region, -1 padding (tags)
    text_image_ids: torch.Tensor | None = None  # (B,) long: image of each caption row, when rows do not pair
    negatives: PairBatch | None = None  # hard negatives: B*K captions and B*K images (not pairs of each other)
    # a model that reads pixels (a decomposed ViLT): the images as pixels; the region fields are then empty (B, 0, ...)
    pixel_values: torch.Tensor | None = None  # (B, 3, H, W) float, zero-padded bottom-right
    pixel_mask: torch.Tensor | None = None  # (B, H, W) long: 1 on the image

    def to(self, device: torch.device | str) -> PairBatch:
        def move(t: Any) -> Any:
            if t is None:
                return None
            return t.to(device) if isinstance(t, PairBatch) else t.to(device, non_blocking=True)

        return PairBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))

    def pin_memory(self) -> PairBatch:
        """Page-locked copies, for fast asynchronous copies to a CUDA device."""
        def pin(t: Any) -> Any:
            return None if t is None else t.pin_memory()

        return PairBatch(*(pin(getattr(self, f)) for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class BiEncoderForPretraining(nn.Module):
    """``bert`` (a `BiEncoder`) + ``cls`` / ``feat_regress`` / ``region_classifier`` / ``itm_output``."""

    def __init__(self, config: BiEncoderConfig, num_region_labels: int = NUM_REGION_LABELS) -> None:
        super().__init__()
        if config.text.hidden_size != config.image.hidden_size:
            raise ValueError("the 'add' fusion of pre-training needs towers of one hidden size "
                             f"(text {config.text.hidden_size}, image {config.image.hidden_size})")
        hidden = config.image.hidden_size
        self.config = config
        self.num_region_labels = num_region_labels
        self.bert = BiEncoder(config)
        image_body = self.bert.img_model.bert
        # (torch's stubs type `nn.Embedding.weight` and `nn.Linear.weight` as Tensor: they are Parameters, tied here)
        self.cls = MLMHead(hidden, image_body.embeddings.word_embeddings.weight,  # type: ignore[arg-type]
                           config.image.layer_norm_eps)
        self.feat_regress = RegionFeatureRegression(hidden, config.img_dim,
                                                    image_body.img_embeddings.img_linear.weight)  # type: ignore[arg-type]
        self.region_classifier = RegionClassification(hidden, num_region_labels)
        self.itm_output = nn.Linear(hidden, 2)

    # -- the two towers ----------------------------------------------------------------------------
    def text_states(self, batch: PairBatch, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last-layer text states (B, L, H)."""
        ids = batch.input_ids if input_ids is None else input_ids
        return self.bert.txt_model.bert(ids, batch.text_mask)

    def image_states(self, batch: PairBatch, features: torch.Tensor | None = None,
                     region_masks: torch.Tensor | None = None) -> torch.Tensor:
        """Last-layer image-tower states (B, 1 + N, H): [CLS], then the regions."""
        feat = batch.features if features is None else features
        box7 = box7_from_norm_bb(batch.norm_bb.to(feat.dtype))
        return self.bert.img_model.sequence(feat, box7, batch.region_mask, region_masks)

    # -- retrieval vectors (CMR, hard-negative mining, distillation, validation) ---------------------
    kind = "bi-encoder"
    logit_scale = 1.0  # CMR scores are raw dot products

    def pair_vectors(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected [CLS] vectors of the batch's captions and images: (B, D), (B, D)."""
        text = self.bert.txt_model.encode_proj(self.text_states(batch)[:, 0])
        image = self.bert.img_model.encode_proj(self.image_states(batch)[:, 0])
        return text, image

    def retrieval_loss(self, text: torch.Tensor, image: torch.Tensor, batch: PairBatch,
                       neg_text: torch.Tensor | None = None, neg_image: torch.Tensor | None = None) -> torch.Tensor:
        """CMR (`losses.cmr_loss`), with hard negatives appended when given (`losses.contrastive_loss`)."""
        if neg_text is None and neg_image is None:
            return losses.cmr_loss(text, image, batch.image_ids)
        return losses.contrastive_loss(text, image, batch, neg_text, neg_image)

    def text_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert.txt_model(input_ids, attention_mask)

    def record_vectors(self, records: Sequence[RegionRecord]) -> torch.Tensor:
        """Per-image region records -> image vectors (B, D)."""
        from models.nn.regions import stack_regions

        feat, bb, valid, _ = stack_regions(records)
        device = self.itm_output.weight.device
        return self.bert.img_model(feat.to(device), box7_from_norm_bb(bb).to(device), valid.to(device))

    def export_state(self) -> dict[str, torch.Tensor]:
        """The bi-encoder's weights (what a model directory holds)."""
        return self.bert.state_dict()

    # -- tasks -----------------------------------------------------------------------------------------
    def itm(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """CMR on the projected [CLS] vectors (the ``itm`` task and fine-tuning)."""
        text, image = self.pair_vectors(batch)  # (B, D)
        loss = self.retrieval_loss(text, image, batch)
        return loss, {"acc": losses.in_batch_accuracy(text.detach(), image.detach(), batch.image_ids)}

    def mlm(self, batch: PairBatch, masked_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """VMLM: masked text states + the image [CLS] state -> MLM head -> CE on the masked tokens."""
        text = self.text_states(batch, masked_ids)  # (B, L, H)
        image_cls = self.image_states(batch)[:, :1]  # (B, 1, H)
        chosen = labels != losses.IGNORE  # (B, L)
        logits = self.cls((text + image_cls)[chosen])  # (M, V)
        target = labels[chosen]
        loss = losses.mlm_loss(logits, target)
        return loss, {"acc": float((logits.argmax(-1) == target).float().mean())}

    def _masked_region_states(self, batch: PairBatch, masked: torch.Tensor) -> torch.Tensor:
        """Region states of the masked regions + the text [CLS] state (M, H); features zeroed + mask embedding."""
        feat = batch.features.masked_fill(masked[..., None], 0.0)
        image = self.image_states(batch, feat, masked)[:, 1:]  # (B, N, H)
        text_cls = self.text_states(batch)[:, :1]  # (B, 1, H)
        return (image + text_cls)[masked]  # (M, H)

    def mrfr(self, batch: PairBatch, masked: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """MRFR: regress the original features of the masked regions."""
        predicted = self.feat_regress(self._masked_region_states(batch, masked))  # (M, img_dim)
        return losses.mrfr_loss(predicted, batch.features[masked]), {}

    def mrc(self, batch: PairBatch, masked: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """MRC-kl: predict the detector's class distribution (background first) of the masked regions."""
        if batch.soft_labels is None:
            raise ValueError("the mrckl task needs soft labels (an image DB written with soft_labels)")
        logits = self.region_classifier(self._masked_region_states(batch, masked))  # (M, C)
        return losses.mrc_kl_loss(logits, batch.soft_labels[masked]), {}


def state_for_saving(model: BiEncoderForPretraining) -> dict[str, torch.Tensor]:
    """The state dict without the tied aliases (safetensors refuses shared tensors)."""
    state = model.state_dict()
    for alias, _ in TIED:
        state.pop(alias, None)
    return state


def with_tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the tied aliases back (what `load_state_dict` of `BiEncoderForPretraining` expects)."""
    state = dict(state)
    for alias, source in TIED:
        if alias not in state and source in state:
            state[alias] = state[source]
    return state
