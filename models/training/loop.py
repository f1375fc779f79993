"""The training loop: LightningDOT pre-training (itm/CMR + VMLM + MRFR + MRC-kl) and CMR fine-tuning.

No typer/rich here: progress goes through a callback. One run lives in one directory::

    <run_dir>/
      run.json                 model config, training config, initialisation, data summary
      tokenizer.json           the tokenizer the run uses (bundled into the final model)
      checkpoint/              latest resume state, replaced atomically:
        model.safetensors        BiEncoderForPretraining (official layout, tied aliases omitted)
        optimizer.safetensors    AdamW moments
        rng.safetensors          torch CPU/CUDA RNG states and the masking/task generator
        state.json               step, stream positions, best score, GradScaler, optimizer groups
      best.safetensors         the bi-encoder with the best mean recall on the validation pairs
      best.json                its step and recalls
      log.jsonl                one line per optimizer step (losses per task, learning rate) and per validation
      checkpoint/negatives.safetensors  the mined hard negatives in use (with --hard-negatives)

No pickle anywhere: tensors in safetensors, everything else JSON.

Optimisation (official ``get_optimizer`` / ``build_optimizer`` + ``get_schedule_linear`` / ``get_lr_sched``):
AdamW, no weight decay on biases and LayerNorm weights; learning rate warmed up linearly then decayed
linearly to 0; gradients clipped by global norm; gradient accumulation; on CUDA, bf16 autocast (or fp16
with a GradScaler); on CPU, fp32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from models.core.config import config_from_dict
from models.core.device import pick_device
from models.core.errors import ConfigError, LdotError, option, render
from models.core.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    new_dir,
    read_json_object,
    replace_file,
)
from models.core.progress import Progress, ProgressFn
from models.nn import losses
from models.nn.config import BiEncoderConfig
from models.nn.pretraining import (
    NUM_REGION_LABELS,
    TASKS,
    BiEncoderForPretraining,
    PairBatch,
    state_for_saving,
    with_tied_aliases,
)
from models.nn.regions import RegionRecord
from models.nn.tokenizer import pad_ids
from models.training.data import (
    FeatureLookup,
    FeatureValueError,
    PairSet,
    PixelRecord,
    SpecialIds,
    TrainData,
    TrainTokenizer,
    batch_indices,
    batches_per_epoch,
    check_finite,
    collate,
)
from models.training.metrics import recalls_from_vectors

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    from models.training.negatives import HardNegatives

RUN_FORMAT = "ldot-run"
RUN_VERSION = 1


class TrainingError(LdotError):
    """A run cannot start or continue as asked (the message says what to change)."""


class TrainingInterrupted(LdotError):
    """Ctrl-C during training: the state at the start of the interrupted step was saved for ``--resume``."""

    exit_code = 130


# -- configuration -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """How to train. `finetune_config` and `pretrain_config` give the official settings."""

    tasks: tuple[tuple[str, float], ...] = (("itm", 1.0),)  # (task, mix ratio), one task sampled per micro-batch
    batch_size: int = 96  # pairs per micro-batch: the in-batch negatives of CMR
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-5  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # AdamW decoupled weight decay (never on biases and LayerNorm)
    warmup: float = 0.1  # warmup: a fraction of all steps when < 1, else a number of steps
    epochs: int | None = 15  # epochs (fine-tuning; see epoch_unit) ...
    steps: int | None = None  # ... or a number of optimizer steps (pre-training); wins over epochs
    grad_clip: float = 2.0  # max global gradient norm (0: no clipping)
    precision: str = "auto"  # auto (CUDA: bf16 if supported else fp16; CPU: fp32) | fp32 | fp16 | bf16
    max_text_len: int = 60  # training drops captions with more word-pieces (validation keeps them)
    text_mask_prob: float = 0.15  # VMLM: share of word-pieces masked
    region_mask_prob: float = 0.15  # SMRM: share of regions masked
    seed: int = 42  # data order, masking, task draws, dropout
    eval_every: int | None = None  # optimizer steps between validations (None: every epoch)
    checkpoint_every: int | None = None  # optimizer steps between resume checkpoints (None: at each validation)
    schedule: str = "linear"  # decay after warm-up: linear (LightningDOT) | cosine (VLDeformer)
    # what an epoch is: "pairs" = every training caption once (LightningDOT); "images" = as many pairs as there are
    # training images (VLDeformer's epoch shows each image once with one of its captions; ldot draws that many
    # pairs from its shuffled caption order, so over the run every caption is seen as often)
    epoch_unit: str = "pairs"
    hard_negatives: int = 0  # K mined hard negatives per caption and per image (0: in-batch negatives only)
    # mine only once validation mean recall has closed this share of the gap from chance to 100, and while the
    # mined pools are not all alike; in-batch negatives until then (0: mine from the start, as the official code)
    hard_negatives_gate: float = 0.1
    distill_from: str | None = None  # cross-encoder teacher (registry name / model dir) whose scores are distilled
    distill_weight: float = 1.0  # weight of the distillation loss added to the contrastive loss
    distill_temperature: float = 1.0  # softmax temperature T of the distillation (loss scaled by T^2)
    distill_images: int = 10  # the batch's first M images are scored against all its captions by the teacher

    def __post_init__(self) -> None:
        unknown = [t for t, _ in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise TrainingError(f"unknown task(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TASKS)}")
        if any(r <= 0 for _, r in self.tasks):
            raise TrainingError("every task's mix ratio must be positive")
        if self.batch_size < 2:
            raise TrainingError(f"{option('batch_size')} must be at least 2 (CMR needs in-batch negatives)")
        if self.grad_accum < 1:
            raise TrainingError("gradient accumulation must be at least 1")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise TrainingError(f"unknown precision {self.precision!r}: auto, fp32, fp16 or bf16")
        if self.steps is None and self.epochs is None:
            raise TrainingError("give a number of epochs or of steps")
        if (self.steps is not None and self.steps < 1) or (self.steps is None and self.epochs is not None
                                                           and self.epochs < 1):
            raise TrainingError("the number of epochs/steps must be positive")
        if self.lr <= 0:
            raise TrainingError("the learning rate must be positive")
        if self.warmup < 0:
            raise TrainingError(f"{option('warmup')} cannot be negative")
        if self.epoch_unit not in ("pairs", "images"):
            raise TrainingError(f"unknown epoch unit {self.epoch_unit!r}: pairs or images")
        if self.schedule not in ("linear", "cosine"):
            raise TrainingError(f"unknown schedule {self.schedule!r}: linear or cosine")
        if self.hard_negatives < 0:
            raise TrainingError(f"{option('hard_negatives')} must be 0 or more")
        if not 0 <= self.hard_negatives_gate < 1:
            raise TrainingError(f"{option('hard_negatives_gate')} must be in [0, 1)")
        if self.hard_negatives and self.task_names != ("itm",):
            raise TrainingError(f"{option('hard_negatives')} needs the itm task alone (fine-tuning or decomposition)")
        if self.distill_from is not None and self.task_names != ("itm",):
            raise TrainingError(f"{option('distill_from')} needs the itm task alone (fine-tuning or decomposition)")
        if self.distill_temperature <= 0 or self.distill_weight < 0 or self.distill_images < 1:
            raise TrainingError(f"{option('distill_temperature')} must be positive, {option('distill_weight')} 0 or more")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise TrainingError(f"{option('save_every')} must be at least 1 step")

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.tasks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tasks"] = [list(t) for t in self.tasks]
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: object, what: str = "") -> TrainConfig:
        """From JSON (a run's saved settings): the one config policy (unknown keys and wrong shapes are a
        `ConfigError`; JSON lists become the tuples of ``tasks`` and ``betas``)."""
        return config_from_dict(cls, data, what)


FINETUNE_EPOCHS = {"flickr30k": 15, "coco": 20}
PRETRAIN_MIX = {"coco": (16, 8, 4, 4), "other": (16, 12, 6, 6)}  # itm:mlm:mrfr:mrckl (COCO; VG, CC, SBU)


def finetune_config(dataset: str = "flickr30k", **overrides: Any) -> TrainConfig:
    """LightningDOT fine-tuning: CMR, batch 96, lr 2e-5, 10% warmup, clip 2.0, AdamW (0.9, 0.999) without
    weight decay, 15 epochs on Flickr30k / 20 on COCO, best epoch by mean recall on the validation split."""
    base = TrainConfig(tasks=(("itm", 1.0),), batch_size=96, lr=2e-5, betas=(0.9, 0.999), weight_decay=0.0,
                       warmup=0.1, epochs=FINETUNE_EPOCHS.get(dataset, 15), grad_clip=2.0)
    return replace(base, **overrides)


def mix_ratios(mix: str, tasks: Sequence[str]) -> list[float]:
    """Ratios for ``tasks`` from a preset name (``coco``, ``other``: the official mixes, a task outside them gets
    1) or from comma-separated numbers, one per task."""
    if mix in PRETRAIN_MIX:
        preset = dict(zip(TASKS, PRETRAIN_MIX[mix]))
        return [float(preset.get(task, 1.0)) for task in tasks]
    try:
        ratios = [float(x) for x in mix.split(",")]
    except ValueError:
        raise ConfigError(f"mix {mix!r} is neither numbers nor a preset ({', '.join(PRETRAIN_MIX)})") from None
    if len(ratios) != len(tasks):
        raise ConfigError(f"mix {mix!r} gives {len(ratios)} ratios for {len(tasks)} tasks")
    return ratios


def pretrain_config(mix: str = "coco", **overrides: Any) -> TrainConfig:
    """LightningDOT pre-training: itm:mlm:mrfr:mrckl 16:8:4:4 (COCO) or 16:12:6:6 (VG, CC, SBU), AdamW
    (0.9, 0.98), lr 5e-5, weight decay 0.01, 300k steps, clip 5.0, validation every 10k.

    Warm-up: 10% of the steps, so it scales with the run (the official 10k steps were written for 300k steps;
    a 300-step run with a 10k warm-up never passes 3% of its peak learning rate)."""
    ratios = PRETRAIN_MIX.get(mix, PRETRAIN_MIX["coco"])
    base = TrainConfig(tasks=tuple(zip(TASKS, map(float, ratios))), batch_size=96, lr=5e-5, betas=(0.9, 0.98),
                       weight_decay=0.01, warmup=0.1, epochs=None, steps=300_000, grad_clip=5.0,
                       eval_every=10_000)
    return replace(base, **overrides)


# Decomposition recipes: the batch and the InfoNCE temperature (a model setting) differ; the rest is VLDeformer's.
# "vldeformer": its own values (6 GPUs x 300 = 1800 pairs, T 0.005), which start from VinVL's retrieval-trained
# cross-encoder. "ldot" (the default): T 0.05, batch 300, for ldot's sources, which are not retrieval-trained:
# their untrained cosines spread by ~0.035 per row, 7 units of logit noise at T 0.005 and 0.7 at 0.05; measured
# on a synthetic set (benchmarks/learn.py --modes temperatures), T 0.005 stays at chance where 0.05 learns.
DECOMPOSE_RECIPES: dict[str, dict[str, Any]] = {
    "ldot": {"batch_size": 300, "temperature": 0.05},
    "vldeformer": {"batch_size": 1800, "temperature": 0.005},
}


def decompose_config(recipe: str = "ldot", **overrides: Any) -> TrainConfig:
    """VLDeformer's decomposition: cross-modal InfoNCE (temperature in the model config: `DECOMPOSE_RECIPES`),
    AdamW lr 7.5e-6, weight decay 0.05, eps 1e-8, 200 warm-up steps then cosine to 0, grad clip 1.0, 200 of its
    epochs (as many pairs as training images each); batch 300 (``ldot``) or 1800 (``vldeformer``)."""
    if recipe not in DECOMPOSE_RECIPES:
        raise TrainingError(f"unknown recipe {recipe!r}: {' or '.join(DECOMPOSE_RECIPES)}")
    base = TrainConfig(tasks=(("itm", 1.0),), batch_size=DECOMPOSE_RECIPES[recipe]["batch_size"], lr=7.5e-6,
                       betas=(0.9, 0.999), adam_eps=1e-8, weight_decay=0.05, warmup=200, epochs=200, grad_clip=1.0,
                       schedule="cosine", epoch_unit="images")
    return replace(base, **overrides)


# -- schedule and optimizer ----------------------------------------------------------------------------
def warmup_steps(config: TrainConfig, total: int) -> int:
    return int(config.warmup * total) if config.warmup < 1 else int(config.warmup)


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str = "linear") -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``base_lr``, then linear decay to 0
    at ``total`` (the official ``warmup_linear`` evaluated at step + 1), or cosine decay to 0 (VLDeformer's
    ``get_cosine_schedule_with_warmup``)."""
    s = step + 1
    if s < warmup:
        return base_lr * s / warmup
    progress = (s - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
    return base_lr * max(0.0, (total - s) / max(1, total - warmup))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: decayed weights; biases and LayerNorm parameters without decay."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, param in model.named_parameters():  # tied parameters appear once
        if not param.requires_grad:
            continue
        (plain if id(param) in no_decay or name.endswith("bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.adam_eps)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed)."""
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, False
    if precision == "fp16":
        if device.type != "cuda":
            raise TrainingError(f"fp16 training needs a CUDA device (use {option('precision')} fp32 or bf16 on CPU)")
        return torch.float16, True
    return torch.bfloat16, False


# -- progress --------------------------------------------------------------------------------------------
# The loop reports through `models.core.progress` with stage "train" and unit "steps": ``done`` = optimizer steps
# done, ``total`` = steps of the run; ``event`` is start | step | eval | checkpoint | done; ``info`` holds epoch
# (passes over the training pairs so far), loss (mean of the step's micro-batches), task_losses (running mean per
# task), lr, metrics (eval: recalls; done: the best) and message.
def _report(progress: ProgressFn, event: str, step: int, total: int, epoch: float, **info: Any) -> None:
    progress(Progress("train", step, total, "steps", event, {"epoch": epoch, **info}))


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    total: int
    finished: bool  # False when stopped early by ``stop_at_step``
    best: dict[str, Any] | None  # best validation record (step, mean_recall, recalls)
    seconds: float


# -- evaluation ------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_pairs(model: Any, pairs: PairSet, features: FeatureLookup, ids: SpecialIds,
                 device: torch.device, autocast: torch.dtype | None,
                 batch_size: int = 64, progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(caption vectors (n_txt, D), image vectors (n_img, D)) of a pair set, in eval mode.

    ``model``: a `BiEncoderForPretraining` or a `DecomposedEncoder` (``text_vectors`` / ``record_vectors``)."""
    from models.core.progress import report

    was_training = model.training
    model.eval()
    max_pos = _max_text_positions(model)
    text_out, image_out = [], []
    try:
        with _autocast(device, autocast):
            for start in range(0, len(pairs), batch_size):
                rows = [[ids.cls, *pairs.token_ids[i][: max_pos - 2], ids.sep]
                        for i in range(start, min(start + batch_size, len(pairs)))]
                input_ids, mask = pad_ids(rows, ids.pad)
                vec = model.text_vectors(input_ids.to(device), mask.to(device))
                text_out.append(vec.float().cpu().numpy())
                report(progress, "encoding captions", start + len(rows), len(pairs), "captions")
            n_img = len(pairs.image_keys)
            for start in range(0, n_img, batch_size):
                keys = pairs.image_keys[start:start + batch_size]
                records = [features[k] for k in keys]
                check_finite(records, keys)
                image_out.append(model.record_vectors(records).float().cpu().numpy())
                report(progress, "encoding images", start + len(records), n_img, "images")
    finally:
        model.train(was_training)
    return np.concatenate(text_out), np.concatenate(image_out)


def _max_text_positions(model: Any) -> int:
    if hasattr(model, "max_text_positions"):  # a decomposed ViLT: its fixed text length
        return int(model.max_text_positions)
    config = model.config
    return config.text.max_position_embeddings if hasattr(config, "text") else config.body.max_position_embeddings


def evaluate(model: Any, pairs: PairSet, features: FeatureLookup, ids: SpecialIds,
             device: torch.device, autocast: torch.dtype | None = None,
             vectors: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Recalls of the bi-encoder on a pair set, and their mean (the official model-selection score).
    ``vectors``, when given, receives the ``text`` and ``image`` vectors (for the score calibration)."""
    text, image = encode_pairs(model, pairs, features, ids, device, autocast)
    if vectors is not None:
        vectors.update(text=text, image=image)
    recalls = recalls_from_vectors(text, image, pairs.caption_image)
    return {"mean_recall": recalls.rsum / 6, **recalls.to_dict()}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


# -- checkpoints -----------------------------------------------------------------------------------------
CHECKPOINT = "checkpoint"
LOG_FILE = "log.jsonl"  # one JSON line per optimizer step (event "step") and per validation (event "eval")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW state -> (tensors ``state.<param>.<name>``, JSON: param groups and non-tensor state)."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value
            else:
                plain[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["plain"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The resume checkpoint of a run (or its previous copy, if a swap was interrupted)."""
    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
        path = Path(run_dir) / name
        if (path / "state.json").is_file():
            return path
    return None


def _check_shapes(model: BiEncoderForPretraining, record: RegionRecord | PixelRecord,
                  soft_labels: bool) -> None:
    """Fail before the first step when the features do not fit the model."""
    pixels = getattr(model, "inputs", "regions") == "pixels"
    if pixels != isinstance(record, PixelRecord):
        raise TrainingError("this model reads pixels and the training images are region features" if pixels else
                            "this model reads region features and the training images are pixels")
    if isinstance(record, PixelRecord):
        return
    dim = np.asarray(record.features).shape[-1]
    if dim != model.config.img_dim:
        raise TrainingError(f"the region features have {dim} dims but the model expects {model.config.img_dim}")
    if soft_labels:
        soft = getattr(record, "soft_labels", None)
        if soft is None:
            raise TrainingError("the mrckl task needs soft labels, and the image features have none (use an "
                                "image DB written with soft labels, or drop mrckl from the tasks)")
        if np.asarray(soft).shape[-1] != model.num_region_labels:
            raise TrainingError(f"the soft labels have {np.asarray(soft).shape[-1]} classes but the region "
                                f"classifier predicts {model.num_region_labels}")


def distill_student(text: torch.Tensor, image: torch.Tensor, m: int, scale: float = 1.0) -> torch.Tensor:
    """The student scores the official distillation compares with the teacher (train_itm.py): rows 0..M-1 of
    ``0.5 * (S_img->txt + S_txt->img)``, where ``S_img->txt = image @ text.T`` (the image->text loss's scores)
    and ``S_txt->img = text @ image.T`` (the text->image loss's); entry (i, j) is
    ``0.5 * (image_i . text_j + text_i . image_j)``: image i against caption j, averaged with caption i against
    image j. ``text[i]`` and ``image[i]`` are pair i of the batch (B x D each). ``scale``: the model's logit
    scale (1 for LightningDOT's raw dot products, 1 / temperature for a decomposed model's cosines)."""
    text, image = text.float(), image.float()
    both = 0.5 * (image[:m] @ text.T + text[:m] @ image.T)  # (M, B)
    return both * scale


def hard_negative_gate(mean_recall: float, val: PairSet, gate: float) -> tuple[bool, float, float]:
    """(whether to mine, chance mean recall, the mean recall mining needs) on the validation pairs ``val``:
    mining waits until the mean recall has closed ``gate`` of the gap from chance to 100."""
    from models.training.metrics import chance_recalls

    chance = chance_recalls(val.caption_image, len(val.image_keys)).rsum / 6
    needed = chance + gate * (100.0 - chance)
    return mean_recall >= needed, chance, needed


# -- the loop --------------------------------------------------------------------------------------------
class _Trainer:
    def __init__(self, run_dir: Path, model: Any, tokenizer: TrainTokenizer, data: TrainData,
                 config: TrainConfig, device: torch.device, progress: ProgressFn | None,
                 teacher: Any = None) -> None:
        self.run_dir = run_dir
        self.config = config
        self.device = device
        self.autocast, use_scaler = resolve_precision(config.precision, device)
        self.model = model.to(device)
        self.model.train()
        self.tokenizer = tokenizer
        if getattr(model, "kind", "bi-encoder") == "decomposed":
            model._tokenizer = tokenizer  # the tags are word-pieces of this tokenizer
        self.tags = bool(getattr(model.config, "tags", ()))
        if config.distill_from is not None and teacher is None:
            raise TrainingError(f"distillation from {config.distill_from!r} needs its teacher model loaded")
        self.teacher = teacher
        if teacher is not None and getattr(teacher, "inputs", "regions") != "pixels" \
                and getattr(model, "inputs", "regions") == "pixels":
            raise TrainingError(f"{config.distill_from!r} scores region features and this model's batches hold "
                                "pixels: distil a cross-encoder that reads pixels (vilt-flickr30k, vilt-coco)")
        self.negatives: HardNegatives | None = None  # when mining
        self.last_val: dict[str, Any] | None = None  # the latest validation record (the hard-negative gate reads it)
        self.ids = SpecialIds.of(tokenizer) if "mlm" in config.task_names else SpecialIds(
            tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id or 0, (0, 1))
        self.train_pairs = data.train.drop_long(config.max_text_len)
        if len(self.train_pairs) < 2:
            raise TrainingError(f"only {len(self.train_pairs)} training pair(s) of at most {config.max_text_len} "
                                "word-pieces: CMR needs at least 2")
        self.features = data.features
        self.data_description = data.description
        self.val = data.val
        _check_shapes(model, self.features[self.train_pairs.image_keys[0]], "mrckl" in config.task_names)
        self.progress = progress or (lambda p: None)
        self.optimizer = build_optimizer(self.model, config)
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        epoch_pairs = (len(self.train_pairs) if config.epoch_unit == "pairs"
                       else len(set(self.train_pairs.caption_image)))
        self.per_epoch = batches_per_epoch(epoch_pairs, config.batch_size)
        steps_per_epoch = max(1, self.per_epoch // config.grad_accum)
        self.total = config.steps if config.steps is not None else steps_per_epoch * int(config.epochs or 1)
        self.steps_per_epoch = steps_per_epoch
        self.warmup = warmup_steps(config, self.total)
        if self.warmup > self.total:
            import warnings

            from models.core.errors import LdotWarning

            warnings.warn(LdotWarning(f"the warm-up ({self.warmup} steps) is longer than the run ({self.total} "
                                      f"steps): the learning rate never reaches its peak; pass a smaller {option('warmup')} "
                                      "(a fraction such as 0.1 scales with the run)"), stacklevel=3)
        self.eval_every = config.eval_every or steps_per_epoch
        self.checkpoint_every = config.checkpoint_every or self.eval_every
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.positions = {t: 0 for t in config.task_names}  # micro-batches drawn per task stream
        self.best: dict[str, Any] | None = None
        self.running: dict[str, float] = {}
        self.step_tasks: dict[str, list[float]] = {}
        self.ratios = torch.tensor([r for _, r in config.tasks], dtype=torch.float64)
        self.updating = False
        self.prefetch = True  # read the next batch of each task in a background thread
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[tuple[str, int], Future[PairBatch]] = {}

    # -- one micro-batch ---------------------------------------------------------------------------
    def _next_task(self) -> str:
        if len(self.ratios) == 1:
            return self.config.tasks[0][0]
        return self.config.tasks[int(torch.multinomial(self.ratios, 1, generator=self.generator))][0]

    def _load(self, task: str, position: int) -> PairBatch:
        """The ``position``-th batch of a task's stream (a pure function: safe to compute ahead)."""
        stream = self.config.task_names.index(task)
        idx = batch_indices(len(self.train_pairs), self.config.batch_size, self.config.seed, position, stream)
        max_pos = _max_text_positions(self.model)
        batch = collate(self.train_pairs, idx, self.features, self.ids, max_pos, soft_labels=task == "mrckl",
                        object_ids=self.tags)
        if self.negatives is not None and task == "itm":
            from models.training.data import collate_negatives

            captions, images = self.negatives.for_batch(idx, self.train_pairs.caption_image)
            batch.negatives = collate_negatives(self.train_pairs, captions, images, self.features, self.ids, max_pos,
                                                object_ids=self.tags)
        return batch.pin_memory() if self.device.type == "cuda" else batch

    def _next_batch(self, task: str) -> PairBatch:
        """Take the task's next batch, and have a background thread read the one after it (features come
        from LMDB; reading them while the model computes keeps the accelerator busy)."""
        position = self.positions[task]
        future = self._pending.pop((task, position), None)
        try:
            batch = future.result() if future is not None else self._load(task, position)
        except FeatureValueError as exc:
            where = f" (images: {self.data_description})" if self.data_description else ""
            raise FeatureValueError(f"{exc.args[0]}{where}") from None
        self.positions[task] = position + 1
        if self.prefetch:
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ldot-batches")
            self._pending[(task, position + 1)] = self._executor.submit(self._load, task, position + 1)
        return batch

    def _stop_prefetch(self) -> None:
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _task_loss(self, task: str, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        if task == "itm":
            return self._retrieval_loss(batch.to(self.device))
        if task == "mlm":
            maskable = batch.text_mask.clone()
            maskable[:, 0] = False
            lengths = batch.text_mask.sum(dim=1)
            maskable[torch.arange(len(batch)), lengths - 1] = False  # [SEP]
            masked_ids, labels = losses.mask_tokens(batch.input_ids, maskable, self.ids.mask, self.ids.vocab_range,
                                                    self.generator, cfg.text_mask_prob)
            return self.model.mlm(batch.to(self.device), masked_ids.to(self.device), labels.to(self.device))
        masked = losses.mask_regions(batch.region_mask, self.generator, cfg.region_mask_prob)
        if task == "mrfr":
            return self.model.mrfr(batch.to(self.device), masked.to(self.device))
        return self.model.mrc(batch.to(self.device), masked.to(self.device))

    def _retrieval_loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The contrastive loss (CMR or InfoNCE, with hard negatives when mined) + the distillation loss."""
        if batch.negatives is None and self.teacher is None:
            return self.model.itm(batch)
        text, image = self.model.pair_vectors(batch)
        neg_text = neg_image = None
        if batch.negatives is not None:
            neg_text, neg_image = self.model.pair_vectors(batch.negatives)
        loss = self.model.retrieval_loss(text, image, batch, neg_text, neg_image)
        info: dict[str, float] = {}
        if self.teacher is not None and self.config.distill_weight > 0:
            kd = self._distill(batch, text, image)
            info["distill"] = float(kd.detach())
            loss = loss + self.config.distill_weight * kd
        return loss, info

    def _distill(self, batch: PairBatch, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) over captions for the batch's first M images (the official form:
        `distill_student`)."""
        m, b = min(self.config.distill_images, len(batch)), len(batch)
        student = distill_student(text, image, m, self.model.logit_scale)  # (M, B)
        texts = self._caption_texts(batch)
        rows = [j for _ in range(m) for j in range(b)]
        owners = [i for i in range(m) for _ in range(b)]
        with torch.no_grad():
            if getattr(self.teacher, "inputs", "regions") == "pixels":  # it reads the images' files by key
                keys = [self.train_pairs.image_keys[int(batch.image_ids[i])] for i in owners]
                scores = self.teacher.score_keys([texts[j] for j in rows], keys)
            else:
                scores = self.teacher.score([texts[j] for j in rows], batch.features[owners].cpu(),
                                            batch.norm_bb[owners].cpu(), batch.region_mask[owners].cpu())
        teacher = scores.clone().float().reshape(m, b).to(student.device)  # out of inference mode
        return losses.distill_loss(student, teacher, self.config.distill_temperature)

    def _caption_texts(self, batch: PairBatch) -> list[str]:
        """The batch's captions as text, for a teacher that tokenizes with its own tokenizer."""
        rows = [ids[mask].tolist() for ids, mask in zip(batch.input_ids.cpu(), batch.text_mask.cpu())]
        return self.tokenizer.backend.decode_batch(rows, skip_special_tokens=True)

    # -- hard negatives -------------------------------------------------------------------------------------
    def mine(self) -> None:
        """Mine hard negatives with the current model, unless the gate keeps in-batch negatives for now: the
        model's validation recall has not cleared chance by the gate, or its mined pools are all alike (it ranks
        every caption's images the same way). Either is said (a note, and a ``negatives`` line in the log)."""
        from models.training.negatives import STALLED, mine

        cfg = self.config
        self._stop_prefetch()  # batches read ahead hold the old negatives
        gate = cfg.hard_negatives_gate
        if gate > 0 and self.val is not None and len(self.val):
            record = self.last_val
            if record is None or record["step"] != self.step:  # before epoch 0, or no validation this epoch
                record = {"step": self.step, **evaluate(self.model, self.val, self.features, self.ids, self.device,
                                                        self.autocast)}
            ready, chance, needed = hard_negative_gate(record["mean_recall"], self.val, gate)
            if not ready:
                self.negatives = None
                self._negatives_note(False, f"validation mean recall {record['mean_recall']:.1f} is within the gate "
                                     f"of chance ({chance:.1f}; mining needs {needed:.1f}): in-batch negatives "
                                     f"until it clears it ({option('hard_negatives_gate')} 0 mines anyway)",
                                     mean_recall=record["mean_recall"], chance=chance, needed=needed)
                return
        text, image = encode_pairs(self.model, self.train_pairs, self.features, self.ids, self.device,
                                   self.autocast, progress=self.stage_progress)
        mined = mine(text, image, self.train_pairs.caption_image, cfg.hard_negatives, cfg.seed, self.step,
                     self.device.type == "cuda", self.stage_progress)
        if mined.concentration >= STALLED:
            what = (f"the mined pools are nearly the same images for every caption (concentration "
                    f"{mined.concentration:.2f}; 0 = spread, 1 = identical): the model ranks near chance, and such "
                    "negatives are no harder than random ones")
            if gate > 0:
                self.negatives = None
                self._negatives_note(False, what + "; in-batch negatives until the pools spread",
                                     concentration=mined.concentration)
                return
            self._negatives_note(True, what + f"; mining anyway ({option('hard_negatives_gate')} 0)",
                                 concentration=mined.concentration)
        else:
            self._log({"event": "negatives", "step": self.step, "mined": True,
                       "concentration": round(mined.concentration, 4)})
        self.negatives = mined

    def _negatives_note(self, mined: bool, message: str, **figures: float) -> None:
        self._log({"event": "negatives", "step": self.step, "mined": mined,
                   **{k: round(v, 4) for k, v in figures.items()}, "message": render(message)})
        _report(self.progress, "note", self.step, self.total, self.epoch, message="hard negatives: " + message)

    def stage_progress(self, p: Progress) -> None:
        self.progress(p)

    # -- one optimizer step -----------------------------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        """What a step consumes besides the weights (restored if the step is interrupted)."""
        snap = {"positions": dict(self.positions), "generator": self.generator.get_state(),
                "torch_cpu": torch.get_rng_state(), "running": dict(self.running)}
        if self.device.type == "cuda":
            snap["cuda"] = torch.cuda.get_rng_state_all()
        return snap

    def _restore(self, snap: dict[str, Any]) -> None:
        self._stop_prefetch()
        self.positions, self.running = snap["positions"], snap["running"]
        self.generator.set_state(snap["generator"])
        torch.set_rng_state(snap["torch_cpu"])
        if "cuda" in snap:
            torch.cuda.set_rng_state_all(snap["cuda"])
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self) -> tuple[float, float]:
        cfg = self.config
        total_loss = 0.0
        for _ in range(cfg.grad_accum):
            task = self._next_task()
            batch = self._next_batch(task)
            with _autocast(self.device, self.autocast):
                loss, info = self._task_loss(task, batch)
            scaled = loss / cfg.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            value = float(loss.detach())
            if not math.isfinite(value) and self.scaler is None:  # the inputs were checked finite (check_finite)
                raise TrainingError(f"the {task} loss became {value} at step {self.step + 1} (its inputs are finite): "
                                    f"lower {option('lr')}, or use {option('precision')} fp32")
            total_loss += value / cfg.grad_accum
            self.running[task] = value if task not in self.running else 0.98 * self.running[task] + 0.02 * value
            self.step_tasks.setdefault(task, []).append(value)
            for name, extra in info.items():
                if name == "distill":
                    self.step_tasks.setdefault(name, []).append(extra)
        lr = lr_at(self.step, cfg.lr, self.warmup, self.total, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.updating = True  # from here on the weights change: an interrupt cannot be undone
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.updating = False
        return total_loss, lr

    # -- validation and best model --------------------------------------------------------------------------
    def validate(self) -> dict[str, Any] | None:
        if self.val is None or len(self.val) == 0:
            return None
        vectors: dict[str, np.ndarray] = {}
        metrics = evaluate(self.model, self.val, self.features, self.ids, self.device, self.autocast, vectors)
        record = {"step": self.step, "epoch": round(self.epoch, 3), **metrics}
        self.last_val = record
        self._log({"event": "eval", **record})
        if self.best is None or metrics["mean_recall"] > self.best["mean_recall"]:
            self.best = record
            from safetensors.torch import save_file

            tmp = self.run_dir / f".best.tmp-{os.getpid()}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in self.model.export_state().items()}, str(tmp))
            replace_file(tmp, self.run_dir / "best.safetensors")
            atomic_write_json(self.run_dir / "best.json", record, indent=2)
            self._calibrate(vectors, self.val.caption_image,
                            f"validation pairs of training run {self.run_dir.name}, step {self.step}")
        return record

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / LOG_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _log_step(self, loss: float, lr: float) -> None:
        tasks = {t: sum(v) / len(v) for t, v in self.step_tasks.items()}
        self.step_tasks = {}
        self._log({"event": "step", "step": self.step, "epoch": round(self.epoch, 4), "loss": loss, "lr": lr,
                   "tasks": tasks})

    def _truncate_log(self) -> None:
        """Drop log lines past the checkpoint's step (a resumed run writes them again)."""
        path = self.run_dir / LOG_FILE
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    def _calibrate(self, vectors: dict[str, np.ndarray], caption_image: list[int], source: str) -> None:
        """The best model's score distributions on the validation pairs (`--min-score auto` reads them)."""
        from models.training.calibration import (
            CalibrationError,
            calibrate,
            save_calibration,
        )

        try:
            save_calibration(self.run_dir, calibrate(vectors["text"], vectors["image"], caption_image,
                                                     source))
        except CalibrationError:
            pass  # one validation image: no non-matching pairs to learn a level from

    @property
    def epoch(self) -> float:
        micro = sum(self.positions.values())
        return micro / self.per_epoch

    # -- checkpoint / resume ----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        opt_tensors, opt_meta = _optimizer_to_flat(self.optimizer)
        rng = {"torch_cpu": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda_{i}"] = cuda_state
        state = {"format": RUN_FORMAT, "format_version": RUN_VERSION, "step": self.step, "total": self.total,
                 "positions": self.positions, "best": self.best, "last_val": self.last_val, "running": self.running,
                 "scaler": self.scaler.state_dict() if self.scaler else None, "optimizer": opt_meta,
                 "config": self.config.to_dict(), "train_pairs": len(self.train_pairs)}

        def write(tmp: Path) -> None:
            _save_tensors(tmp / "model.safetensors", state_for_saving(self.model))
            if self.negatives is not None:
                _save_tensors(tmp / "negatives.safetensors", self.negatives.tensors())
            _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
            _save_tensors(tmp / "rng.safetensors", rng)
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")

        with new_dir(self.run_dir / CHECKPOINT) as tmp:
            write(tmp)
        _report(self.progress, "checkpoint", self.step, self.total, self.epoch, message=str(self.run_dir / CHECKPOINT))

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        if state.get("format") != RUN_FORMAT or state.get("format_version", 99) > RUN_VERSION:
            raise TrainingError(f"{path} is not a checkpoint this ldot can resume (format {state.get('format')!r}, "
                                f"version {state.get('format_version')})")
        saved = TrainConfig.from_dict(state["config"])
        if saved != self.config or state["train_pairs"] != len(self.train_pairs):
            diff = [f"{f.name} {getattr(saved, f.name)!r} -> {getattr(self.config, f.name)!r}"
                    for f in fields(TrainConfig) if getattr(saved, f.name) != getattr(self.config, f.name)]
            if state["train_pairs"] != len(self.train_pairs):
                diff.append(f"training pairs {state['train_pairs']} -> {len(self.train_pairs)}")
            raise TrainingError(f"cannot resume {self.run_dir.name}: it was started with other settings ("
                                + "; ".join(diff) + "); pass the same options and data, or start a new run")
        model_state = with_tied_aliases(_load_tensors(path / "model.safetensors"))
        self.model.load_state_dict({k: v.to(self.device) for k, v in model_state.items()})
        self.optimizer.load_state_dict(_optimizer_from_flat(_load_tensors(path / "optimizer.safetensors"),
                                                            state["optimizer"]))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rng = _load_tensors(path / "rng.safetensors")
        torch.set_rng_state(rng["torch_cpu"])
        self.generator.set_state(rng["generator"])
        if self.device.type == "cuda":
            cuda_states = [rng[k] for k in sorted(rng) if k.startswith("cuda_")]
            if cuda_states:
                torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
        self.step = state["step"]
        self.positions = {k: int(v) for k, v in state["positions"].items()}
        self.best = state["best"]
        self.last_val = state.get("last_val")
        self.running = state.get("running", {})
        if (path / "negatives.safetensors").is_file():
            from models.training.negatives import HardNegatives

            self.negatives = HardNegatives.from_tensors(_load_tensors(path / "negatives.safetensors"))
        self._truncate_log()

    # -- run -----------------------------------------------------------------------------------------
    def run(self, stop_at_step: int | None) -> TrainResult:
        try:
            return self._run(stop_at_step)
        finally:
            self._stop_prefetch()

    def _run(self, stop_at_step: int | None) -> TrainResult:
        started = time.monotonic()
        if self.step == 0:
            torch.manual_seed(self.config.seed)  # dropout; a resumed run restores the RNG state instead
            if self.config.hard_negatives:
                self.mine()  # before epoch 0, with the initial model
        lr = lr_at(self.step, self.config.lr, self.warmup, self.total, self.config.schedule)
        _report(self.progress, "start", self.step, self.total, self.epoch, lr=lr)
        while self.step < self.total:
            snapshot = self._snapshot()
            try:
                loss, lr = self.train_step()
            except KeyboardInterrupt:
                if self.updating:
                    raise
                self._restore(snapshot)
                self.save_checkpoint()
                raise TrainingInterrupted(f"interrupted at step {self.step} of {self.total}; the run is saved in "
                                          f"{self.run_dir}: continue it with {option('resume')}") from None
            self._log_step(loss, lr)
            _report(self.progress, "step", self.step, self.total, self.epoch, loss=loss, task_losses=dict(self.running),
                    lr=lr)
            if self.step % self.eval_every == 0 or self.step == self.total:
                record = self.validate()
                if record is not None:
                    _report(self.progress, "eval", self.step, self.total, self.epoch, metrics=record)
            if self.config.hard_negatives and self.step % self.steps_per_epoch == 0 and self.step < self.total:
                self.mine()  # after each epoch's validation, with the current model
            stopping = stop_at_step is not None and self.step >= stop_at_step and self.step < self.total
            if self.step % self.checkpoint_every == 0 or self.step == self.total or stopping:
                self.save_checkpoint()
            if stopping:
                return TrainResult(self.run_dir, self.step, self.total, False, self.best, time.monotonic() - started)
        _report(self.progress, "done", self.step, self.total, self.epoch, metrics=self.best)
        return TrainResult(self.run_dir, self.step, self.total, True, self.best, time.monotonic() - started)


def train(run_dir: str | Path, data: TrainData, config: TrainConfig, model: nn.Module | None = None,
          tokenizer: TrainTokenizer | None = None, *, resume: bool = False, device: str | torch.device | None = "auto",
          init: dict[str, Any] | None = None, progress: ProgressFn | None = None,
          stop_at_step: int | None = None, teacher: Any = None) -> TrainResult:
    """Train in ``run_dir``: a new run (``model`` and ``tokenizer`` given) or, with ``resume``, continue the
    run's checkpoint (the model and tokenizer are rebuilt from the run directory).

    ``stop_at_step``: stop (after writing a checkpoint) once that many optimizer steps are done, e.g. to
    train in time-boxed pieces; `train(..., resume=True)` continues. Returns where the run stands.

    ``model``: a `BiEncoderForPretraining` or a `DecomposedEncoder` (``ldot train decompose``). ``teacher``: a
    cross-encoder scorer (`models.hub.load.load_reranker`) when ``config.distill_from`` is set.
    """
    run_dir = Path(run_dir)
    device = pick_device(device)
    with run_lock(run_dir):
        remove_stale_temps(run_dir)
        return _train_locked(run_dir, data, config, model, tokenizer, resume, device, init, progress, stop_at_step,
                             teacher)


RUN_LOCK = ".lock"  # held (flock) by the process training a run: a second one is refused, leftovers are stale
_STALE_TEMPS = (f".{CHECKPOINT}.*.tmp", ".best.tmp-*.safetensors")  # what a killed checkpoint/best write leaves


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold a run's lock while it trains (released by the OS when the process dies, even by kill -9)."""
    from filelock import FileLock, Timeout

    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / RUN_LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise TrainingError(f"run {run_dir} is being trained by another process: wait for it (or stop it)") from None
    try:
        yield
    finally:
        lock.release()
        if created and not (run_dir / "run.json").exists():  # refused before it started: leave no folder
            (run_dir / RUN_LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete the temp folders/files a killed checkpoint or best-model write left in ``run_dir`` (call with the
    run's lock held: then no live process owns them). Returns what was removed."""
    import shutil

    removed = []
    for pattern in _STALE_TEMPS:
        for path in run_dir.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _train_locked(run_dir: Path, data: TrainData, config: TrainConfig, model: Any, tokenizer: TrainTokenizer | None,
                  resume: bool, device: torch.device, init: dict[str, Any] | None, progress: ProgressFn | None,
                  stop_at_step: int | None, teacher: Any) -> TrainResult:
    ckpt = checkpoint_dir(run_dir)
    if resume:
        if ckpt is None:
            raise TrainingError(f"nothing to resume: {run_dir} holds no checkpoint (start the run without "
                                f"{option('resume')})")
        model, tokenizer = _rebuild(run_dir)
    else:
        if ckpt is not None or (run_dir / "run.json").exists():
            raise TrainingError(f"a run already exists in {run_dir}: pass {option('resume')} to continue it, or "
                                f"{option('force')} to "
                                "start it over")
        if model is None or tokenizer is None:
            raise TrainingError("a new run needs a model and a tokenizer")
    trainer = _Trainer(run_dir, model, tokenizer, data, config, device, progress, teacher)  # validates first
    if resume:
        assert ckpt is not None
        trainer.load_checkpoint(ckpt)
    else:
        _start_run(run_dir, model, tokenizer, config, data, init)
    return trainer.run(stop_at_step)


def _start_run(run_dir: Path, model: BiEncoderForPretraining, tokenizer: TrainTokenizer, config: TrainConfig,
               data: TrainData, init: dict[str, Any] | None) -> None:
    from models.core.version import __version__

    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir)
    info = {"format": RUN_FORMAT, "format_version": RUN_VERSION, "ldot_version": __version__,
            "model_kind": getattr(model, "kind", "bi-encoder"),
            "model_config": model.config.to_dict(), "num_region_labels": model.num_region_labels,
            "train_config": config.to_dict(), "init": init or {}, "data": data.description,
            "train_pairs": len(data.train), "val_pairs": len(data.val) if data.val is not None else 0,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(run_dir / "run.json", info, indent=2)


def read_run(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    info = read_json_object(path, TrainingError, f"{run_dir} is not a training run (no run.json)")
    version = info.get("format_version")
    if info.get("format") != RUN_FORMAT or not isinstance(version, int) or version > RUN_VERSION:
        raise TrainingError(f"{path} was written by another ldot (run format {version!r})")
    return info


def _rebuild(run_dir: Path) -> tuple[nn.Module, TrainTokenizer]:
    from models.nn.tokenizer import Tokenizer

    info = read_run(run_dir)
    if info.get("model_kind") == "decomposed-vilt":
        from models.nn.vilt import ViltDecomposedConfig, ViltDecomposedEncoder

        tokenizer = Tokenizer.from_path(run_dir / "tokenizer.json")
        return ViltDecomposedEncoder(ViltDecomposedConfig.from_dict(info["model_config"]), tokenizer), tokenizer
    if info.get("model_kind") == "dual-encoder":
        from models.training import dual

        return dual.rebuild(run_dir, info["model_config"])
    if info.get("model_kind") == "decomposed":
        from models.nn.config import DecomposedConfig
        from models.nn.decomposed import DecomposedEncoder

        tokenizer = Tokenizer.from_path(run_dir / "tokenizer.json")
        return DecomposedEncoder(DecomposedConfig.from_dict(info["model_config"]), tokenizer), tokenizer
    config = BiEncoderConfig.from_dict(info["model_config"])
    model = BiEncoderForPretraining(config, info.get("num_region_labels", NUM_REGION_LABELS))
    return model, Tokenizer.from_path(run_dir / "tokenizer.json")


# -- the trained model ---------------------------------------------------------------------------------
def export_model(run_dir: str | Path, name: str, force: bool = False) -> Path:
    """Install a run's model in the cache as ``<home>/models/<name>`` (kind ``bi-encoder``, tokenizer bundled,
    manifest ``origin: train``): the best validated weights, else the last checkpoint's.

    Pre-training runs also keep their heads (``heads.safetensors``, official key names) when the exported
    weights are the last checkpoint's, so a later ``--init NAME`` continues pre-training with them.
    """
    from models.core.home import models_dir
    from models.hub.catalogue import find_entry
    from models.hub.formats import save_model_dir
    from models.hub.installed import check_name, record_model
    from models.nn.tokenizer import Tokenizer
    from models.training.initialization import HEADS_FILE

    run_dir = Path(run_dir)
    check_name(name)
    if find_entry(name) is not None:
        raise TrainingError(f"{name!r} is a registry name (`ldot models list`): choose another {option('out')}")
    target = models_dir() / name
    if target.exists() and not force:
        raise TrainingError(f"a model named {name!r} already exists: pass {option('force')} to replace it, or choose "
                            "another "
                            f"{option('out')}")
    info = read_run(run_dir)
    ckpt = checkpoint_dir(run_dir)
    if ckpt is None:
        raise TrainingError(f"{run_dir} has no trained weights yet")
    full = _load_tensors(ckpt / "model.safetensors")
    step = json.loads((ckpt / "state.json").read_text())["step"]
    best = json.loads((run_dir / "best.json").read_text()) if (run_dir / "best.json").is_file() else None
    kind = info.get("model_kind", "bi-encoder")
    if best is not None and best["step"] != step:
        state = _load_tensors(run_dir / "best.safetensors")
    elif kind in ("decomposed", "decomposed-vilt", "dual-encoder"):
        state = full
    else:
        state = {k[len("bert."):]: v for k, v in full.items() if k.startswith("bert.")}
    source = {"origin": "train", "run": str(run_dir), "init": info.get("init", {}), "data": info.get("data", ""),
              "train_config": info["train_config"], "steps": step, "best": best}
    config = info["model_config"]
    if kind == "dual-encoder":  # a `save_pretrained` folder, as the hub's and `ldot models import`'s
        from models.core.fileio import new_dir
        from models.training import dual

        with new_dir(target) as tmp:
            dual.export(run_dir, tmp, state, config)
            (tmp / "ldot-train.json").write_text(json.dumps(source, indent=2) + "\n")
    else:
        tokenizer = Tokenizer.from_path(run_dir / "tokenizer.json")
        save_model_dir(target, kind, config, state, source=source, tokenizer=tokenizer)
    tasks = [t for t, _ in info["train_config"]["tasks"]]
    if kind == "bi-encoder" and tasks != ["itm"] and (best is None or best["step"] == step):  # these weights' heads
        heads = {k: v for k, v in full.items() if not k.startswith("bert.")}
        _save_tensors(target / HEADS_FILE, heads)
    from models.training.calibration import CALIBRATION_FILE

    calibration = run_dir / CALIBRATION_FILE
    if best is not None and calibration.is_file():  # it describes the best weights, the ones exported
        atomic_write_bytes(target / CALIBRATION_FILE, calibration.read_bytes())
    record_model(target, name, kind, "train", trained_from=str(run_dir), best=best)
    return target
