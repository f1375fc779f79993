"""`ldot models`: list, download, import, verify and remove named checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from ldot_cli.commands.console import (
    ProgressView,
    err,
    human_bytes,
    out,
    progress_bar,
)

app = typer.Typer(help="Named checkpoints in the cache: list, download, import, verify, rm.", no_args_is_help=True)


@app.command("list")
def list_models() -> None:
    """Every named checkpoint: kind, source, size, licence, and whether it is present."""
    from rich.table import Table

    from models.hub.cache import local_models
    from models.hub.catalogue import list_pretrained

    local = {m.name: m for m in local_models()}
    table = Table(title=None, show_lines=False)
    for column in ("name", "kind", "present", "size", "licence", "source", "where"):
        table.add_column(column, overflow="fold")
    for entry in list_pretrained():
        model = local.pop(entry.name, None)
        present = "[green]yes[/]" if model and model.complete else ("partial" if model else "[dim]no[/]")
        size = human_bytes(model.size) if model else entry.approx_size
        pending = _pending_bytes(entry)
        if pending and not (model and model.complete):
            present = f"no ({human_bytes(pending)} downloaded: `ldot models download {entry.name}` resumes)"
        source = _source(entry)
        table.add_row(entry.name, entry.kind, present, size, entry.licence, source, _where(model))
    for model in local.values():
        table.add_row(model.name, model.kind, "[green]yes[/]", human_bytes(model.size), "-", f"local ({model.origin})",
                      _where(model))
    out.print(table)
    from rich.text import Text

    from models.core.home import models_dir
    from models.hub.hubfiles import hub_cache_dir

    out.print(Text(f"where: ldot = {models_dir()}; hub cache = the shared Hugging Face cache {hub_cache_dir()} "
                   "(linked from the ldot folder)"), soft_wrap=True)


def _pending_bytes(entry: object) -> int:
    """Bytes an interrupted download left (in the staging folder, or the shared hub cache's ``.part`` blobs):
    the next download resumes from them."""
    from models.hub.fetch import staging_dir
    from models.hub.hubfiles import hub_cache_dir, parse_hub_url

    name = entry.name  # type: ignore[attr-defined]
    folder = staging_dir(name)
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
    hub = parse_hub_url(entry.files[0].urls[0])  # type: ignore[attr-defined]
    if hub is not None:
        blobs = hub_cache_dir() / ("models--" + hub.repo.replace("/", "--")) / "blobs"
        total += sum(p.stat().st_size for p in blobs.glob("*.part")) if blobs.is_dir() else 0
    return total


def _where(model: object) -> str:
    """Where a present model's files are: the ldot cache, or (linked from it) the shared Hugging Face cache."""
    if model is None:
        return "-"
    path = model.path  # type: ignore[attr-defined]
    linked = path.is_dir() and any(p.is_symlink() for p in path.iterdir())
    return "hub cache" if linked else "ldot"


def _source(entry: object) -> str:
    """Where an entry comes from, short: ``hub:<repo>`` or the official host (+ mirrors)."""
    from models.hub.catalogue import HUB_PREFIX

    urls = entry.files[0].urls  # type: ignore[attr-defined]
    if urls[0].startswith(HUB_PREFIX):
        return "hub:" + urls[0][len(HUB_PREFIX):].split("/resolve/")[0]
    host = urls[0].split("/")[2]
    return host + (f" (+{len(urls) - 1} mirror)" if len(urls) > 1 else "")


@app.command()
def download(
    name: str = typer.Argument(..., help="Registry name (see `ldot models list`)."),
    keep_source: bool = typer.Option(False, help="Keep the original .pt beside the converted model."),
) -> None:
    """Fetch a named checkpoint (resumable, verified) into the cache."""
    from models.hub.fetch import download_entry

    with progress_bar("bytes") as progress:
        path = download_entry(name, progress=ProgressView(progress), keep_source=keep_source)
    err.print(f"[green]ok[/] {name} -> {path}")


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="A checkpoint you have: official .pt, detector .bin/.pkl, or a model dir."),
    name: str = typer.Option(..., "--as", help="Name to install it under (e.g. flickr-ft)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing model of that name."),
) -> None:
    """Install a checkpoint file you already have (converted once to safetensors when it is a torch pickle)."""
    from models.hub.convert import import_model

    model = import_model(file, name, force=force)
    err.print(f"[green]ok[/] imported {file} as {model.name} ({model.kind}, {human_bytes(model.size)}) -> {model.path}")


@app.command()
def verify(names: list[str] = typer.Argument(None, help="Models to check (default: all present).")) -> None:
    """Re-check the sha256 of every file of the present models; exit 1 if any is corrupted."""
    from models.hub.cache import verify_models

    results = verify_models(names or None)
    bad = 0
    for name, problems in results.items():
        if problems:
            bad += 1
            out.print(f"[red]FAILED[/] {name}: " + "; ".join(problems), highlight=False)
        else:
            out.print(f"[green]ok[/] {name}", highlight=False)
    if not results:
        err.print("no models in the cache")
    if bad:
        err.print(f"{bad} model(s) failed: re-download them (`ldot models rm NAME` then `ldot models download NAME`)")
        raise typer.Exit(1)


@app.command()
def rm(
    name: str = typer.Argument(..., help="Model to delete from the cache."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a model from the cache."""
    from models.hub.cache import remove_model

    if not yes:
        typer.confirm(f"delete model {name!r} from the cache?", abort=True, err=True)
    path = remove_model(name)
    err.print(f"removed {path}")
