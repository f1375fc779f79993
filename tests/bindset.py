"""A second synthetic image-text set, for the figures of the training defaults (`benchmarks/defaults.py`): what
`tests/learnset.py` and `benchmarks/learn.py` do not test.

Each image shows N (1, 2 or 3) regions of one object in one colour and one region of another object in another
colour, plus two clutter regions; the captions say "two red dogs left of a blue cat". Three things only a model
that reads the regions as a whole can get:

- counts: "one", "two", "three" is the number of regions of the first object (the same features N times);
- spatial relations only in the boxes: "left of" / "right of" changes no region's features, only where its box
  lies (the first object's boxes in the left 40% of the picture, the second's in the right 40%, or the mirror);
- attribute binding: a region's features are its object's plus its colour's prototype, so "red dog, blue cat"
  and "blue dog, red cat" hold the same four prototypes, bound differently.

Its own vocabulary (`tokenizer_for`), prototypes (seed 4321) and region layout: nothing is shared with learnset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OBJECTS = ("dog", "cat", "car", "ball", "tree", "bench")
COLOURS = ("red", "blue", "green", "yellow")
COUNTS = ("one", "two", "three")
CLASS_NAMES = OBJECTS + ("thing",)  # detector classes (0-based, background excluded): the tags
WORDS = ("a the of left right one two three and " + " ".join(OBJECTS) + " " + " ".join(COLOURS) + " thing").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class Regions:
    features: np.ndarray
    norm_bb: np.ndarray
    soft_labels: np.ndarray  # background FIRST (the training contract)


def tokenizer_for(directory: Path, size: int = 128) -> Any:
    """A cased WordPiece tokenizer over the set's words (padded to ``size`` ids, the tiny models' vocabulary)."""
    from models.nn.tokenizer import Tokenizer

    tokens = SPECIALS + list(dict.fromkeys(WORDS)) + ["##s"]
    tokens += [f"##y{i}" for i in range(size - len(tokens))]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return Tokenizer.from_path(directory / "vocab.txt")


def _caption(n: int, c1: str, o1: str, rel: str, c2: str, o2: str, template: int) -> str:
    first = f"{COUNTS[n - 1]} {c1} {o1}" + ("s" if n > 1 else "")
    if template == 0:
        return f"{first} {rel} of a {c2} {o2}"
    other = "right" if rel == "left" else "left"
    return f"a {c2} {o2} {other} of {first}"


def binding_set(n_images: int, seed: int = 0, img_dim: int = 32, noise: float = 0.3, protos_seed: int = 4321,
                tokenizer: Any = None) -> tuple[Any, dict, list[str]]:
    """(PairSet, lookup, captions) of ``n_images`` images x 2 captions; sets drawn with other ``seed`` values share
    the prototypes (train / held-out splits of one world)."""
    from models.training.data import PairSet

    protos = np.random.default_rng(protos_seed)
    p_obj = protos.normal(size=(len(OBJECTS), img_dim))
    p_col = protos.normal(size=(len(COLOURS), img_dim))
    p_clutter = protos.normal(size=img_dim)
    rng = np.random.default_rng(seed)
    n_labels = len(CLASS_NAMES) + 1
    lookup: dict[str, Regions] = {}
    keys, texts, owners = [], [], []
    for i in range(n_images):
        o1, o2 = (int(x) for x in rng.choice(len(OBJECTS), size=2, replace=False))
        c1, c2 = (int(x) for x in rng.choice(len(COLOURS), size=2, replace=False))
        n = int(rng.integers(1, 4))
        left = bool(rng.integers(2))
        rows = [p_obj[o1] + p_col[c1]] * n + [p_obj[o2] + p_col[c2], p_clutter, p_clutter]
        classes = [o1] * n + [o2, len(OBJECTS), len(OBJECTS)]
        first_x = (0.0, 0.4) if left else (0.6, 1.0)
        second_x = (0.6, 1.0) if left else (0.0, 0.4)
        boxes = []
        for r in range(len(rows)):
            lo, hi = first_x if r < n else second_x if r == n else (0.0, 1.0)
            w = rng.uniform(0.1, min(0.3, hi - lo))
            x1 = rng.uniform(lo, hi - w)
            h = rng.uniform(0.2, 0.5)
            y1 = rng.uniform(0.0, 1.0 - h)
            boxes.append([x1, y1, x1 + w, y1 + h, w, h])
        feats = np.stack(rows) + noise * rng.normal(size=(len(rows), img_dim))
        order = rng.permutation(len(rows))  # region order says nothing
        soft = np.full((len(rows), n_labels), 0.02 / n_labels)
        soft[np.arange(len(rows)), np.asarray(classes) + 1] += 0.98
        key = f"bind{seed}_{i:05d}.npz"
        lookup[key] = Regions(feats[order].astype(np.float16), np.asarray(boxes, np.float32)[order],
                              soft[order].astype(np.float32))
        keys.append(key)
        words = dict(n=n, c1=COLOURS[c1], o1=OBJECTS[o1], rel="left" if left else "right", c2=COLOURS[c2],
                     o2=OBJECTS[o2])
        for template in (0, 1):
            texts.append(_caption(template=template, **words))
            owners.append(i)
    if tokenizer is None:
        return None, lookup, texts
    return PairSet.from_texts(texts, owners, keys, tokenizer), lookup, texts
