"""LightningDOT training objectives and the masking that feeds them, as pure functions.

Objectives (the LightningDOT paper, §3; reductions as the official ``pretrain.py`` / ``train_itm.py``):

- CMR, `cmr_loss`: symmetric in-batch softmax over raw dot products, ``0.5 * (text -> image) +
  0.5 * (image -> text)``, no temperature, the other pairs of the batch are the negatives. Used by the
  ``itm`` pre-training task and by fine-tuning.
- VMLM, `mlm_loss`: cross-entropy of the masked word-pieces (mean over masked tokens).
- MRFR, `mrfr_loss`: squared error to the masked regions' 2048-d features (mean over every element).
- MRC-kl, `mrc_kl_loss`: KL(detector soft labels || predicted distribution). Soft labels are in the
  UNITER image-DB order, **background class FIRST** (index 0): the order the official ``region_classifier``
  (and so a ``LightningDot.pt`` head) was trained with. Our detector's `RegionFeatures.soft_labels` put it
  last: `soft_labels_background_first` converts, and `models.training.loop.region_lookup` is the one caller.
  The official reduction is the mean over every (region, class) element, i.e. the per-region KL / C.
- `nt_xent_loss`: VLDeformer's contrastive loss (cosine similarity / temperature over the 2B vectors of
  both modalities, SimCLR's NT-Xent). Offered as a function only: a model trained with cosine scores
  must be indexed with normalised vectors, which LightningDOT models (raw dot product) are not.

Masking (the official ``random_word`` / ``_get_img_mask``) takes a seeded `torch.Generator`, so a run is
reproducible and resumable.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -1  # label of a token that is not predicted


# -- retrieval -----------------------------------------------------------------------------------------
def _same_image_mask(image_ids: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    """(B, B) True where column j is another caption/image of row i's image (a false negative)."""
    if image_ids is None:
        return None
    ids = torch.as_tensor(image_ids, device=device)
    same = ids[:, None] == ids[None, :]
    same.fill_diagonal_(False)
    return same if bool(same.any()) else None


def retrieval_scores(text: torch.Tensor, image: torch.Tensor, image_ids: torch.Tensor | None = None,
                     temperature: float | None = None) -> torch.Tensor:
    """Raw dot products (B, B) in float32, row = caption, column = image; diagonal = the true pairs.

    ``image_ids`` (B,): when two rows of the batch show the same image, each is masked out of the other's
    negatives (the official code would count it as a negative; with 5 captions per image and small data
    sets that is common). ``temperature`` divides the scores (InfoNCE); None = the LightningDOT loss.
    """
    scores = text.float() @ image.float().T  # (B, B)
    if temperature is not None:
        scores = scores / temperature
    same = _same_image_mask(image_ids, len(scores), scores.device)
    if same is not None:
        scores = scores.masked_fill(same, float("-inf"))
    return scores


def cmr_loss(text: torch.Tensor, image: torch.Tensor, image_ids: torch.Tensor | None = None,
             temperature: float | None = None) -> torch.Tensor:
    """CMR: ``0.5 * CE(text -> image) + 0.5 * CE(image -> text)`` over in-batch dot products.

    text, image: (B, D) vectors of B matching pairs (row i of each is a pair). Returns a float32 scalar.
    """
    scores = retrieval_scores(text, image, image_ids, temperature)  # (B, B)
    target = torch.arange(len(scores), device=scores.device)
    return 0.5 * F.cross_entropy(scores, target) + 0.5 * F.cross_entropy(scores.T, target)


def in_batch_accuracy(text: torch.Tensor, image: torch.Tensor, image_ids: torch.Tensor | None = None) -> float:
    """Fraction of rows whose best-scoring column is their own pair, averaged over both directions."""
    scores = retrieval_scores(text, image, image_ids)
    target = torch.arange(len(scores), device=scores.device)
    t2i = (scores.argmax(dim=1) == target).float().mean()
    i2t = (scores.argmax(dim=0) == target).float().mean()
    return float(0.5 * (t2i + i2t))


def nt_xent_loss(text: torch.Tensor, image: torch.Tensor, temperature: float = 0.005) -> torch.Tensor:
    """VLDeformer's contrastive loss: NT-Xent over the 2B vectors of both modalities.

    Each vector's positive is its pair in the other modality; every other vector of the 2B (either
    modality) is a negative. Similarities are cosines divided by ``temperature`` (0.005 in its code).
    """
    z = F.normalize(torch.cat([text.float(), image.float()]), dim=-1)  # (2B, D)
    sim = z @ z.T / temperature  # (2B, 2B)
    sim.fill_diagonal_(float("-inf"))
    b = len(text)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(sim.device)
    return F.cross_entropy(sim, target)


def _query_key_scores(queries: torch.Tensor, keys: torch.Tensor, query_ids: torch.Tensor | None,
                      key_ids: torch.Tensor | None, temperature: float | None) -> torch.Tensor:
    """(B, M) scores of B queries against M keys whose first B are the queries' own matches; a key of the
    query's image other than its own match is masked out (the rule of `retrieval_scores`)."""
    scores = queries.float() @ keys.float().T
    if temperature is not None:
        scores = scores / temperature
    if query_ids is not None and key_ids is not None:
        same = query_ids[:, None].to(scores.device) == key_ids[None, :].to(scores.device)
        own = torch.zeros_like(same)
        own[:, : len(queries)] = torch.eye(len(queries), dtype=torch.bool, device=scores.device)
        same &= ~own
        if bool(same.any()):
            scores = scores.masked_fill(same, float("-inf"))
    return scores


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, batch: object = None,
                     neg_text: torch.Tensor | None = None, neg_image: torch.Tensor | None = None,
                     temperature: float | None = None, weight: float = 0.5) -> torch.Tensor:
    """``weight * (CE(text -> image) + CE(image -> text))`` with optional appended hard negatives.

    text, image (B, D): the batch's pairs. ``neg_image`` (B*K, D) are appended after the B images and shared by
    every caption query; ``neg_text`` (B*K, D) likewise for the image queries (the official collate,
    LightningDOT's ``dvl/data/itm.py``). ``batch`` (a `PairBatch`) gives the image id of each row
    (``image_ids``; its ``negatives`` hold ``image_ids`` of the negative images and ``text_image_ids`` of
    the negative captions) so that another caption/copy of a query's own image is never its negative.
    Without negatives, ``weight=0.5`` and no temperature this IS `cmr_loss`; ``weight=1`` and a temperature
    make VLDeformer's InfoNCE.
    """
    ids = getattr(batch, "image_ids", None)
    negs = getattr(batch, "negatives", None)
    keys_i, key_ids_i = image, ids
    keys_t, key_ids_t = text, ids
    if neg_image is not None:
        keys_i = torch.cat([image, neg_image.to(image.dtype)])
        key_ids_i = None if ids is None or negs is None else torch.cat([ids, negs.image_ids.to(ids.device)])
    if neg_text is not None:
        keys_t = torch.cat([text, neg_text.to(text.dtype)])
        key_ids_t = None if ids is None or negs is None else torch.cat([ids, negs.text_image_ids.to(ids.device)])
    target = torch.arange(len(text), device=text.device)
    t2i = _query_key_scores(text, keys_i, ids, key_ids_i, temperature)
    i2t = _query_key_scores(image, keys_t, ids, key_ids_t, temperature)
    return weight * (F.cross_entropy(t2i, target) + F.cross_entropy(i2t, target))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """LightningDOT's score distillation: ``KL(teacher || student) * T^2`` with softmax over the last axis
    (captions), reduction 'mean' over every entry (``KLDivLoss(log_softmax(s/T), softmax(t/T))``).

    student, teacher: (M, B) scores of M images against B captions."""
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    q = F.softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_p, q, reduction="sum") / log_p.numel() * temperature ** 2  # the official "mean"


# -- pre-training heads' losses ------------------------------------------------------------------------
def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """VMLM: cross-entropy of the masked tokens. logits (M, V) of the M masked positions, labels (M,)."""
    return F.cross_entropy(logits.float(), labels)


def mrfr_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MRFR: mean squared error to the original features. predicted, target: (M, img_dim)."""
    return F.mse_loss(predicted.float(), target.float())


def mrc_kl_loss(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """MRC-kl: KL(soft_labels || softmax(logits)), mean over every element as the official code.

    logits, soft_labels: (M, C) for the M masked regions; soft labels background FIRST (UNITER order).
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(log_probs, soft_labels.float(), reduction="none").mean()


def soft_labels_background_first(soft_labels: np.ndarray) -> np.ndarray:
    """(n, C) with background LAST (our detector, `RegionFeatures`) -> background FIRST (UNITER, MRC-kl)."""
    return np.roll(np.asarray(soft_labels), 1, axis=-1)


# -- masking ---------------------------------------------------------------------------------------------
def _at_least_one(masked: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator | None,
                  first: bool) -> torch.Tensor:
    """Force one masked position in each row that has candidates but no mask (the official guarantee)."""
    empty = ~masked.any(dim=1) & candidates.any(dim=1)
    if not bool(empty.any()):
        return masked
    masked = masked.clone()
    for row in torch.nonzero(empty).flatten().tolist():
        positions = torch.nonzero(candidates[row]).flatten()
        if first:
            pick = positions[0]
        else:
            pick = positions[int(torch.randint(len(positions), (1,), generator=generator).item())]
        masked[row, pick] = True
    return masked


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, vocab_range: tuple[int, int],
                generator: torch.Generator | None = None, prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (the official ``random_word``): each maskable token is chosen with ``prob``; a chosen
    token becomes [MASK] (80%), a random id in ``vocab_range`` [lo, hi) (10%), or stays (10%).

    input_ids (B, L) long; maskable (B, L) bool (word-pieces: not [CLS], [SEP] or padding).
    Returns (masked ids (B, L), labels (B, L): the original id where chosen, `IGNORE` elsewhere). Every
    row with a maskable token has at least one chosen (its first word-piece, as the official code).
    """
    maskable = maskable.bool()
    draw = torch.rand(input_ids.shape, generator=generator)  # (B, L)
    chosen = (draw < prob) & maskable
    chosen = _at_least_one(chosen, maskable, generator, first=True)
    forced = chosen & ~(draw < prob)  # forced picks are always [MASK]
    action = draw / prob  # in [0, 1) for the tokens chosen by the draw
    lo, hi = vocab_range
    random_ids = torch.randint(lo, hi, input_ids.shape, generator=generator)
    out = input_ids.clone()
    to_mask = chosen & ((action < 0.8) | forced)
    to_random = chosen & ~forced & (action >= 0.8) & (action < 0.9)
    out[to_mask] = mask_id
    out[to_random] = random_ids[to_random]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    return out, labels


def mask_regions(valid: torch.Tensor, generator: torch.Generator | None = None, prob: float = 0.15) -> torch.Tensor:
    """SMRM region masking (the official ``_get_img_mask``): each valid region is masked with ``prob``;
    a row with none masked gets one at random. valid (B, N) bool -> masked (B, N) bool."""
    valid = valid.bool()
    masked = (torch.rand(valid.shape, generator=generator) < prob) & valid
    return _at_least_one(masked, valid, generator, first=False)


def vocab_range_of(tokenizer: object) -> tuple[int, int]:
    """[lo, hi) of the ids a random replacement may take: from '!' (UNITER's ``v_range``) to the end;
    for vocabularies without '!', everything after the special tokens."""
    backend = getattr(tokenizer, "backend")
    size = backend.get_vocab_size()
    bang = backend.token_to_id("!")
    if bang is not None:
        return bang, size
    specials = [backend.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
    return max(i for i in specials if i is not None) + 1, size
