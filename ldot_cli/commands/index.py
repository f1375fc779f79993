"""`ldot index` and `ldot status`."""

from __future__ import annotations

import os
from typing import Any

import typer
from typer.core import TyperCommand

from ldot_cli.commands.console import (
    ProgressView,
    cell,
    err,
    human_bytes,
    interactive,
    line,
    out,
    progress_bar,
    safe,
)
from models.core.errors import LdotError


class _IndexCommand(TyperCommand):
    """`ldot index PATHS...`, and `ldot index rm NAME [--folder DIR]` (a folder literally named rm: `./rm`)."""

    _rm: Any = None

    @property
    def commands(self) -> dict[str, Any]:
        """The `rm` sub-command (so help clean-ups that walk sub-commands reach it too)."""
        if self._rm is None:
            self._rm = typer.main.get_command(_rm_app)
        return {"rm": self._rm}

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        if args[:1] == ["rm"]:
            return self.commands["rm"].make_context(f"{info_name} rm", args[1:], parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        if ctx.command is not self:
            return ctx.command.invoke(ctx)
        return super().invoke(ctx)


def register(app: typer.Typer) -> None:
    app.command("index", cls=_IndexCommand,
                epilog="Remove an index: `ldot index rm NAME`; drop one folder from it: "
                       "`ldot index rm NAME --folder DIR`.")(index)
    app.command("status")(status)


_rm_app = typer.Typer(add_completion=False)


@_rm_app.command()
def index_rm(
    name: str = typer.Argument(..., help="Name of the index (see `ldot status`)."),
    folder: list[str] = typer.Option([], "--folder", "-f", help="Only drop the files under this folder from the "
                                                                "index (repeatable; also a file list, a tar shard or "
                                                                "a tar SOURCE indexed with --ray); the index stays."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (asked in a terminal only)."),
) -> None:
    """Remove an index, or drop folders from it (their vectors and region features go with them)."""
    from ldot_cli.index.hits import display_path
    from ldot_cli.index.indexer import remove_folder, remove_index

    if not folder:
        if not yes and interactive():
            _confirm_removal(name)
        path = remove_index(name)
        from ldot_cli.serve.client import stop_server

        stop_server(name)  # its server (a background one, say) goes with it, and its files
        err.print(line(f"removed index {name!r} (", display_path(os.fsencode(path)), ")"))
        return
    for one in folder:
        dropped = remove_folder(name, one)
        err.print(line(name, f": dropped {dropped} files under ", one, " from the index"))


def _say_what_a_rerun_reuses(name: str) -> None:
    """After Ctrl-C: nothing committed is lost; say what the same command, run again, reuses."""
    from feature_extraction.errors import ImageDBError
    from ldot_cli.index.indexer import resumable

    try:
        images, extracted = resumable(name)
    except (LdotError, ImageDBError, OSError):
        return
    more = (f", and the regions of {extracted:,} more are extracted (it encodes them without the detector)"
            if extracted else "")
    err.print(line(f"stopped: index {name!r} keeps the {images:,} images already in it (a re-run does not redo "
                   f"them){more}; run the same command again to do the rest"))


def _confirm_removal(name: str) -> None:
    """Ask before deleting a whole index (its size said), in a terminal."""
    from ldot_cli.index.status import describe_index

    try:
        info = describe_index(name)
    except LdotError:
        return  # no such index: `remove_index` says so
    typer.confirm(safe(f"delete index {name!r} ({info.get('indexed') or 0:,} images, "
                       f"{human_bytes(info.get('bytes') or 0)}, {info.get('path')})?"), abort=True, err=True)


def index(
    paths: list[str] = typer.Argument(..., help="Folders (or files) of images to index; with --ray also file "
                                                "lists (.txt) and webdataset shards (shards/{00000..00099}.tar), "
                                                "local or fsspec URLs."),
    name: str = typer.Option("default", "--name", "-n", help="Name of the index."),
    model: str = typer.Option(None, help="Bi-encoder (registry name, model dir, .pt, or hf:ORG/NAME for a CLIP or "
                                         "SigLIP hub repository); default: the index's, else flickr-ft when it is "
                                         "in the cache, else clip-vit-b32."),
    detector: str = typer.Option(None, help="Region detector weights (registry name or path); default: the "
                                            "index's, else butd-r101-vg."),
    preset: str = typer.Option(None, help="Box selection: uniter (10-100 boxes) or lxmert36 (36 boxes); default: "
                                          "the index's, else uniter."),
    exclude: list[str] = typer.Option([], "--exclude", "-x", help="Glob of paths to leave out (repeatable)."),
    no_regions: bool = typer.Option(False, "--no-regions", help="Do not keep region features (no --rerank later)."),
    regions: bool = typer.Option(False, "--regions", help="Also extract and keep region features with the detector "
                                                         "for a model that reads pixels (CLIP, SigLIP), for a region "
                                                         "cross-encoder (UNITER, LXMERT)."),
    reindex: bool = typer.Option(False, "--reindex", help="Start the index over (e.g. with another --model)."),
    ann: bool = typer.Option(None, "--ann/--exact", help="Force approximate (IVF) or exact search; default: "
                                                           "exact up to 250,000 images."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try files skipped by earlier runs again, "
                                                                    "even unchanged ones."),
    batch_size: int = typer.Option(8, min=1, help="Images per detector batch."),
    workers: int = typer.Option(2, min=0, help="Image-decoding processes."),
    device: str = typer.Option("auto", help="auto (GPU when present), cpu or cuda."),
    index_type: str = typer.Option(None, "--index-type", help="exact, ivf or ivfpq (OPQ + IVF-PQ, re-scored "
                                                               "exactly from fp16 on disk); default: chosen from the "
                                                               "image count and --memory-budget."),
    memory_budget: str = typer.Option(None, "--memory-budget", help="RAM the vector index may take (e.g. 8GB); "
                                                                     "default: half of this machine's."),
    ray: bool = typer.Option(False, "--ray", help="Run the models on a Ray cluster (a local Ray instance unless "
                                                   "--ray-address says which)."),
    ray_address: str = typer.Option(None, "--ray-address", metavar="ADDRESS",
                                    help="The Ray cluster for --ray (implies it): auto (the cluster this machine "
                                         "belongs to), HOST:PORT, or local (the default: a Ray instance started "
                                         "for this run)."),
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
    from feature_extraction.uniter_db import resolve_cut
    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions
    from models.core.errors import LdotError
    from models.hub.fetch import ensure_model

    if regions and no_regions:
        raise LdotError("choose one of --regions and --no-regions")
    if preset is not None:
        resolve_cut(preset)  # cheap checks before anything is created or downloaded
    mode = None if ann is None else ("ivf" if ann else "exact")
    if index_type is not None:
        from models.core.ann import KINDS

        if index_type not in (*KINDS, "auto"):
            raise typer.BadParameter(f"{index_type!r}: use one of auto, {', '.join(KINDS)}", param_hint="--index-type")
        mode = index_type
    budget = None
    if memory_budget is not None:
        from models.core.ann import parse_bytes

        try:
            budget = parse_bytes(memory_budget)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--memory-budget") from None
    ray_options = None
    if ray or ray_address is not None:
        from ldot_cli.index.options import LOCAL, RayOptions

        ray_options = RayOptions(address=ray_address or LOCAL, actors=ray_actors, cpus_per_actor=ray_cpus_per_actor,
                                 shard_size=ray_shard_size, shards_dir=shards_dir)
    options = IndexOptions(model=model, detector=detector, preset=preset,
                           keep_regions=False if no_regions else True if regions else None,  # None: the model's way
                           device=device, batch_size=batch_size, num_workers=workers, ann=mode, memory_budget=budget,
                           ray=ray_options)
    with progress_bar() as bar:
        indexer = Indexer(name, options, progress=ProgressView(bar))
        # inputs first: nothing to fetch for a typo
        plan = indexer.plan([str(p) for p in paths], excludes=exclude)
        needed = indexer.needed_models(reindex)
    if indexer.model_reason is not None:  # a new index given no --model: which one, and why
        err.print(line("model: ", (indexer.choices(reindex)[0], "bold"), " (", indexer.model_reason, "; choose another with --model)"))
    with progress_bar("bytes", transient=True) as bar:
        for model_name in needed:
            ensure_model(model_name, ProgressView(bar))
    try:
        with progress_bar() as bar:
            indexer.progress = ProgressView(bar)
            report = indexer.run(paths, excludes=exclude, reindex=reindex, retry_failed=retry_failed, plan=plan)
    except KeyboardInterrupt:
        _say_what_a_rerun_reuses(name)
        raise
    new_skips = f" ({len(report.skipped)} this run)" if report.skipped and report.skipped_before else ""
    err.print(line((report.name, "bold"), f": {report.found} images found; {report.encoded} encoded, "
                   f"{report.reused} reused (same content), {report.unchanged} unchanged, {report.removed} removed, "
                   f"{report.skipped_total} skipped{new_skips}; {report.images} images in the index "
                   f"({report.elapsed_s:.1f} s)"))
    if report.skipped_total:
        err.print(line(f"see why with `ldot status --name {name} --errors`"
                       + ("; try them again with --retry-failed" if report.skipped_before else "")))


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
            table.add_row(cell(row["name"]), cell(row["indexed"]), cell(row["skipped"]), cell(row["model"]),
                          cell(human_bytes(row["bytes"])))
        out.print(table)
        return
    info = describe_index(name or "default", with_errors=errors)
    if json_:
        out.print_json(json.dumps(info))
        return
    for key in ("name", "path", "model", "model_fingerprint", "detector", "preset", "indexed", "skipped",
                "vectors", "search", "index_type", "factory", "nprobe", "recall_at_10", "bytes_per_image", "parts", "shards",
                "bytes",
                "region_bytes_per_image", "updated"):
        value = info.get(key)
        if key in ("bytes", "region_bytes_per_image", "bytes_per_image") and value is not None:
            value = human_bytes(value)
        if key == "recall_at_10" and value is not None:
            value = f"{value:.3f}" + (" (exact search)" if info.get("index_type") == "exact" else
                                      " (vs exact, on a sample, at build time)")
        out.print(line((f"{key:>22}", "bold"), "  ", "-" if value is None else value))
    for i, folder in enumerate(info["folders"]):
        label = "folders" if i == 0 else ""
        counts = f"{folder['indexed']} indexed" + (f", {folder['skipped']} skipped" if folder["skipped"] else "")
        out.print(line((f"{label:>22}", "bold"), "  ", folder["path"], f" ({counts})"))
    for path, reason in info.get("errors", []):
        out.print(line(("skipped", "yellow"), " ", path, ": ", reason))
