"""`ldot models`: list, download, import, verify and remove named checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

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
    from models.hub.catalogue import ModelEntry
    from models.hub.installed import LocalModel

app = typer.Typer(help="Named checkpoints in the cache: list, download, import, verify, rm.", no_args_is_help=True)


@app.command("list")
def list_models(json_: bool = typer.Option(False, "--json", help="Print a JSON list of the models instead.")) -> None:
    """Every named checkpoint: kind, source, size, licence, and whether it is present."""
    import json

    from rich import box
    from rich.table import Table

    rows = _model_rows()
    if json_:
        typer.echo(json.dumps(rows, ensure_ascii=False))
        return
    # names, kinds and licences never wrap; sizes wrap between words; the source column (long host names) only
    # when the terminal has room for it
    with_source = out.size.width >= 100 + max((len(str(r["name"])) - 28 for r in rows), default=0)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("name", "kind", "present", "licence"):
        table.add_column(column, no_wrap=True)
    table.add_column("size", min_width=7)
    if with_source:
        table.add_column("source", overflow="fold")
        table.add_column("where", no_wrap=True)
    styles = {"yes": "green", "no": "dim", "partial": "yellow", "damaged": "red"}
    for row in rows:
        cells = [cell(row["name"]), cell(row["kind"]), cell(row["present"], styles[str(row["present"])]),
                 cell(row["licence"] or "-"), cell(row["size"])]
        table.add_row(*cells, *([cell(row["source"]), cell(row["where"] or "-")] if with_source else []))
    out.print(table)
    if not with_source:
        err.print(line(("sources and where the files are: `ldot models list --json` (or a terminal of 100+ columns)",
                        "dim")))
    elif any(row["where"] == "hub cache" for row in rows):
        from models.core.home import models_dir
        from models.hub.hf_cache import hub_cache_dir

        err.print(line(("where: ldot = ", "dim"), models_dir(), ("; hub cache = the shared Hugging Face cache ", "dim"),
                       hub_cache_dir(), (" (linked from the ldot folder)", "dim")))
    for row in rows:
        if row["pending_bytes"] and row["present"] != "yes":
            err.print(line(row["name"], f": {human_bytes(row['pending_bytes'])} downloaded: `ldot models download "
                           f"{row['name']}` resumes"))
    for row in rows:
        if row["problem"]:
            err.print(line(row["name"], ": ", row["problem"], ": re-download it (`ldot models download NAME`) or "
                           "re-import it (`ldot models import FILE --as NAME`)"))


class _ModelRow(TypedDict):
    """One line of `ldot models list` (also its --json)."""

    name: str
    kind: str
    present: str  # yes | partial | no | damaged
    size: str  # human size
    bytes: int | None
    licence: str | None
    source: str
    path: str | None
    problem: str | None
    where: str | None
    pending_bytes: int


def _model_rows() -> list[_ModelRow]:
    """One dict per registry entry and per local model: name, kind, present (yes/partial/no), size (text),
    bytes (when present), licence, source, path (when present), where (ldot / hub cache: the shared Hugging Face
    cache, linked from the ldot folder), pending_bytes (what an interrupted download left to resume from)."""
    from models.hub.catalogue import list_pretrained
    from models.hub.installed import local_models

    local = {m.name: m for m in local_models()}
    rows: list[_ModelRow] = []

    def present(model: LocalModel | None) -> str:
        if model is None:
            return "no"
        return "damaged" if model.problem else "yes" if model.complete else "partial"

    for entry in list_pretrained():
        model = local.pop(entry.name, None)
        rows.append({"name": entry.name, "kind": entry.kind, "present": present(model),
                     "size": human_bytes(model.size) if model else entry.approx_size,
                     "bytes": model.size if model else None, "licence": entry.licence, "source": _source(entry),
                     "path": str(model.path) if model else None, "problem": model.problem if model else None,
                     "where": _where(model), "pending_bytes": _pending_bytes(entry)})
    for model in local.values():
        rows.append({"name": model.name, "kind": model.kind, "present": present(model),
                     "size": human_bytes(model.size), "bytes": model.size, "licence": None,
                     "source": f"local ({model.origin})", "path": str(model.path), "problem": model.problem,
                     "where": _where(model), "pending_bytes": 0})
    return rows


def _pending_bytes(entry: ModelEntry) -> int:
    """Bytes an interrupted download left (in the staging folder, or the shared hub cache's ``.part`` blobs):
    the next download resumes from them."""
    from models.hub.fetch import staging_dir
    from models.hub.hf_cache import parse_hub_url, repo_folder

    folder = staging_dir(entry.name)
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
    hub = parse_hub_url(entry.files[0].urls[0])
    if hub is not None:
        blobs = repo_folder(hub.repo) / "blobs"
        total += sum(p.stat().st_size for p in blobs.glob("*.part")) if blobs.is_dir() else 0
    return total


def _where(model: LocalModel | None) -> str | None:
    """Where a present model's files are: the ldot cache, or (linked from it) the shared Hugging Face cache."""
    if model is None:
        return None
    path = model.path
    linked = path.is_dir() and any(p.is_symlink() for p in path.iterdir())
    return "hub cache" if linked else "ldot"


def _source(entry: ModelEntry) -> str:
    """Where an entry comes from, short: ``hub:<repo>`` or the official host (+ mirrors)."""
    from models.hub.catalogue import HUB_PREFIX

    urls = entry.files[0].urls
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
    err.print(line(("ok", "green"), " ", name, " -> ", path))


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="A checkpoint you have: official .pt, detector .bin/.pkl, or a model dir."),
    name: str = typer.Option(..., "--as", help="Name to install it under (e.g. flickr-ft)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing model of that name."),
) -> None:
    """Install a checkpoint file you already have (converted once to safetensors when it is a torch pickle)."""
    from models.hub.convert import import_model

    model = import_model(file, name, force=force)
    err.print(line(("ok", "green"), " imported ", file, " as ", model.name, f" ({model.kind}, {human_bytes(model.size)}) -> ",
                   model.path))


@app.command()
def verify(names: list[str] = typer.Argument(None, help="Models to check (default: all present).")) -> None:
    """Re-check the sha256 of every file of the present models; exit 1 if any is corrupted."""
    from models.hub.installed import verify_models

    results = verify_models(names or None)
    if verify_report(results, "no models in the cache", "{n} model(s) failed: re-download them "
                     "(`ldot models rm NAME` then `ldot models download NAME`)"):
        raise typer.Exit(1)


@app.command()
def rm(
    name: str = typer.Argument(..., help="Model to delete from the cache."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    force: bool = typer.Option(False, "--force", help="Delete it even if an index was built with it."),
) -> None:
    """Delete a model from the cache (refused while an index uses it, unless --force)."""
    from ldot_cli.index.status import indexes_using
    from models.core.errors import LdotError
    from models.hub.installed import remove_model

    users = indexes_using(name)
    if users and not force:
        raise LdotError(f"model {name!r} is used by index {', '.join(map(repr, users))}: searching or updating it "
                        f"would need the model again (a download, or `ldot models import`); pass --force to delete "
                        "it anyway")
    if users:
        err.print(line(("warning: ", "bold yellow"), f"index {', '.join(map(repr, users))} will need model {name!r} "
                       "again"))
    if not yes:
        typer.confirm(safe(f"delete model {name!r} from the cache?"), abort=True, err=True)
    path = remove_model(name)
    err.print(line("removed ", path))
