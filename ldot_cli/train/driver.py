"""`ldot train` behind one call: initial weights + tokenizer, data, training, and the model installed in the cache.

The loop itself is `models.training.loop`; this module only decides what to train from and where things go.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldot_cli.data.training_data import (
    DataSpec,
    check_training_data,
    open_training_data,
)
from models.core.errors import LdotError, option

if TYPE_CHECKING:
    import torch
    from torch import nn

    from models.core.progress import ProgressFn
    from models.hub.decompose import DecomposeSource
    from models.nn.cross_encoder import LxmertReranker, UniterReranker
    from models.nn.tokenizer import Tokenizer
    from models.nn.vilt import ViltReranker
    from models.training.data import TrainData
    from models.training.dual import DualTokenizer
    from models.training.initialization import Source
    from models.training.loop import TrainConfig, TrainResult


@dataclass
class TrainRequest:
    """One `ldot train finetune|pretrain` invocation."""

    mode: str  # finetune | pretrain | decompose
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
    tags: bool | None = None  # decompose: object tags (None: when the records hold class ids or soft labels)
    tag_vocab: str | None = None  # decompose: detector name / dir / objects_vocab.txt naming the classes
    model_options: dict[str, Any] = field(default_factory=dict)  # decompose: text_len, max_regions, temperature
    plot: bool = False  # draw the loss and recall curves to <run>/curves.png at the end
    recipe: str = "ldot"  # decompose: ldot (T 0.05, batch 300) | vldeformer (T 0.005, batch 1800): DECOMPOSE_RECIPES


@dataclass
class TrainOutcome:
    result: TrainResult
    model_dir: Path | None  # the installed model (None while the run is unfinished)
    init: dict[str, Any]
    config: TrainConfig
    train_pairs: int
    val_pairs: int
    plot: Path | None = None  # the curves' PNG, when asked for
    tags: int = 0  # decompose: size of the object vocabulary used for tags (0: no tags)


def default_init(mode: str) -> str:
    from models.hub.installed import is_present

    if mode == "decompose":
        return "uniter-base" if is_present("uniter-base") else "visualbert-vqa-coco-pre"
    if mode == "finetune" and is_present("lightningdot"):
        return "lightningdot"
    return "bert-base-cased"


def _tag_vocab(req: TrainRequest, data: TrainData) -> tuple[str, ...]:
    """The object names for the tags of a decomposed model: () when tags are off or the records hold no classes."""
    from models.nn.regions import region_object_ids

    has_classes = region_object_ids(data.features[data.train.image_keys[0]]) is not None
    if req.tags is False or (req.tags is None and not has_classes):
        return ()
    if not has_classes:
        raise LdotError(f"{option('tags')} needs region class ids or soft labels in the image features, and these have none: "
                        f"extract them with soft labels, or pass {option('no_tags')}")
    from feature_extraction.detector.vocab import object_vocab
    from models.hub.catalogue import DEFAULT_DETECTOR

    return object_vocab(req.tag_vocab or DEFAULT_DETECTOR)


class PixelTeacher:
    """A cross-encoder that reads pixels (ViLT) as the training loop's teacher: it scores (caption, image key) pairs,
    reading each image's file (decoded by ldot, preprocessed by the teacher's processor; the last few kept)."""

    inputs = "pixels"

    def __init__(self, reranker: ViltReranker, files: dict[str, Path], keep: int = 64) -> None:
        self.reranker = reranker
        self.files = files
        self.keep = keep
        self._pixels: dict[str, torch.Tensor] = {}

    def _prepared(self, key: str) -> torch.Tensor:
        from feature_extraction.errors import ImageLoadError
        from feature_extraction.images.decode import load_image

        if key not in self._pixels:
            try:
                self._pixels[key] = self.reranker.prepare(load_image(self.files[key]))
            except (ImageLoadError, KeyError) as exc:
                raise LdotError(f"the teacher cannot read training image {key}: "
                                f"{getattr(exc, 'reason', 'no image file for it')}") from None
            if len(self._pixels) > self.keep:
                self._pixels.pop(next(iter(self._pixels)))
        return self._pixels[key]

    def score_keys(self, texts: list[str], keys: list[str]) -> torch.Tensor:
        return self.reranker.score_pixels(texts, [self._prepared(k) for k in keys])


def _reads_pixels(source: str) -> bool:
    """``source`` is a dual encoder (CLIP, SigLIP: a registry name, hf:ORG/NAME or a folder)."""
    from models.hub.load import model_inputs

    try:
        return model_inputs(source) == "pixels"
    except LdotError:
        return False  # not a model ldot knows by that name: the usual path says what is wrong


def _teacher(config: TrainConfig, device: str, data: TrainData | None = None,
             progress: ProgressFn | None = None) -> UniterReranker | LxmertReranker | PixelTeacher | None:
    if config.distill_from is None:
        return None
    from models.hub.load import load_reranker
    from models.nn.cross_encoder import LxmertReranker
    from models.nn.vilt import ViltReranker
    from models.training.data import PixelRecord

    teacher = load_reranker(config.distill_from, device=device, dtype=None)
    if isinstance(teacher, ViltReranker):  # it reads pixels
        if data is None or not data.image_files:
            raise LdotError(f"{config.distill_from} scores the images' pixels: train from a Karpathy split file and "
                            f"the image files under {option('data')} (`ldot data get flickr30k --split train`), not "
                            "from a UNITER image DB alone")
        return PixelTeacher(teacher, dict(data.image_files))
    if isinstance(teacher, LxmertReranker) and data is not None and progress is not None:
        keys = data.train.image_keys[:: max(1, len(data.train.image_keys) // 50)][:50]
        records = [data.features[k] for k in keys]
        boxes = sorted({len(r.features) for r in records if not isinstance(r, PixelRecord)})
        if boxes != [36]:  # the re-ranker says the same of an index of other boxes (`ldot search --rerank`)
            from models.core.progress import Progress

            span = f"{boxes[0]}-{boxes[-1]}" if len(boxes) > 1 else str(boxes[0])
            progress(Progress("train", 0, None, "steps", "note", {
                "message": f"LXMERT was trained on 36 boxes per image and these features hold {span}; for LXMERT "
                           "as published, distil on features extracted with `ldot extract --preset lxmert36`"}))
    return teacher


def run_training(req: TrainRequest, progress: ProgressFn | None = None) -> TrainOutcome:
    """Train as asked and install the result as ``<home>/models/<out>`` (kind bi-encoder, origin train)."""
    from models.core.home import models_dir, runs_dir
    from models.hub.catalogue import find_entry
    from models.hub.installed import check_name, read_manifest
    from models.nn.tokenizer import Tokenizer
    from models.training import loop as training
    from models.training.initialization import (
        initial_model,
        read_source,
        source_tokenizer,
    )

    tokenizer: Tokenizer | DualTokenizer  # a dual encoder's own, or a word-piece one
    source: Source | DecomposeSource
    model: nn.Module | None  # None: rebuilt from the run (--resume)
    check_name(req.out)
    if req.mode != "finetune" and req.init is not None and _reads_pixels(req.init):
        raise LdotError(f"{req.init} is a dual encoder: it is fine-tuned (`ldot train finetune --init {req.init}`), "
                        f"not {'pre-trained' if req.mode == 'pretrain' else 'decomposed'}")
    check_training_data(req.data)  # a wrong --data fails before any model is read or asked for
    if find_entry(req.out) is not None:
        raise LdotError(f"{req.out!r} is a registry name (`ldot models list`): choose another {option('out')}")
    run_dir = runs_dir() / req.out
    target = models_dir() / req.out
    same_run = read_manifest(target).get("trained_from") == str(run_dir)
    if target.exists() and not (req.force or same_run):
        raise LdotError(f"a model named {req.out!r} already exists: pass {option('force')} to replace it, or choose "
                        "another "
                        f"{option('out')}")
    if req.resume:
        if not (run_dir / "run.json").is_file():
            raise LdotError(f"no run named {req.out!r} to resume (runs live in {runs_dir()}): start it without "
                            f"{option('resume')}")
        saved = training.read_run(run_dir)
        config = training.TrainConfig.from_dict(saved["train_config"])
        config = replace(config, **req.overrides)
        init: dict[str, Any] = saved.get("init", {})
        if saved.get("model_kind") == "dual-encoder":  # the run's own tokenizer and image preprocessing
            from models.training import dual

            rebuilt, tokenizer = dual.rebuild(run_dir, saved["model_config"])
            data = open_training_data(req.data, tokenizer, pixels=rebuilt.prepare)
        else:
            tokenizer = Tokenizer.from_path(run_dir / "tokenizer.json")
            pixels = None
            if saved.get("model_kind") == "decomposed-vilt":  # it reads the image files
                from models.nn.vilt import PixelPreprocessing

                pixels = PixelPreprocessing.from_processor_config(saved["model_config"].get("processor"))
            data = open_training_data(req.data, tokenizer, device=req.device, progress=progress, pixels=pixels)
        model = None
        tags = len(saved["model_config"].get("tags", ()))
    elif req.mode == "decompose":
        from models.hub.decompose import decomposed_model, read_decompose_source
        from models.hub.decompose import source_tokenizer as decompose_tokenizer

        if run_dir.exists():
            if not req.force:
                raise LdotError(f"a run named {req.out!r} exists ({run_dir}): pass {option('resume')} to continue it, or "
                                f"{option('force')} to start over")
            shutil.rmtree(run_dir)
        name = req.init or default_init(req.mode)
        source = read_decompose_source(name)
        tokenizer = decompose_tokenizer(source)
        model_options = dict(req.model_options)
        if "temperature" not in model_options and not source.kind.startswith("decomposed"):  # a decomposed model
            model_options["temperature"] = training.DECOMPOSE_RECIPES[req.recipe]["temperature"]  # keeps its own
        if source.kind in ("vilt", "decomposed-vilt"):  # detector-free: it reads the image files, no tags
            if req.tags:
                raise LdotError(f"{name} reads pixels: it has no object tags (leave out {option('tags')})")
            from models.nn.vilt import ViltDecomposedEncoder

            vilt = decomposed_model(source, tokenizer, **model_options)
            data = open_training_data(req.data, tokenizer,
                                      pixels=vilt.prepare if isinstance(vilt, ViltDecomposedEncoder) else None)
            model = vilt
            vocab: tuple[str, ...] = ()
        else:
            data = open_training_data(req.data, tokenizer)
            vocab = _tag_vocab(req, data)
            model = decomposed_model(source, tokenizer, tags=vocab, **model_options)
        init = {"text": name, "image": name, "heads": "none", "source_kind": source.kind,
                "tags": len(vocab), "recipe": req.recipe}
        config = training.decompose_config(req.recipe, **req.overrides)
        tags = len(vocab)
    elif req.init is not None and _reads_pixels(req.init):
        # a dual encoder (CLIP, SigLIP): the same loop on the images' pixels, with the model's own tokenizer
        from models.training import dual

        if run_dir.exists():
            if not req.force:
                raise LdotError(f"a run named {req.out!r} exists ({run_dir}): pass {option('resume')} to continue "
                                f"it, or {option('force')} to start over")
            shutil.rmtree(run_dir)
        dual_model, tokenizer, source_dir = dual.start_model(req.init)
        model = dual_model
        data = open_training_data(req.data, tokenizer, pixels=dual_model.prepare)
        config = training.finetune_config(req.data.dataset, **req.overrides)
        if config.distill_from is not None:
            raise LdotError(f"{option('distill_from')} is not offered for a dual encoder's fine-tuning: leave it "
                            "out")
        dual.write_base(run_dir, dual_model, source_dir)
        init = {"text": req.init, "image": req.init, "heads": "none", "source_kind": "dual-encoder"}
        tags = 0
    else:
        if run_dir.exists():
            if not req.force:
                raise LdotError(f"a run named {req.out!r} exists ({run_dir}): pass {option('resume')} to continue "
                                "it, or "
                                f"{option('force')} to start over")
            shutil.rmtree(run_dir)
        source = read_source(req.init or default_init(req.mode))
        tokenizer = source_tokenizer(source)
        data = open_training_data(req.data, tokenizer, device=req.device, progress=progress)
        from models.training.data import PixelRecord, region_feature_mean

        first = data.features[data.train.image_keys[0]]
        if isinstance(first, PixelRecord):  # opened without `pixels`: never
            raise LdotError(f"{req.init} reads region features and the training images came as pixels")
        soft = getattr(first, "soft_labels", None)

        model, report = initial_model(source, req.image_init, img_dim=first.features.shape[-1],
                                      num_region_labels=soft.shape[-1] if soft is not None else 1601,
                                      seed=req.overrides.get("seed", 42),
                                      region_mean=lambda: region_feature_mean(data.features, data.train.image_keys))
        init = report.to_dict()
        if req.mode == "finetune":
            config = training.finetune_config(req.data.dataset, **req.overrides)
        else:
            config = training.pretrain_config(req.mix, **req.overrides)
        tags = 0
    teacher = _teacher(config, req.device, data, progress)
    result = training.train(run_dir, data, config, model, tokenizer, resume=req.resume, device=req.device,
                            init=init, progress=progress, stop_at_step=req.stop_at_step, teacher=teacher)
    model_dir = training.export_model(run_dir, req.out, force=True) if result.finished else None
    plot = None
    if req.plot:
        from ldot_cli.train.plot import plot_run

        plot = plot_run(run_dir)
    return TrainOutcome(result, model_dir, init, config, len(data.train), len(data.val) if data.val else 0, plot,
                        tags)
