"""Hard negatives mined with the current model, as LightningDOT's ``--num_hard_negatives``
(official ``dvl/hn.py``).

Before epoch 0 and after each epoch's validation: encode every training caption and image with the model in eval
mode, exact inner-product search (faiss ``IndexFlatIP``; on a GPU through faiss-gpu when it is installed) for the
top P = min(max(2K + 10, 50), 1000) images of each caption and captions of each image, drop the true matches,
and draw K of the rest uniformly at random. Each pair of a batch then brings the K negative images of its
caption and the K negative captions of its image; all B*K are appended to the batch and shared by every query.

A model that ranks at random (a fresh one, or one stuck on the plateau at ln B) mines the same few images for every
caption: its negatives are no harder than random ones, and the official mining gives no sign of it.
`pool_concentration` measures that (0: the pools are spread as evenly as they can be; 1: every caption's pool
is the same P images); the trainer says so and, with its gate on, keeps in-batch negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.core.progress import ProgressFn, report


def pool_size(k: int, n: int) -> int:
    """The official candidate pool P = min(max(2k + 10, 50), 1000), at most the ``n`` candidates there are."""
    return min(max(2 * k + 10, 50), 1000, n)


@dataclass
class HardNegatives:
    """K negative image indices per caption and K negative caption indices per image."""

    images: np.ndarray  # (n_captions, K) int64: negative image index of each caption
    captions: np.ndarray  # (n_images, K) int64: negative caption index of each image
    mined_at: int  # optimizer step of the model that mined them
    concentration: float = 0.0  # `pool_concentration` of the captions' image pools (not saved)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"hn_images": torch.from_numpy(self.images), "hn_captions": torch.from_numpy(self.captions),
                "hn_step": torch.tensor([self.mined_at])}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> HardNegatives | None:
        if "hn_images" not in tensors:
            return None
        return cls(tensors["hn_images"].numpy(), tensors["hn_captions"].numpy(), int(tensors["hn_step"][0]))

    def for_batch(self, caption_indices: list[int], caption_image: list[int]) -> tuple[list[int], list[int]]:
        """(B*K negative captions, B*K negative images) of a batch: pair i brings its caption's K images and its
        image's K captions."""
        images = [int(j) for i in caption_indices for j in self.images[i]]
        captions = [int(c) for i in caption_indices for c in self.captions[caption_image[i]]]
        return captions, images


STALLED = 0.8  # pool concentration from which the pools say "this model ranks every caption's images alike"
# (measured: 0.99-1.00 from a fresh tiny model; 0.37-0.40 from one that has begun to learn, benchmarks/defaults.py)


def pool_concentration(found: np.ndarray, n_keys: int) -> float:
    """How much the rows' candidate pools (n_rows, P) are the same few keys: the share of all pool slots held by
    the P most-found keys, rescaled so that 0 = pools spread evenly over the ``n_keys`` keys (each key in the
    same number of pools) and 1 = every row's pool is the same P keys. 0 when P covers most keys (nothing to
    tell: any pools overlap)."""
    rows, top = found.shape
    if rows == 0 or top == 0 or 2 * top > n_keys:
        return 0.0
    counts = np.bincount(found[found >= 0].ravel(), minlength=n_keys)
    held = np.sort(counts)[::-1][:top].sum() / float(rows * top)
    even = top / n_keys
    return float(max(0.0, (held - even) / (1.0 - even)))


def search_top(queries: np.ndarray, keys: np.ndarray, top: int, use_gpu: bool = False) -> np.ndarray:
    """Exact inner-product top-``top`` key indices of each query (n_queries, top)."""
    from models.core import ann

    index = ann.flat(keys)
    if use_gpu:
        import faiss

        if hasattr(faiss, "StandardGpuResources"):  # faiss-gpu installed (the [gpu] extra)
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), top)
    return found


def draw_negatives(found: np.ndarray, positives: list[set[int]], k: int, generator: np.random.Generator) -> np.ndarray:
    """From each row's candidate pool, drop its positives and draw ``k`` at random (with repeats only when the
    pool holds fewer than ``k``)."""
    out = np.empty((len(found), k), dtype=np.int64)
    for row, candidates in enumerate(found):
        pool = [int(c) for c in candidates if c >= 0 and int(c) not in positives[row]]
        if not pool:  # every candidate is a positive: nothing to learn from; any non-positive would do
            pool = [int(c) for c in candidates if c >= 0] or [0]
        out[row] = generator.choice(pool, size=k, replace=len(pool) < k)
    return out


def mine(caption_vectors: np.ndarray, image_vectors: np.ndarray, caption_image: list[int], k: int, seed: int,
         step: int, use_gpu: bool = False, progress: ProgressFn | None = None) -> HardNegatives:
    """Hard negatives from the current vectors (rows of ``caption_vectors`` are the training captions, of
    ``image_vectors`` the training images; ``caption_image[i]`` is caption i's image)."""
    report(progress, "mining hard negatives", 1, 3, "stages")
    n_img, n_cap = len(image_vectors), len(caption_vectors)
    generator = np.random.default_rng(seed * 1_000_003 + step)
    found_images = search_top(caption_vectors, image_vectors, pool_size(k, n_img), use_gpu)
    image_pos = [{img} for img in caption_image]
    neg_images = draw_negatives(found_images, image_pos, k, generator)
    report(progress, "mining hard negatives", 2, 3, "stages")
    found_captions = search_top(image_vectors, caption_vectors, pool_size(k, n_cap), use_gpu)
    caption_pos: list[set[int]] = [set() for _ in range(n_img)]
    for cap, img in enumerate(caption_image):
        caption_pos[img].add(cap)
    neg_captions = draw_negatives(found_captions, caption_pos, k, generator)
    report(progress, "mining hard negatives", 3, 3, "stages")
    return HardNegatives(neg_images, neg_captions, step, pool_concentration(found_images, n_img))
