"""`ldot train`: fine-tune (CMR) or pre-train (CMR + VMLM + MRFR + MRC-kl) a bi-encoder from live weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ldot_cli.commands.console import ProgressView, err, line, progress_bar

if TYPE_CHECKING:
    from ldot_cli.data.training_data import DataSpec

app = typer.Typer(help="Make your own model: fine-tune or pre-train a bi-encoder, or decompose a cross-encoder.",
                  no_args_is_help=True)

Data = typer.Option(None, "--data", help="Folder holding the UNITER text/image DBs or the Karpathy split file "
                    "(finetune with none: the public training set is fetched, see `ldot data get NAME --split train`).")
TxtDb = typer.Option(None, "--txt-db", help="Training UNITER text DB (repeatable).")
ValTxtDb = typer.Option(None, "--val-txt-db", help="Validation UNITER text DB (model selection by mean recall).")
ImgDb = typer.Option(None, "--img-db", help="UNITER image DB folder (repeatable; default: every one under --data).")
ValImages = typer.Option(None, "--val-images", help="Validate on the first N validation images only.")
NoVal = typer.Option(False, "--no-val", help="No validation: keep the last model.")
Init = typer.Option(None, "--init", help="Start from a bi-encoder (lightningdot, a model you trained) or a BERT "
                    "(bert-base-cased). Default: lightningdot when present, else bert-base-cased.")
ImageInit = typer.Option(None, "--image-init", help="Image tower when --init is a BERT: uniter-base (default when "
                         "present) or a BERT (fresh region embedding).")
Out = typer.Option(..., "--out", help="Name of the run and of the trained model (`ldot index --model NAME`).")
# What `--help` shows as defaults: the official settings (`models.training.loop.finetune_config` /
# `pretrain_config`; tests/test_cli_help.py checks they agree). Written here so that --help imports no torch.
FINETUNE_DEFAULTS = {"batch_size": "96", "lr": "2e-5", "warmup": "0.1", "grad_clip": "2.0", "grad_accum": "1",
                     "precision": "auto", "seed": "42"}
PRETRAIN_DEFAULTS = {**FINETUNE_DEFAULTS, "lr": "5e-5", "warmup": "0.1", "grad_clip": "5.0", "steps": "300000",
                     "eval_every": "10000"}
DECOMPOSE_DEFAULTS = {**FINETUNE_DEFAULTS, "batch_size": "300", "lr": "7.5e-6", "warmup": "200", "grad_clip": "1.0"}
_HELP = {
    "batch_size": ("--batch-size", "Pairs per batch: the in-batch negatives."),
    "lr": ("--lr", "Peak learning rate."),
    "warmup": ("--warmup", "Warmup: a fraction of all steps (< 1) or a number of steps."),
    "grad_clip": ("--grad-clip", "Max gradient norm (0: off)."),
    "grad_accum": ("--grad-accum", "Batches per optimizer step."),
    "precision": ("--precision", "auto | fp32 | fp16 | bf16 (auto: bf16 or fp16 on CUDA, fp32 on CPU, where bf16 is "
                                 "far slower)."),
    "seed": ("--seed", "Seed of data order, masking and dropout."),
    "steps": ("--steps", "Optimizer steps."),
    "eval_every": ("--eval-every", "Steps between validations."),
}


def _opt(key: str, defaults: dict[str, str]) -> Any:
    flag, text = _HELP[key]
    return typer.Option(None, flag, help=f"{text} [default: {defaults[key]}]")


Device = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
Resume = typer.Option(False, "--resume", help="Continue the run named by --out from its last checkpoint.")
Force = typer.Option(False, "--force", help="Start the run over and replace a model of that name.")
SaveEvery = typer.Option(None, "--save-every", help="Steps between resume checkpoints. [default: at each validation]")
Plot = typer.Option(False, "--plot", help="Draw the loss and validation-recall curves to <run>/curves.png at the end "
                    "(needs matplotlib: pip install '.[plot]' in ldot's folder).")
HardNegatives = typer.Option(None, "--hard-negatives", help="K hard negatives per caption and per image, mined with "
                             "the current model before training and after each epoch. [default: 0, in-batch only]")
HardNegativesGate = typer.Option(None, "--hard-negatives-gate", help="With --hard-negatives: mine only once the "
                                 "validation mean recall has closed this share of the gap from chance to 100 and the "
                                 "mined pools are not all alike (a model that ranks at random mines the same images "
                                 "for every caption); in-batch negatives until then. 0: mine from the start, as the "
                                 "official code. [default: 0.1]")
DistillFrom = typer.Option(None, "--distill-from", help="Distil a cross-encoder's scores (uniter-base, "
                           "lxmert-base-uncased, a uniter-itm model; vilt-flickr30k / vilt-coco, which read the image "
                           "files): KL over captions for the batch's first 10 images.")
DistillWeight = typer.Option(None, "--distill-weight", help="Weight of the distillation loss. [default: 1.0]")
DistillTemperature = typer.Option(None, "--distill-temperature", help="Distillation temperature T. [default: 1.0]")


@app.command()
def finetune(
    dataset: str = typer.Option("flickr30k", "--dataset", help="flickr30k | coco (sets the epochs: 15 / 20)."),
    data: Path = Data, karpathy: Path = typer.Option(None, "--karpathy", help="dataset_<set>.json (Karpathy split)."),
    txt_db: list[Path] = TxtDb, val_txt_db: Path = ValTxtDb, img_db: list[Path] = ImgDb,
    val_images: int = ValImages, no_val: bool = NoVal, init: str = Init, image_init: str = ImageInit,
    out_name: str = Out,
    epochs: int = typer.Option(None, "--epochs", help="Passes over the training captions (every caption once). "
                               "[default: 15 for flickr30k, 20 for coco]"),
    batch_size: int = _opt("batch_size", FINETUNE_DEFAULTS), lr: float = _opt("lr", FINETUNE_DEFAULTS),
    warmup: float = _opt("warmup", FINETUNE_DEFAULTS), grad_clip: float = _opt("grad_clip", FINETUNE_DEFAULTS),
    grad_accum: int = _opt("grad_accum", FINETUNE_DEFAULTS), precision: str = _opt("precision", FINETUNE_DEFAULTS),
    seed: int = _opt("seed", FINETUNE_DEFAULTS), device: str = Device,
    resume: bool = Resume, force: bool = Force, save_every: int = SaveEvery, plot: bool = Plot,
    hard_negatives: int = HardNegatives, hard_negatives_gate: float = HardNegativesGate,
    distill_from: str = DistillFrom, distill_weight: float = DistillWeight,
    distill_temperature: float = DistillTemperature,
    yes: bool = typer.Option(False, "--yes", "-y", help="With no --data: fetch the training set without asking "
                             "(accepts its terms of use)."),
) -> None:
    """Fine-tune with CMR (in-batch contrastive loss over dot products); keep the epoch with the best mean recall."""
    if dataset not in ("flickr30k", "coco"):
        raise typer.BadParameter("choose flickr30k or coco", param_hint="--dataset")
    if data is None and karpathy is None and not txt_db and val_txt_db is None and not img_db:
        from ldot_cli.commands.data import fetch_with_progress
        from ldot_cli.data import datasets

        if not resume:  # the public training set, fetched once into the cache, once the model is known to be here
            from ldot_cli.train.driver import default_init
            from models.hub.load import resolve_source

            resolve_source(init or default_init("finetune"))
            fetch_with_progress(dataset, "train", "de", yes, own_copy=True)
        if datasets.is_fetched(dataset, "train"):
            data = datasets.dataset_dir(dataset)
    spec = _spec(dataset, data, karpathy, txt_db, val_txt_db, img_db, val_images, no_val)
    _run("finetune", out_name, spec, init, image_init, device, resume, force, dict(
        epochs=epochs, batch_size=batch_size, lr=lr, warmup=warmup, grad_clip=grad_clip, grad_accum=grad_accum,
        precision=precision, seed=seed, checkpoint_every=save_every, hard_negatives=hard_negatives,
        hard_negatives_gate=hard_negatives_gate, distill_from=distill_from, distill_weight=distill_weight,
        distill_temperature=distill_temperature), plot=plot)


@app.command()
def pretrain(
    data: Path = Data, txt_db: list[Path] = TxtDb, val_txt_db: Path = ValTxtDb, img_db: list[Path] = ImgDb,
    val_images: int = ValImages, no_val: bool = NoVal,
    tasks: str = typer.Option("itm,mlm,mrfr,mrckl", "--tasks", help="Tasks to mix: itm (CMR), mlm, mrfr, mrckl."),
    mix: str = typer.Option("16,8,4,4", "--mix", help="Mix ratios, one per task, or a preset: coco (16,8,4,4), "
                            "other (16,12,6,6: VG, CC, SBU)."),
    steps: int = _opt("steps", PRETRAIN_DEFAULTS), eval_every: int = _opt("eval_every", PRETRAIN_DEFAULTS),
    init: str = Init, image_init: str = ImageInit, out_name: str = Out,
    batch_size: int = _opt("batch_size", PRETRAIN_DEFAULTS), lr: float = _opt("lr", PRETRAIN_DEFAULTS),
    warmup: float = _opt("warmup", PRETRAIN_DEFAULTS), grad_clip: float = _opt("grad_clip", PRETRAIN_DEFAULTS),
    grad_accum: int = _opt("grad_accum", PRETRAIN_DEFAULTS), precision: str = _opt("precision", PRETRAIN_DEFAULTS),
    seed: int = _opt("seed", PRETRAIN_DEFAULTS), device: str = Device,
    resume: bool = Resume, force: bool = Force, save_every: int = SaveEvery, plot: bool = Plot,
) -> None:
    """Pre-train with a mix of CMR, VMLM, MRFR and MRC-kl (one task sampled per batch)."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    ratios = _mix(mix, names)
    spec = _spec("custom", data, None, txt_db, val_txt_db, img_db, val_images, no_val)
    _run("pretrain", out_name, spec, init or "bert-base-cased", image_init, device, resume, force, dict(
        tasks=None if resume and tasks == "itm,mlm,mrfr,mrckl" and mix == "16,8,4,4" else tuple(zip(names, ratios)),
        steps=steps, eval_every=eval_every, batch_size=batch_size, lr=lr, warmup=warmup, grad_clip=grad_clip,
        grad_accum=grad_accum, precision=precision, seed=seed, checkpoint_every=save_every), plot=plot)


@app.command()
def decompose(
    dataset: str = typer.Option("flickr30k", "--dataset", help="flickr30k | coco (where to find the data)."),
    data: Path = Data, karpathy: Path = typer.Option(None, "--karpathy", help="dataset_<set>.json (Karpathy split)."),
    txt_db: list[Path] = TxtDb, val_txt_db: Path = ValTxtDb, img_db: list[Path] = ImgDb,
    val_images: int = ValImages, no_val: bool = NoVal,
    init: str = typer.Option(None, "--init", "--from", help="Single-stream cross-encoder to decompose: uniter-base, "
                             "visualbert-vqa-coco-pre, vilt-flickr30k / vilt-coco (detector-free: trains on the image "
                             "files), a uniter-itm model dir, or a decomposed model to continue. "
                             "Default: uniter-base when present, else visualbert-vqa-coco-pre."),
    out_name: str = Out,
    tags: bool = typer.Option(None, "--tags/--no-tags", help="Prefix each image with its regions' object names "
                              "([CLS] tags [SEP]). Default: on when the features hold class ids or soft labels."),
    tag_vocab: str = typer.Option(None, "--tag-vocab", help="Detector (name or dir) or objects_vocab.txt naming the "
                                  "classes. [default: butd-r101-vg]"),
    text_len: int = typer.Option(None, "--text-len", help="Text (and tag) input length. [default: 35]"),
    max_regions: int = typer.Option(None, "--max-regions", help="Regions per image. [default: 100]"),
    recipe: str = typer.Option("ldot", "--recipe", help="ldot: temperature 0.05, batch 300 (learns from ldot's "
                               "sources, which are not retrieval-trained); vldeformer: VLDeformer's own temperature "
                               "0.005 and batch 1800 (6 GPUs x 300), made for VinVL's retrieval-trained start."),
    temperature: float = typer.Option(None, "--temperature", help="InfoNCE temperature. [default: the recipe's: "
                                      "0.05 (ldot), 0.005 (vldeformer)]"),
    epochs: int = typer.Option(None, "--epochs", help="VLDeformer's epochs: each draws as many pairs as there are "
                               "training images (its epoch shows every image once with one of its captions), i.e. "
                               "1/5 of the captions on Flickr30k or COCO. [default: 200]"),
    batch_size: int = _opt("batch_size", DECOMPOSE_DEFAULTS), lr: float = _opt("lr", DECOMPOSE_DEFAULTS),
    warmup: float = _opt("warmup", DECOMPOSE_DEFAULTS), grad_clip: float = _opt("grad_clip", DECOMPOSE_DEFAULTS),
    grad_accum: int = _opt("grad_accum", DECOMPOSE_DEFAULTS), precision: str = _opt("precision", DECOMPOSE_DEFAULTS),
    seed: int = _opt("seed", DECOMPOSE_DEFAULTS), device: str = Device,
    resume: bool = Resume, force: bool = Force, save_every: int = SaveEvery, plot: bool = Plot,
    hard_negatives: int = HardNegatives, hard_negatives_gate: float = HardNegativesGate,
    distill_from: str = DistillFrom, distill_weight: float = DistillWeight,
    distill_temperature: float = DistillTemperature,
) -> None:
    """Decompose a single-stream cross-encoder into ONE encoder for texts and images (VLDeformer): cosine score,
    cross-modal InfoNCE; the result indexes and searches like any bi-encoder."""
    spec = _spec(dataset, data, karpathy, txt_db, val_txt_db, img_db, val_images, no_val)
    model_options = {k: v for k, v in dict(text_len=text_len, max_regions=max_regions,
                                           temperature=temperature).items() if v is not None}
    if recipe not in ("ldot", "vldeformer"):
        raise typer.BadParameter("choose ldot or vldeformer", param_hint="--recipe")
    _run("decompose", out_name, spec, init, None, device, resume, force, dict(
        epochs=epochs, batch_size=batch_size, lr=lr, warmup=warmup, grad_clip=grad_clip, grad_accum=grad_accum,
        precision=precision, seed=seed, checkpoint_every=save_every, hard_negatives=hard_negatives,
        hard_negatives_gate=hard_negatives_gate, distill_from=distill_from, distill_weight=distill_weight,
        distill_temperature=distill_temperature),
        plot=plot, tags=tags, tag_vocab=tag_vocab, model_options=model_options, recipe=recipe)


@app.command()
def show(
    run: str = typer.Argument(..., help="A run name (<home>/runs/NAME) or a run folder."),
    out: Path = typer.Option(None, "--out", help="PNG to write. [default: <run>/curves.png]"),
) -> None:
    """Draw a run's loss and validation-recall curves (from its log.jsonl) to a PNG."""
    from ldot_cli.train.plot import plot_run
    from models.core.home import runs_dir

    path = Path(run).expanduser()
    if not path.is_dir():
        path = runs_dir() / run
    if not path.is_dir():
        raise typer.BadParameter(f"no run named {run!r} (runs live in {runs_dir()})", param_hint="RUN")
    written = plot_run(path, out)
    typer.echo(str(written))
    err.print(line(f"curves of {path.name}: {written}"))


def _mix(mix: str, names: list[str]) -> list[float]:
    from models.core.errors import ConfigError
    from models.training.loop import mix_ratios

    try:
        return mix_ratios(mix, names)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--mix") from None


def _spec(dataset: str, data: Path | None, karpathy: Path | None, txt_db: list[Path] | None, val_txt_db: Path | None,
          img_db: list[Path] | None, val_images: int | None, no_val: bool) -> DataSpec:
    from ldot_cli.data.training_data import DataSpec

    return DataSpec(dataset, data, karpathy, tuple(txt_db or ()), val_txt_db, tuple(img_db or ()), val_images, no_val)


def _run(mode: str, name: str, spec: DataSpec, init: str | None, image_init: str | None, device: str, resume: bool,
         force: bool, options: dict[str, Any], plot: bool = False, **extra: Any) -> None:
    from ldot_cli.train.driver import TrainRequest, run_training

    overrides = {k: v for k, v in options.items() if v is not None}
    request = TrainRequest(mode, name, spec, init, image_init, overrides, device=device, resume=resume, force=force,
                           plot=plot, **extra)
    with progress_bar("steps") as progress:
        outcome = run_training(request, ProgressView(progress))
    result = outcome.result
    best = result.best
    summary = f"best mean recall {best['mean_recall']:.2f} at step {best['step']}" if best else "no validation"
    err.print(line(("ok", "green"), f" {mode}: {result.step} steps on {outcome.train_pairs} pairs in "
                   f"{result.seconds:.0f} s; {summary}"))
    if outcome.plot is not None:
        err.print(line(f"curves: {outcome.plot}"))
    if outcome.model_dir is not None:
        typer.echo(f"{name}\t{outcome.model_dir}")  # plain: for scripts
        err.print(line(f"use it: ldot index PHOTOS --model {name}"))


def register(app_: typer.Typer) -> None:
    app_.add_typer(app, name="train")
