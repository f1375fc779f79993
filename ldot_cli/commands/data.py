"""`ldot data`: public benchmarks and training sets fetched into the cache: list, get, verify, rm."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer

from ldot_cli.commands.console import (
    ProgressView,
    cell,
    err,
    human_bytes,
    line,
    out,
    progress_bar,
    safe,
    verify_report,
)

if TYPE_CHECKING:
    from ldot_cli.data.datasets import Plan
    from models.core.progress import Progress, ProgressFn

app = typer.Typer(help="Public benchmarks and training sets in the cache: list, get, verify, rm.",
                  no_args_is_help=True)

ASK_ABOVE = 50_000_000  # bytes: a larger download is confirmed first (unless --yes)


def confirm_fetch(plan: Plan, yes: bool, own_copy: bool = False) -> None:
    """Say what a fetch downloads, where it goes and its terms of use; ask before a large one unless ``yes``.
    ``own_copy``: the running command has ``--data`` (`ldot eval`, `ldot train`), so the refusal may suggest it."""
    from models.core.errors import LdotError

    if plan.done:
        return
    what = " + ".join(f"{e.dataset} {e.split}" for e in plan.splits)
    where = ", ".join(str(f) for f in plan.folders)
    err.print(line(f"{what}: about {human_bytes(plan.missing_bytes)} to download into {where}"), soft_wrap=True)
    for terms in plan.terms:
        err.print(line(("terms of use: ", "bold"), terms), soft_wrap=True)
    if yes or plan.missing_bytes <= ASK_ABOVE:
        return
    if not sys.stdin.isatty():
        raise LdotError(f"{what} is a download of about {human_bytes(plan.missing_bytes)}: add --yes to accept it "
                        "and its terms of use" + (" (or pass --data with your own copy)" if own_copy else ""))
    typer.confirm("download it and accept these terms?", abort=True, err=True)


def fetch_with_progress(dataset: str, split: str, lang: str, yes: bool, workers: int = 8,
                        own_copy: bool = False) -> None:
    """`confirm_fetch`, then fetch with one byte bar (bytes/s, ETA) on stderr."""
    from ldot_cli.data import datasets

    plan = datasets.plan(dataset, split, lang)
    confirm_fetch(plan, yes, own_copy)
    if plan.done:
        return
    with progress_bar("bytes", transient=False) as bar:
        datasets.fetch(dataset, split, lang, progress=_bytes_only(ProgressView(bar)), workers=workers)


def _bytes_only(callback: ProgressFn) -> ProgressFn:
    def on(p: Progress) -> None:
        if p.unit == "bytes":
            callback(p)
    return on


@app.command("list")
def list_data(json_: bool = typer.Option(False, "--json", help="Print a JSON list instead.")) -> None:
    """Every dataset split ldot can fetch: size, terms of use, and whether it is here."""
    import json

    from rich import box
    from rich.table import Table

    from ldot_cli.data import datasets

    splits = datasets.status()
    rows = [{"dataset": s.entry.dataset, "split": s.entry.split, "download_bytes": s.entry.approx_bytes,
             "present": "yes" if s.present else ("partial" if s.partial_bytes else "no"),
             "partial_bytes": s.partial_bytes, "licence": s.entry.licence, "terms": s.entry.terms,
             "folder": str(s.folder)} for s in splits]
    if json_:
        typer.echo(json.dumps(rows, ensure_ascii=False))
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("dataset", "split", "download", "present", "licence"):
        table.add_column(column, no_wrap=True)
    styles = {"yes": "green", "no": "dim", "partial": "yellow"}
    for s, row in zip(splits, rows):
        present = str(row["present"])
        kept = f" ({human_bytes(s.partial_bytes)} kept)" if s.partial_bytes else ""
        table.add_row(cell(s.entry.dataset), cell(s.entry.split), cell(f"~{human_bytes(s.entry.approx_bytes)}"),
                      cell(present + kept, styles[present]), cell(s.entry.licence))
    out.print(table)
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        row = next(r for r in rows if r["dataset"] == dataset)
        out.print(line((f"{dataset}: ", "bold"), row["terms"], ("; in ", "dim"), row["folder"]))
    if any(r["partial_bytes"] for r in rows):
        err.print(line("a partial split resumes with `ldot data get NAME [--split SPLIT]`"))


@app.command()
def get(
    name: str = typer.Argument(..., help="flickr30k | coco | multi30k"),
    split: str = typer.Option("test", "--split", help="test (the benchmark) or train (images + Karpathy captions)."),
    lang: str = typer.Option("de", "--lang", help="Multi30K caption language: de, fr, cs, en."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before a large download (accepts its terms)."),
    workers: int = typer.Option(8, "--workers", min=1, max=64, help="Per-image requests at once (COCO test)."),
) -> None:
    """Fetch a dataset split (resumable, verified) into $LDOT_HOME/datasets/NAME."""
    from ldot_cli.data import datasets

    fetch_with_progress(name, split, lang, yes, workers)
    err.print(line(("ok ", "green"), f"{name} {split} -> ", datasets.dataset_dir(name)), soft_wrap=True)


@app.command()
def verify(names: list[str] = typer.Argument(None, help="Datasets to check (default: every one fetched).")) -> None:
    """Re-check the size and sha256 of every fetched file; exit 1 if any is damaged."""
    from ldot_cli.data import datasets

    results = datasets.verify(names or None)
    if verify_report(results, "no datasets fetched (see `ldot data list`)",
                     "{n} split(s) damaged: `ldot data rm NAME` then `ldot data get NAME`"):
        raise typer.Exit(1)


@app.command()
def rm(
    name: str = typer.Argument(..., help="Dataset to delete from the cache."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a fetched dataset (its downloads, images and captions; extracted features are kept)."""
    from ldot_cli.data import datasets

    if not yes:
        typer.confirm(f"delete {safe(datasets.dataset_dir(name))}?", abort=True, err=True)
    path = datasets.remove(name)
    err.print(line("removed ", path))


def register(app_: typer.Typer) -> None:
    app_.add_typer(app, name="data")
