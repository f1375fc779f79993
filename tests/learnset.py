"""A synthetic image-text set with learnable structure, and the training modes `benchmarks/learn.py` measures.

Each image shows two objects with colours in a scene: its regions are the sums of an object's, a colour's and (for
the first object) a size's random prototype vector plus noise, two scene regions and two clutter regions; its
captions name them in real English words ("a small red dog with a blue ball on the beach"). The CONFUSABLE subset
holds groups of images that differ only in the first object's colour and size:
in-batch negatives rarely put two of a group side by side, mined hard negatives do.

Used by `tests/test_learning.py` (tiny, seconds) and `benchmarks/learn.py` (larger, minutes).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

OBJECTS = ("dog", "cat", "man", "woman", "child", "car", "ball", "bench", "tree")
COLOURS = ("red", "blue", "white", "black")
SCENES = ("beach", "park", "street", "snow", "grass", "water")
SIZES = ("small", "big")
TEMPLATES = ("a {z} {c1} {o1} with a {c2} {o2} on the {s}", "the {s} , a {c2} {o2} near a {z} {c1} {o1}")
CLASS_NAMES = OBJECTS + SCENES + ("sky",)  # detector classes (0-based, background excluded): tag vocabulary


@dataclass
class Regions:
    features: np.ndarray
    norm_bb: np.ndarray
    soft_labels: np.ndarray  # background FIRST (the training contract)


def learnable_set(n_images: int, seed: int = 0, confusable: int = 0, img_dim: int = 32, size_strength: float = 0.6,
                  noise: float = 0.3, protos_seed: int = 1234, tokenizer: Any = None,
                  group: int = 8) -> tuple[Any, dict, list[str]]:
    """(PairSet, lookup, captions) of ``n_images`` images x 2 captions; the first ``confusable`` images come in groups
    of ``group`` that share their objects and scene and differ only in the first object's colour and size.
    Prototypes depend on
    ``protos_seed`` only, so sets drawn with other ``seed`` values share one "world" (train / validation splits)."""
    from models.training.data import PairSet

    protos = np.random.default_rng(protos_seed)
    p_obj = protos.normal(size=(len(OBJECTS), img_dim))
    p_col = protos.normal(size=(len(COLOURS), img_dim))
    p_scene = protos.normal(size=(len(SCENES), img_dim))
    p_size = protos.normal(size=(len(SIZES), img_dim))
    p_clutter = protos.normal(size=(1, img_dim))
    rng = np.random.default_rng(seed)
    n_labels = len(CLASS_NAMES) + 1
    lookup: dict[str, Regions] = {}
    keys, texts, owners = [], [], []
    twin: dict[str, Any] = {}
    for i in range(n_images):
        if i < confusable and i % group:  # a group shares all but the first object's colour and size
            variant = (i % group) % (2 * len(COLOURS) ** 2)  # groups of up to 32: the second colour varies too
            spec = dict(twin, c1=(twin["c1"] + variant // 2) % len(COLOURS), z=(twin["z"] + variant) % 2,
                        c2=(twin["c2"] + variant // (2 * len(COLOURS))) % len(COLOURS))
        else:
            o1, o2 = rng.choice(len(OBJECTS), size=2, replace=False)
            c1, c2 = rng.integers(len(COLOURS), size=2)
            spec = dict(o1=int(o1), o2=int(o2), c1=int(c1), c2=int(c2), s=int(rng.integers(len(SCENES))),
                        z=int(rng.integers(2)))
            twin = spec
        rows = [p_obj[spec["o1"]] + p_col[spec["c1"]] + size_strength * p_size[spec["z"]],
                p_obj[spec["o2"]] + p_col[spec["c2"]], p_scene[spec["s"]], p_scene[spec["s"]], p_clutter[0],
                p_clutter[0]]
        classes = [spec["o1"], spec["o2"], len(OBJECTS) + spec["s"], len(OBJECTS) + spec["s"], len(CLASS_NAMES) - 1,
                   len(CLASS_NAMES) - 1]
        feats = np.stack(rows) + noise * rng.normal(size=(len(rows), img_dim))
        order = rng.permutation(len(rows))
        x1, y1 = rng.uniform(0, 0.5, len(rows)), rng.uniform(0, 0.5, len(rows))
        w, h = rng.uniform(0.1, 0.5, len(rows)), rng.uniform(0.1, 0.5, len(rows))
        bb = np.stack([x1, y1, x1 + w, y1 + h, w, h], axis=1)
        soft = np.full((len(rows), n_labels), 0.02 / n_labels)
        soft[np.arange(len(rows)), np.asarray(classes) + 1] += 0.98
        key = f"syn{seed}_{i:05d}.npz"
        lookup[key] = Regions(feats[order].astype(np.float16), bb.astype(np.float32), soft[order].astype(np.float32))
        keys.append(key)
        words = dict(o1=OBJECTS[spec["o1"]], o2=OBJECTS[spec["o2"]], c1=COLOURS[spec["c1"]],
                     c2=COLOURS[spec["c2"]], s=SCENES[spec["s"]], z=SIZES[spec["z"]])
        for template in TEMPLATES:
            texts.append(template.format(**words))
            owners.append(i)
    if tokenizer is None:
        return None, lookup, texts
    return PairSet.from_texts(texts, owners, keys, tokenizer), lookup, texts


def subset(pairs: Any, n_images: int) -> Any:
    """The first ``n_images`` images and their captions."""
    from models.training.data import PairSet

    keep = [i for i, img in enumerate(pairs.caption_image) if img < n_images]
    return PairSet([pairs.token_ids[i] for i in keep], [pairs.caption_image[i] for i in keep],
                   pairs.image_keys[:n_images])


def chance(n_images: int, captions_per_image: int = 2) -> dict[str, float]:
    """Expected recalls (%) of random scores: text->image K/n; image->text P(one of c captions in the top K)."""
    n_captions = n_images * captions_per_image
    t2i = {k: 100 * min(1.0, k / n_images) for k in (1, 5, 10)}
    i2t = {k: 100 * (1 - math.comb(n_captions - captions_per_image, k) / math.comb(n_captions, k)) for k in (1, 5, 10)}
    return {"mean_recall": (sum(t2i.values()) + sum(i2t.values())) / 6,
            "text_to_image": {f"r{k}": v for k, v in t2i.items()},
            "image_to_text": {f"r{k}": v for k, v in i2t.items()}}


# -- models and modes ---------------------------------------------------------------------------------------
def tokenizer_for(directory: Path) -> Any:
    from ldot_testing import write_vocab

    from models.nn.tokenizer import Tokenizer

    return Tokenizer.from_path(write_vocab(directory))


def bi_encoder(seed: int = 0) -> Any:
    from models.nn.config import preset
    from models.nn.pretraining import BiEncoderForPretraining
    from models.training.initialization import bert_init_

    torch.manual_seed(seed)
    model = BiEncoderForPretraining(preset("tiny"), num_region_labels=len(CLASS_NAMES) + 1)
    bert_init_(model)
    return model


def train_teacher(pairs: Any, lookup: dict, tokenizer: Any, steps: int = 150, batch: int = 16, lr: float = 1e-3,
                  seed: int = 0) -> Any:
    """A tiny UNITER cross-encoder that knows the answer: trained listwise (each caption against every image of
    its batch, softmax over the images' scores) on the set. Returns the `CrossEncoder` (eval mode)."""
    from models.nn.config import CROSS_PRESETS
    from models.nn.cross_encoder import CrossEncoder
    from models.nn.layers import box7_from_norm_bb
    from models.training.data import SpecialIds, batch_indices, collate
    from models.training.initialization import bert_init_

    torch.manual_seed(seed)
    model = CrossEncoder(CROSS_PRESETS["tiny"])
    bert_init_(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = SpecialIds(tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id or 0, (5, 128))
    for step in range(steps):
        b = collate(pairs, batch_indices(len(pairs), batch, seed, step), lookup, ids, 128)
        n = len(b)
        rows = torch.arange(n).repeat_interleave(n)  # caption of each (caption, image) pair
        cols = torch.arange(n).repeat(n)  # image of each pair
        scores = model(b.input_ids[rows], b.text_mask[rows], b.features[cols], box7_from_norm_bb(b.norm_bb[cols]),
                       b.region_mask[cols]).reshape(n, n)
        same = b.image_ids[:, None] == b.image_ids[None, :]
        same.fill_diagonal_(False)
        loss = torch.nn.functional.cross_entropy(scores.masked_fill(same, float("-inf")), torch.arange(n))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def install_teacher(model: Any, name: str, vocab_dir: Path) -> Path:
    """Save a trained cross-encoder as a ``uniter-itm`` model dir in the cache (what ``--distill-from`` and
    ``ldot train decompose --init`` read)."""
    from models.core.home import models_dir
    from models.hub.cache import record_model
    from models.hub.formats import save_model_dir
    from models.nn.tokenizer import Tokenizer

    target = models_dir() / name
    save_model_dir(target, "uniter-itm", model.config.to_dict(), model.state_dict(),
                   tokenizer=Tokenizer.from_path(vocab_dir / "vocab.txt"))
    record_model(target, name, "uniter-itm", "test")
    return target


@dataclass
class ModeResult:
    mode: str
    before: dict[str, Any]
    after: dict[str, Any]
    chance: dict[str, Any]
    seconds: float


def evaluate(model: Any, pairs: Any, lookup: dict, tokenizer: Any) -> dict[str, Any]:
    from models.training.data import SpecialIds
    from models.training.loop import evaluate as run_eval

    ids = SpecialIds(tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id or 0, (5, 128))
    return run_eval(model, pairs, lookup, ids, torch.device("cpu"))


def run_mode(mode: str, model: Any, train_pairs: Any, val_pairs: Any, lookup: dict, tokenizer: Any, config: Any,
             teacher: Any = None, eval_pairs: Any = None) -> ModeResult:
    """Train ``model`` with ``config`` (validating on ``val_pairs``) and measure recall on ``eval_pairs``
    (default ``val_pairs``) before and after, with chance."""
    import time

    from models.training.data import TrainData
    from models.training.loop import train

    eval_pairs = eval_pairs or val_pairs
    before = evaluate(model, eval_pairs, lookup, tokenizer)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        train(Path(tmp) / "run", TrainData(train_pairs, lookup, val=None), replace(config, eval_every=10**9),
              model, tokenizer, device="cpu", teacher=teacher)
    seconds = time.monotonic() - started
    after = evaluate(model, eval_pairs, lookup, tokenizer)
    return ModeResult(mode, before, after, chance(len(eval_pairs.image_keys)), seconds)


def within_group_recall(model: Any, pairs: Any, lookup: dict, tokenizer: Any, group: int = 8) -> float:
    """R@1 (%) among each item's own confusable group only (both directions averaged): does the model tell a pair
    from its partners, which differ only in the detail? Chance = 100 / ``group``. ``pairs``: an all-confusable set."""
    from models.training.data import SpecialIds
    from models.training.loop import encode_pairs

    ids = SpecialIds(tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id or 0, (5, 128))
    text, image = encode_pairs(model, pairs, lookup, ids, torch.device("cpu"), None)
    scores = text @ image.T
    owner = np.asarray(pairs.caption_image)
    grp = np.arange(len(image)) // group
    t2i = np.mean([scores[c, owner[c]] >= scores[c, grp == grp[owner[c]]].max() for c in range(len(text))])
    i2t = np.mean([scores[owner == j, j].max() >= scores[grp[owner] == grp[j], j].max() for j in range(len(image))])
    return float(100 * (t2i + i2t) / 2)


def partner_share(model: Any, pairs: Any, lookup: dict, tokenizer: Any, k: int, group: int = 8) -> tuple[float, float]:
    """(share of the mined negative images that are the caption's group partners, share a random negative would
    have): how much harder than random the official mining's K draws from its top-P pool are for this model."""
    from models.training.data import SpecialIds
    from models.training.loop import encode_pairs
    from models.training.negatives import mine

    ids = SpecialIds(tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id or 0, (5, 128))
    text, image = encode_pairs(model, pairs, lookup, ids, torch.device("cpu"), None)
    owner = np.asarray(pairs.caption_image)
    grp = np.arange(len(image)) // group
    hn = mine(text, image, list(owner), k, seed=0, step=0)
    return float(np.mean(grp[hn.images] == grp[owner][:, None])), (group - 1) / (len(image) - 1)
