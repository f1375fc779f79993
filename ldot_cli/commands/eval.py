"""`ldot eval`: recall@1/5/10 on Flickr30k, COCO 5K / 1K and Multi30K, with optional re-ranking."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from ldot_cli.commands.console import ProgressView, cell, err, line, out, progress_bar


class Dataset(str, Enum):
    flickr30k = "flickr30k"
    coco = "coco"
    multi30k = "multi30k"


class Split(str, Enum):
    test = "test"
    val = "val"
    one_k = "1k"


class Lang(str, Enum):
    de = "de"
    fr = "fr"
    cs = "cs"
    en = "en"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


_HELP = """Recall@1/5/10 both ways (and RSUM) on a retrieval benchmark, as the official evaluation computes it.

Captions found in --data: dataset_<set>.json (Karpathy split; there or one folder down) or a UNITER text DB
itm_<set>_<split>*.db (there, in txt_db/ or in db/). Multi30K: test_2016_flickr.<lang>[.gz] and
test_2016_flickr.txt (there, or in the multi30k/dataset layout data/task1/raw and data/task1/image_splits).

Images found in --data: a UNITER image DB folder (holding feat_th0.2_max100_min10/, e.g. img_db/flickr30k or
coco_val2014), or the image files (flickr30k-images/, images/, val2014/ ...): their region features are
extracted once with the detector and cached in $LDOT_HOME/features, so later runs only re-encode.

With no --data (nor any input below), the public test split is fetched once into $LDOT_HOME/datasets/ (see
`ldot data list`: size and terms of use are shown first, and a large download is confirmed unless --yes).

A text DB and an image DB are preferred over a Karpathy file and image files. --karpathy, --txt-db, --images,
--img-db, --captions and --image-list name the inputs explicitly.
"""
EVAL_HELP = "\n\n".join(" ".join(paragraph.split()) for paragraph in _HELP.split("\n\n"))  # rich keeps newlines


def register(app: typer.Typer) -> None:
    app.command("eval", help=EVAL_HELP)(eval_command)


def eval_command(
    dataset: Dataset = typer.Argument(..., help="Benchmark."),
    data: Path = typer.Option(None, "--data", help="Folder holding the benchmark (see above)."),
    model: str = typer.Option(None, "--model", help="Bi-encoder: registry name, model dir or checkpoint "
                              "(default: flickr-ft for flickr30k, coco-ft for coco)."),
    split: Split = typer.Option(Split.test, "--split", help="test; val; 1k = COCO's five 1K folds, averaged."),
    lang: Lang = typer.Option(Lang.de, "--lang", help="Multi30K caption language."),
    rerank_k: list[int] = typer.Option([], "--rerank-k", help="Re-rank each query's top M with the cross-encoder "
                                       "(repeatable: --rerank-k 10 --rerank-k 100)."),
    reranker: str = typer.Option(None, "--reranker", help="Cross-encoder (default: the best present, uniter-base "
                                 "first); vilt-flickr30k / vilt-coco read the image files. Given alone, only its "
                                 "full-matrix time is measured."),
    json_output: bool = typer.Option(False, "--json", help="Print every figure as JSON instead of tables."),
    save_embeddings: Path = typer.Option(None, "--save-embeddings", help="Write text/image vectors (.npy) and their "
                                         "ids (embeddings.json) into this folder."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images / captions per forward pass."),
    device: Device = typer.Option(Device.auto, "--device", help="Where the models run."),
    workers: int = typer.Option(2, "--workers", min=0, help="Image-decoding processes, for a model that reads "
                                "pixels (CLIP, SigLIP)."),
    karpathy: Path = typer.Option(None, "--karpathy", help="Karpathy split file (dataset_<set>.json)."),
    txt_db: Path = typer.Option(None, "--txt-db", help="UNITER text DB folder (itm_<set>_<split>*.db)."),
    images: Path = typer.Option(None, "--images", help="Folder of the image files."),
    img_db: Path = typer.Option(None, "--img-db", help="UNITER image DB folder (holding feat_th0.2_max100_min10/)."),
    captions: Path = typer.Option(None, "--captions", help="Multi30K captions file (test_2016_flickr.<lang>[.gz])."),
    image_list: Path = typer.Option(None, "--image-list", help="Multi30K image list (test_2016_flickr.txt)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer file/dir overriding the model's own."),
    cross_sample: int = typer.Option(256, "--cross-sample", min=0, help="Pairs timed to extrapolate the "
                                     "cross-encoder's full score matrix (0: skip)."),
    plot: Path = typer.Option(None, "--plot", help="Also draw recall@K both ways and the speed-ups into this "
                              "PNG (needs matplotlib: the [plot] extra)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="With no --data: fetch the test split without asking "
                             "(accepts its terms of use)."),
) -> None:
    from ldot_cli.data.retrieval_sets import DataPaths
    from ldot_cli.eval.evaluation import EvalOptions, run

    paths = DataPaths(data, karpathy, txt_db, images, img_db, captions, image_list)
    if paths == DataPaths():  # nothing given: the public test split, fetched once into the cache
        from ldot_cli.commands.data import fetch_with_progress
        from ldot_cli.data import datasets

        if split == Split.val:
            raise typer.BadParameter("only the test split is fetched automatically: pass --data for val",
                                     param_hint="--split")
        from ldot_cli.eval.evaluation import check_request
        from models.hub.load import resolve_source

        resolve_source(check_request(dataset.value, split.value, model))  # the model is here before any download
        fetch_with_progress(dataset.value, "test", lang.value, yes, own_copy=True)
        paths = datasets.eval_paths(dataset.value, lang.value)
    opts = EvalOptions(dataset.value, paths, split.value, lang.value, model, tokenizer, tuple(rerank_k), reranker,
                       batch_size, device.value, cross_sample, save_embeddings, workers)
    with progress_bar(transient=True) as progress:
        report = run(opts, ProgressView(progress))
    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render(report.to_dict())
    if plot is not None:
        from ldot_cli.eval.plot import plot_report

        plot_report(report.to_dict(), plot)
        err.print(Text(f"plot: {plot}"))


def _pct(value: float) -> str:
    return f"{value:.2f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} s" if value < 100 else f"{value:,.0f} s"


def _times(factor: float | None) -> str:
    if factor is None:
        return "-"
    return f"{factor:,.0f}x" if factor >= 10 else f"{factor:.2g}x"


def render(rep: dict[str, Any]) -> None:
    """Recall table (ours, re-ranked, published) and timing table, on stdout."""
    from rich.table import Table

    split = {"1k": "1K (mean of 5 folds)", "test": "test", "val": "val"}[rep["split"]]
    lang = f" [{rep['lang']}]" if rep["lang"] else ""
    title = (f"{rep['dataset']}{lang} {split}: {rep['num_images']:,} images, {rep['num_captions']:,} captions "
             f"- model {rep['model']}")
    table = Table(title=line(title), title_justify="left")
    table.add_column("")
    for head in ("T->I R@1", "R@5", "R@10", "I->T R@1", "R@5", "R@10", "RSUM"):
        table.add_column(head, justify="right")

    def row(label: str, rec: dict[str, Any], style: str = "") -> None:
        cells = [*rec["text_to_image"].values(), *rec["image_to_text"].values(), rec["rsum"]]
        table.add_row(cell(label), *(cell(_pct(c)) for c in cells), style=style)

    row("bi-encoder (ours)", rep["recall"], "bold")
    for m, rec in rep["rerank"].items():
        row(f"+ re-rank top {m} ({rep['reranker']})", rec)
    if rep["published"]:
        row(f"published: {rep['published']['setting']}", rep["published"], "dim")
    out.print(table)
    out.print(line("captions: ", rep['sources'].get('captions', '?'), f" ({rep['text_input']}); images: ",
                   rep['sources'].get('images', '?')))
    render_timings(rep)
    render_calibration(rep)


def render_calibration(rep: dict[str, Any]) -> None:
    cal = rep.get("calibration")
    if not cal:
        return
    line = (f"score calibration: a matching pair outscores a non-matching one {100 * cal['auc']:.1f}% of the time; "
            f"--min-score auto = {cal['auto_threshold']:.3f} (the {100 * cal['auto_quantile']:g}% quantile of "
            f"non-matching pairs) keeps {100 * cal['match_pass_rate']:.1f}% of matching pairs")
    line += f"; saved to {cal['saved_to']}" if cal.get("saved_to") else " (not saved: the model is not a model dir)"
    out.print(Text(line))


def render_timings(rep: dict[str, Any]) -> None:
    from rich.table import Table

    t = rep["timing"]
    table = Table(title="time", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    stages = [("feature extraction (detector)", t["feature_extraction_s"]), ("feature loading", t["feature_loading_s"]),
              ("image encoding", t["image_encoding_s"]), ("text encoding", t["text_encoding_s"]),
              ("index build (FAISS flat IP)", t["index_build_s"]), ("search (both ways)", t["search_s"]),
              ("bi-encoder total", t["bi_encoder_s"])]
    stages += [(f"re-rank top {m} ({t['rerank_pairs'][m]:,} pairs)", s) for m, s in t["rerank_s"].items()]
    for name, seconds in stages:
        table.add_row(cell(name), cell(_seconds(seconds)))
    out.print(table)
    if t["cross_full_matrix_s"] is not None:
        text = (f"cross-encoder alone on all {t['full_matrix_pairs']:,} pairs: ~{_seconds(t['cross_full_matrix_s'])} "
                f"(measured on {t['cross_sample_pairs']} pairs, {1000 * t['cross_per_pair_s']:.2f} ms/pair); "
                f"speed-up of the bi-encoder: {_times(t['speedup'])}")
        text += "".join(f", with re-rank top {m}: {_times(s)}" for m, s in t["rerank_speedup"].items())
        out.print(line(text))
