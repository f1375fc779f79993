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
                  group: int = 8, colour_strength: float = 1.0) -> tuple[Any, dict, list[str]]:
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
        rows = [p_obj[spec["o1"]] + colour_strength * p_col[spec["c1"]] + size_strength * p_size[spec["z"]],
                p_obj[spec["o2"]] + colour_strength * p_col[spec["c2"]], p_scene[spec["s"]], p_scene[spec["s"]], p_clutter[0],
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


def bi_encoder(seed: int = 0, std: float = 0.02) -> Any:
    """A tiny bi-encoder with BERT's initialisation (weights ~ N(0, ``std``))."""
    from models.nn.config import preset
    from models.nn.pretraining import BiEncoderForPretraining
    from models.training.initialization import bert_init_

    torch.manual_seed(seed)
    model = BiEncoderForPretraining(preset("tiny"), num_region_labels=len(CLASS_NAMES) + 1)
    bert_init_(model, std)
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
    from models.hub.formats import save_model_dir
    from models.hub.installed import record_model
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


# -- hard negatives vs in-batch negatives ---------------------------------------------------------------------
# The world of the comparison: the detail (first object's colour and size) is fainter than the coarse content
# (objects and scene) but clean (little noise), so a model that knows the coarse content ranks a caption's group
# partners near the top of the mined pool, and telling partners apart is learnable when they are contrasted.
DETAIL_WORLD = {"colour_strength": 0.5, "size_strength": 0.5, "noise": 0.1}


@dataclass
class ArmResult:
    hard_negatives: int  # K (0: in-batch negatives only)
    result: ModeResult  # recall on the held-out confusable groups before / after / chance
    within_after: float  # within-group R@1 (%) on the held-out groups after the arm


@dataclass
class Comparison:
    seed: int
    start: ModeResult  # the shared start: a fresh model trained with in-batch negatives on ordinary images
    within_before: float  # within-group R@1 (%) of the start on the held-out groups (chance 100 / 8)
    partner_share: float  # share of the start's mined negatives (K per caption) that are the caption's partners
    random_share: float  # ... that a random negative would have
    arms: list[ArmResult]


def hard_negative_comparison(tokenizer: Any, seed: int = 0, k: int = 4, conf_images: int = 2400,
                             val_images: int = 160, start_images: int = 800, start_steps: int = 1000,
                             start_lr: float = 1e-3, steps: int = 300, lr: float = 5e-4,
                             batch: int = 16) -> Comparison:
    """In-batch negatives vs ``--hard-negatives k`` (the official mining, unchanged) from ONE shared start.

    The start: a fresh tiny model (init std 0.05, which leaves BERT's 0.02 plateau sooner) trained ``start_steps``
    with in-batch negatives on ``start_images`` ordinary images (random objects, colours, scenes), so it knows the
    coarse content and some of the detail. Then both arms train on an all-confusable set of ``conf_images`` images
    in groups of 8 (same objects, scene and second colour; the first object's colour and size vary): many groups, so
    a random batch of 16 holds ~0.05 group partners per query, while the mined pool (the top 50 of the set) holds
    them near its top. Same steps, learning rate, batch, seed and schedule for both arms; the only difference is
    ``hard_negatives``. Recall on ``val_images`` held-out confusable images (other groups), overall and within
    each group. Seeds: data ``100 + seed`` (training groups), ``200 + seed`` (held-out groups), ``300 + seed``
    (start images); model init and data order ``seed``."""
    import copy

    from models.training.loop import TrainConfig

    conf, lookup, _ = learnable_set(conf_images, seed=100 + seed, confusable=conf_images, tokenizer=tokenizer,
                                    **DETAIL_WORLD)
    val, more, _ = learnable_set(val_images, seed=200 + seed, confusable=val_images, tokenizer=tokenizer,
                                 **DETAIL_WORLD)
    lookup.update(more)
    ordinary, more, _ = learnable_set(start_images, seed=300 + seed, tokenizer=tokenizer, **DETAIL_WORLD)
    lookup.update(more)
    start = bi_encoder(seed, std=0.05)
    start_result = run_mode("start (in-batch)", start, ordinary, val, lookup, tokenizer,
                            TrainConfig(batch_size=16, lr=start_lr, epochs=None, steps=start_steps, warmup=0.1,
                                        seed=seed))
    within_before = within_group_recall(start, val, lookup, tokenizer)
    share, random_share = partner_share(start, conf, lookup, tokenizer, k)
    arms = []
    for hard in (0, k):
        model = copy.deepcopy(start)
        result = run_mode("confusable " + (f"HN K={hard}" if hard else "in-batch"), model, conf, val, lookup,
                          tokenizer, TrainConfig(batch_size=batch, lr=lr, epochs=None, steps=steps, warmup=0.1,
                                                 hard_negatives=hard, seed=seed))
        arms.append(ArmResult(hard, result, within_group_recall(model, val, lookup, tokenizer)))
    return Comparison(seed, start_result, within_before, share, random_share, arms)
