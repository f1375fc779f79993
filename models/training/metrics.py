"""Retrieval recall with the official semantics (LightningDOT ``eval_model_on_dataloader``, UNITER ``itm_eval``).

- text -> image: a caption is a hit at K when its image is among its K best images; averaged over captions.
- image -> text: an image is a hit at K when ANY of its captions is among its K best captions; averaged over
  images. Images may have any number of captions.
- RSUM: the sum of the six recalls (in %).

Pure numpy: used by `ldot eval` and by validation during `ldot train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

KS = (1, 5, 10)


@dataclass
class Recalls:
    """Recall@K in % for both directions."""

    text_to_image: dict[int, float]  # K -> % of captions whose image is in their top K
    image_to_text: dict[int, float]  # K -> % of images with at least one caption in their top K

    @property
    def rsum(self) -> float:
        return sum(self.text_to_image.values()) + sum(self.image_to_text.values())

    def to_dict(self) -> dict[str, Any]:
        return {"text_to_image": {f"r{k}": v for k, v in self.text_to_image.items()},
                "image_to_text": {f"r{k}": v for k, v in self.image_to_text.items()},
                "rsum": self.rsum}

    @classmethod
    def mean(cls, items: Sequence[Recalls]) -> Recalls:
        """Per-figure mean (COCO 1K: over the five folds)."""
        return cls({k: float(np.mean([r.text_to_image[k] for r in items])) for k in items[0].text_to_image},
                   {k: float(np.mean([r.image_to_text[k] for r in items])) for k in items[0].image_to_text})


def _first_true(hits: np.ndarray) -> np.ndarray:
    """Position of the first True in each row (n, k); k when there is none."""
    k = hits.shape[1]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), k)


def text_to_image_ranks(ranked_images: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Rank (0-based) of each caption's image in its ranked list (n_txt, k); k when absent."""
    return _first_true(ranked_images == np.asarray(caption_image)[:, None])


def image_to_text_ranks(ranked_texts: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Rank of each image's best-placed caption in its ranked caption list (n_img, k); k when none is there."""
    caption_image = np.asarray(caption_image)
    owner = np.where(ranked_texts >= 0, caption_image[np.clip(ranked_texts, 0, None)], -1)  # (n_img, k)
    return _first_true(owner == np.arange(len(ranked_texts))[:, None])


def recall_at(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[int, float]:
    """% of ranks below each K."""
    return {k: float(100.0 * np.mean(ranks < k)) if len(ranks) else 0.0 for k in ks}


def recalls_from_rankings(ranked_images: np.ndarray, ranked_texts: np.ndarray, caption_image: np.ndarray,
                          ks: Sequence[int] = KS) -> Recalls:
    """Recalls from ranked id lists: images per caption (n_txt, k) and captions per image (n_img, k)."""
    return Recalls(recall_at(text_to_image_ranks(ranked_images, caption_image), ks),
                   recall_at(image_to_text_ranks(ranked_texts, caption_image), ks))


def recalls_from_vectors(text_vectors: np.ndarray, image_vectors: np.ndarray, caption_image: Sequence[int],
                         ks: Sequence[int] = KS) -> Recalls:
    """Exact recalls from embeddings (n_txt, D) and (n_img, D) by a dense score matrix: no index, no re-ranking.

    For validation during training; ``caption_image[i]`` is the row of caption i's image.
    """
    scores = np.asarray(text_vectors, np.float32) @ np.asarray(image_vectors, np.float32).T  # (n_txt, n_img)
    depth = max(ks)
    ranked_images = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    ranked_texts = np.argsort(-scores.T, axis=1, kind="stable")[:, :depth]
    return recalls_from_rankings(ranked_images, ranked_texts, np.asarray(caption_image), ks)


def chance_recalls(caption_image: Sequence[int], n_images: int, ks: Sequence[int] = KS) -> Recalls:
    """The expected recalls (%) of scores that rank at random: text->image K / n_images; image->text, for an image
    with c of the n captions, 1 - C(n - c, K) / C(n, K) (the chance that one of its captions is in a random top
    K), averaged over images."""
    owners = np.asarray(caption_image)
    n_txt = len(owners)
    counts = np.bincount(owners, minlength=n_images) if n_txt else np.zeros(n_images, dtype=int)

    def miss(c: int, k: int) -> float:
        p = 1.0
        for t in range(min(k, n_txt)):
            p *= max(0, n_txt - c - t) / (n_txt - t)
        return p

    t2i = {k: 100.0 * min(1.0, k / max(1, n_images)) for k in ks}
    i2t = {k: 100.0 * float(np.mean([1.0 - miss(int(c), k) for c in counts])) if n_images else 0.0 for k in ks}
    return Recalls(t2i, i2t)
