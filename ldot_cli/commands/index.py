"""`ldot index` and `ldot status`."""

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


def register(app: typer.Typer) -> None:
    app.command("index")(index)
    app.command("status")(status)


def index(
    paths: list[Path] = typer.Argument(..., help="Folders (or files) of images to index."),
    name: str = typer.Option("default", "--name", "-n", help="Name of the index."),
    model: str = typer.Option(None, help="Bi-encoder (registry name, model dir or .pt); default: the index's, "
                                         "else flickr-ft."),
    detector: str = typer.Option("butd-r101-vg", help="Region detector weights (registry name or path)."),
    preset: str = typer.Option("uniter", help="Box selection: uniter (10-100 boxes) or lxmert36 (36 boxes)."),
    exclude: list[str] = typer.Option([], "--exclude", "-x", help="Glob of paths to leave out (repeatable)."),
    no_regions: bool = typer.Option(False, "--no-regions", help="Do not keep region features (no --rerank later)."),
    reindex: bool = typer.Option(False, "--reindex", help="Start the index over (e.g. with another --model)."),
    ann: bool = typer.Option(None, "--ann/--exact", help="Force approximate (IVF) or exact search; default: "
                                                           "exact up to 250,000 images."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try unchanged files that failed before again."),
    batch_size: int = typer.Option(8, help="Images per detector batch."),
    workers: int = typer.Option(2, help="Image-decoding processes."),
    device: str = typer.Option("auto", help="auto (GPU when present), cpu or cuda."),
) -> None:
    """Index the images under PATHS (incremental and resumable: re-run it after adding photos)."""
    from ldot_cli.index.indexer import Indexer
    from models.hub.catalogue import DEFAULT_BI_ENCODER
    from models.hub.fetch import ensure_model

    with progress_bar("bytes", transient=True) as bar:
        for needed in (detector, model or DEFAULT_BI_ENCODER):
            ensure_model(needed, ProgressView(bar))
    with progress_bar() as bar:
        indexer = Indexer(name, model=model, detector=detector, preset=preset, keep_regions=not no_regions,
                          device=device, batch_size=batch_size, num_workers=workers, progress=ProgressView(bar),
                          ann=None if ann is None else ("ivf" if ann else "exact"))
        report = indexer.run([str(p) for p in paths], excludes=exclude, reindex=reindex)
    err.print(f"[bold]{report.name}[/]: {report.found} images found; {report.encoded} encoded, {report.reused} "
              f"reused (same content), {report.unchanged} unchanged, {report.removed} removed, "
              f"{len(report.skipped)} skipped; {report.vectors} in the index ({report.elapsed_s:.1f} s)")
    if report.skipped:
        err.print(f"see why with `ldot status --name {name} --errors`")


def status(
    name: str = typer.Option(None, "--name", "-n", help="Index to describe (default: list them all)."),
    errors: bool = typer.Option(False, "--errors", help="List the skipped files and why."),
    json_: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Counts, model, size on disk and skipped files of the indexes."""
    import json

    from ldot_cli.index.status import describe_index, list_indexes

    if name is None and not errors:
        rows = list_indexes()
        if json_:
            out.print_json(json.dumps(rows))
            return
        if not rows:
            err.print("no indexes yet: create one with `ldot index FOLDER`")
            return
        from rich.table import Table

        table = Table()
        for column in ("name", "images", "skipped", "model", "size"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["name"], str(row["indexed"]), str(row["skipped"]), row["model"] or "-",
                          human_bytes(row["bytes"]))
        out.print(table)
        return
    info = describe_index(name or "default", with_errors=errors)
    if json_:
        out.print_json(json.dumps(info))
        return
    for key in ("name", "path", "model", "model_fingerprint", "detector", "preset", "indexed", "skipped",
                "vectors", "search", "bytes", "region_bytes_per_image", "updated"):
        value = info.get(key)
        if key in ("bytes", "region_bytes_per_image") and value is not None:
            value = human_bytes(value)
        out.print(f"[bold]{key:>22}[/]  {value if value is not None else '-'}", highlight=False)
    for path, reason in info.get("errors", []):
        out.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False, markup=True)
