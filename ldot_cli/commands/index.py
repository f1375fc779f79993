"""`ldot index` and `ldot status`."""

from __future__ import annotations

from pathlib import Path

import typer

from ldot_cli.commands.console import (
    StageProgress,
    download_progress,
    err,
    human_bytes,
    out,
    progress_bar,
)


def register(app: typer.Typer) -> None:
    app.command("index")(index)
    app.command("status")(status)


def index(
    paths: list[str] = typer.Argument(..., help="Folders (or files) of images to index; with --ray also file "
                                                "lists (.txt) and webdataset shards (shards/{00000..00099}.tar), "
                                                "local or fsspec URLs."),
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
    index_type: str = typer.Option(None, "--index-type", help="exact, ivf or ivfpq (OPQ + IVF-PQ, re-scored "
                                                               "exactly from fp16 on disk); default: chosen from the "
                                                               "image count and --memory-budget."),
    memory_budget: str = typer.Option(None, "--memory-budget", help="RAM the vector index may take (e.g. 8GB); "
                                                                     "default: half of this machine's."),
    ray: str = typer.Option(None, "--ray", is_flag=False, flag_value="local", metavar="[ADDRESS]",
                            help="Run the models on a Ray cluster: --ray (a local Ray instance), --ray auto (the "
                                 "cluster this machine belongs to) or --ray HOST:PORT. Put it after PATHS."),
    ray_actors: int = typer.Option(None, "--ray-actors", help="Model copies on the cluster (default: one per GPU, "
                                                              "or per --ray-cpus-per-actor cores)."),
    ray_cpus_per_actor: int = typer.Option(None, "--ray-cpus-per-actor", help="Cores per model copy on CPU-only "
                                                                              "clusters."),
    ray_shard_size: int = typer.Option(None, "--ray-shard-size", help="Images per model call and output shard "
                                                                      "(default: 256 on GPUs, 32 on CPUs)."),
    shards_dir: str = typer.Option(None, "--shards-dir", help="Where workers write output shards (a shared folder "
                                                              "or fsspec URL; default: the index's shards/)."),
) -> None:
    """Index the images under PATHS (incremental and resumable: re-run it after adding photos)."""
    from ldot_cli.index.indexer import Indexer
    from models.hub.catalogue import DEFAULT_BI_ENCODER
    from models.hub.fetch import ensure_model

    with progress_bar("bytes", transient=True) as bar:
        for needed in (detector, model or DEFAULT_BI_ENCODER):
            ensure_model(needed, download_progress(bar))
    mode = None if ann is None else ("ivf" if ann else "exact")
    if index_type is not None:
        from ldot_cli.index.ann import KINDS

        if index_type not in (*KINDS, "auto"):
            raise typer.BadParameter(f"{index_type!r}: use one of auto, {', '.join(KINDS)}", param_hint="--index-type")
        mode = index_type
    budget = None
    if memory_budget is not None:
        from ldot_cli.index.ann import parse_bytes

        try:
            budget = parse_bytes(memory_budget)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--memory-budget") from None
    with progress_bar() as bar:
        kwargs = dict(model=model, detector=detector, preset=preset, keep_regions=not no_regions, device=device,
                      batch_size=batch_size, num_workers=workers, progress=StageProgress(bar, "images"), ann=mode)
        if ray is None:
            indexer = Indexer(name, **kwargs)
            if budget is not None:
                indexer.memory_budget = budget
            report = indexer.run([str(p) for p in paths], excludes=exclude, reindex=reindex)
        else:
            from ldot_cli.index.distributed import RayIndexer, RayOptions

            options = RayOptions(address=ray, actors=ray_actors, cpus_per_actor=ray_cpus_per_actor,
                                 shard_size=ray_shard_size, shards_dir=shards_dir)
            indexer = RayIndexer(name, ray_options=options, **kwargs)
            if budget is not None:
                indexer.memory_budget = budget
            report = indexer.run_sources(list(paths), excludes=exclude, reindex=reindex)
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
                "vectors", "search", "index_type", "factory", "recall_at_10", "bytes_per_image", "shards", "bytes",
                "region_bytes_per_image", "updated"):
        value = info.get(key)
        if key in ("bytes", "region_bytes_per_image", "bytes_per_image") and value is not None:
            value = human_bytes(value)
        if key == "recall_at_10" and value is not None:
            value = f"{value:.3f}" + (" (exact search)" if info.get("index_type") == "exact" else
                                      " (vs exact, on a sample, at build time)")
        out.print(f"[bold]{key:>22}[/]  {value if value is not None else '-'}", highlight=False)
    for path, reason in info.get("errors", []):
        out.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False, markup=True)
