"""The encoding interface the indexer, the searcher and the evaluation use, whatever the model.

Region models (`BiEncoder`, `DecomposedEncoder`) read the detector's region features; pixel models
(`DualEncoder`: CLIP, SigLIP) read preprocessed pixels (``pixel_preprocess`` gives the worker-side function).
``inputs`` says which, so a caller knows, before any model work, whether a detector is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Inputs = Literal["regions", "pixels"]


@runtime_checkable
class Encoder(Protocol):
    """A text tower and an image tower whose vectors are compared by inner product."""

    inputs: Inputs  # what `encode_images` takes: region sets, or preprocessed (3, h, w) pixel arrays

    @property
    def device(self) -> torch.device: ...

    def encode_text(self, texts: Sequence[str], batch_size: int = ...) -> torch.Tensor:
        """Texts -> (n, D) float32 vectors (on the CPU)."""
        ...

    def encode_images(self, images: Sequence[Any], batch_size: int = ..., progress: Any = None) -> torch.Tensor:
        """Region sets (``inputs == "regions"``) or pixel arrays (``"pixels"``) -> (n, D) float32 (on the CPU)."""
        ...

    def text_tokens(self, text: str) -> tuple[int, int]:
        """(tokens the text has, tokens the model reads), special tokens not counted: a longer text is cut."""
        ...


def encode_in_batches(texts: Sequence[str], batch_size: int, encode: Callable[[Sequence[str]], torch.Tensor],
                      dim: int) -> torch.Tensor:
    """``encode`` over ``texts`` ``batch_size`` at a time -> (n, dim) (what every model's ``encode_text`` does with
    its own tokenization and tower). A bare string is refused: it would be read as a list of characters."""
    if isinstance(texts, str):
        raise TypeError("encode_text takes a list of strings, not one string")
    out = [encode(texts[start:start + batch_size]) for start in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dim)
