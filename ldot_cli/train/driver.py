"""`ldot train` behind one call: initial weights + tokenizer, data, training, and the model installed in the cache.

The loop itself is `models.training.loop`; this module only decides what to train from and where things go.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ldot_cli.data.train_sources import DataSpec, open_training_data
from models.core.errors import LdotError, option


@dataclass
class TrainRequest:
    """One `ldot train finetune|pretrain` invocation."""

    mode: str  # finetune | pretrain
    out: str  # name of the run and of the model installed in the cache
    data: DataSpec
    init: str | None = None  # bi-encoder or BERT to start from; None: lightningdot if present, else bert-base-cased
    image_init: str | None = None  # image tower when init is a BERT: uniter-base (default when present) or a BERT
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields the user set
    mix: str = "coco"  # pre-training mix preset: coco (16:8:4:4) | other (16:12:6:6)
    device: str = "auto"
    resume: bool = False
    force: bool = False  # start the run over / replace the installed model
    stop_at_step: int | None = None


@dataclass
class TrainOutcome:
    result: Any  # models.training.loop.TrainResult
    model_dir: Path | None  # the installed model (None while the run is unfinished)
    init: dict[str, Any]
    config: Any  # models.training.loop.TrainConfig
    train_pairs: int
    val_pairs: int


def default_init(mode: str) -> str:
    from models.hub.cache import is_present

    if mode == "finetune" and is_present("lightningdot"):
        return "lightningdot"
    return "bert-base-cased"


def run_training(req: TrainRequest, progress: Any = None) -> TrainOutcome:
    """Train as asked and install the result as ``<home>/models/<out>`` (kind bi-encoder, origin train)."""
    from models.core.home import models_dir, runs_dir
    from models.hub.cache import check_name, read_manifest
    from models.hub.catalogue import find_entry
    from models.nn.tokenizer import Tokenizer
    from models.training import loop as training
    from models.training.initialization import (
        initial_model,
        read_source,
        source_tokenizer,
    )

    check_name(req.out)
    if find_entry(req.out) is not None:
        raise LdotError(f"{req.out!r} is a registry name (`ldot models list`): choose another {option('out')}")
    run_dir = runs_dir() / req.out
    target = models_dir() / req.out
    same_run = read_manifest(target).get("trained_from") == str(run_dir)
    if target.exists() and not (req.force or same_run):
        raise LdotError(f"a model named {req.out!r} already exists: pass {option('force')} to replace it, or choose "
                        "another "
                        "--out")
    if req.resume:
        if not (run_dir / "run.json").is_file():
            raise LdotError(f"no run named {req.out!r} to resume (runs live in {runs_dir()}): start it without "
                            "--resume")
        saved = training.read_run(run_dir)
        config = training.TrainConfig.from_dict(saved["train_config"])
        config = replace(config, **req.overrides)
        tokenizer = Tokenizer.from_path(run_dir / "tokenizer.json")
        init: dict[str, Any] = saved.get("init", {})
        data = open_training_data(req.data, tokenizer, device=req.device, progress=progress)
        model = None
    else:
        if run_dir.exists():
            if not req.force:
                raise LdotError(f"a run named {req.out!r} exists ({run_dir}): pass {option('resume')} to continue "
                                "it, or "
                                "--force to start over")
            shutil.rmtree(run_dir)
        source = read_source(req.init or default_init(req.mode))
        tokenizer = source_tokenizer(source)
        data = open_training_data(req.data, tokenizer, device=req.device, progress=progress)
        first = data.features[data.train.image_keys[0]]
        soft = getattr(first, "soft_labels", None)
        model, report = initial_model(source, req.image_init, img_dim=first.features.shape[-1],
                                      num_region_labels=soft.shape[-1] if soft is not None else 1601,
                                      seed=req.overrides.get("seed", 42))
        init = report.to_dict()
        if req.mode == "finetune":
            config = training.finetune_config(req.data.dataset, **req.overrides)
        else:
            config = training.pretrain_config(req.mix, **req.overrides)
    result = training.train(run_dir, data, config, model, tokenizer, resume=req.resume, device=req.device,
                            init=init, progress=progress, stop_at_step=req.stop_at_step)
    model_dir = training.export_model(run_dir, req.out, force=True) if result.finished else None
    return TrainOutcome(result, model_dir, init, config, len(data.train), len(data.val) if data.val else 0)
