"""`ldot extract`: region features of image files into a UNITER image DB (resumable)."""

from __future__ import annotations

from pathlib import Path

import typer

from ldot_cli.commands.console import (
    ProgressView,
    err,
    line,
    progress_bar,
)


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)


def extract(
    paths: list[Path] = typer.Argument(..., help="Image files and folders."),
    out: Path = typer.Option(..., "--out", "-o", help="Image DB folder (UNITER layout); re-run to resume."),
    preset: str = typer.Option("uniter", help="uniter (UNITER's cut: boxes with confidence > 0.2, at least 10, at most 100) or lxmert36 (36 boxes)."),
    detector: str = typer.Option("butd-r101-vg", help="Detector weights (registry name, folder or file)."),
    soft_labels: bool = typer.Option(False, "--soft-labels", help="Also store the 1601-class soft labels (pre-training)."),
    batch_size: int = typer.Option(4, help="Images per detector batch (and per committed transaction)."),
    workers: int = typer.Option(2, help="Image-decoding processes."),
    device: str = typer.Option("auto", help="auto (GPU when present), cpu or cuda."),
    half: bool = typer.Option(
        False, "--half",
        help="fp16 on a GPU: faster, but not the reference features (fp16 storage moved features by up to 4% and "
             "changed up to 40% of the uniter boxes of an image: benchmarks/extract.py --half-fidelity)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try files that failed before again."),
) -> None:
    """Extract Bottom-Up-Attention region features into OUT (readable by UNITER/LightningDOT tooling)."""
    from feature_extraction.detector.weights import open_detector
    from feature_extraction.pipeline import extract_to_db
    from feature_extraction.uniter_db import resolve_cut
    from models.hub.fetch import ensure_model

    resolve_cut(preset)  # before any download
    with progress_bar("bytes", transient=True) as bar:
        ensure_model(detector, ProgressView(bar))
    model = open_detector(detector, device, half)
    with progress_bar() as bar:
        report = extract_to_db([str(p) for p in paths], out, model, preset, batch_size=batch_size,
                               num_workers=workers, with_soft_labels=soft_labels, retry_failed=retry_failed,
                               progress=ProgressView(bar))
    err.print(line(f"{report.written} images written to ", report.db_path, f", {report.skipped_existing} already "
                   f"there, {report.failed} failed, {report.skipped_known_bad} known-bad skipped "
                   f"({report.elapsed_s:.1f} s)"))
    for failure in report.failures[:20]:
        err.print(line(("failed", "yellow"), " ", failure.path, ": ", failure.reason))
    if report.failed > 20:
        err.print(line(f"… and {report.failed - 20} more: see ", f"{report.db_path}.failed.json"))
