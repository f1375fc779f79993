"""Training curves of a run: per-step losses (each task) and validation recalls, from ``<run>/log.jsonl``, to a PNG.

matplotlib is an optional extra (``pip install '.[plot]' in ldot's folder``); it draws off-screen (the Agg backend).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.core.errors import LdotError

PLOT_FILE = "curves.png"


def read_log(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, validation records) of a run's ``log.jsonl``."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise LdotError(f"{run_dir} has no log.jsonl: is it a training run (`ldot train ... --out NAME` writes "
                        "<home>/runs/NAME)?")
    steps: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise LdotError(f"{path}:{number} is not valid JSON") from None
        event = record.get("event", "eval")
        if event in ("eval", "step"):  # other lines (e.g. the hard-negative decisions) are not curves
            (evals if event == "eval" else steps).append(record)
    return steps, evals


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves; returns the PNG's path (default ``<run>/curves.png``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LdotError("drawing curves needs matplotlib: pip install '.[plot]' in ldot's folder") from None
    from models.core.fileio import atomic_write_bytes

    run_dir = Path(run_dir)
    steps, evals = read_log(run_dir)
    if not steps and not evals:
        raise LdotError(f"{run_dir / 'log.jsonl'} is empty: the run has not finished a step yet")
    fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(12, 4.5))
    tasks = sorted({t for r in steps for t in r.get("tasks", {})})
    window = max(1, len(steps) // 50)
    for task in tasks:
        xs = [r["step"] for r in steps if task in r.get("tasks", {})]
        ys = [r["tasks"][task] for r in steps if task in r.get("tasks", {})]
        ax_loss.plot(xs, _smooth(ys, window), label=task)
    if steps and not tasks:
        ax_loss.plot([r["step"] for r in steps], _smooth([r["loss"] for r in steps], window), label="loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"loss (mean of {window} steps)" if window > 1 else "loss")
    ax_loss.set_title("training loss")
    if steps:
        ax_lr = ax_loss.twinx()
        ax_lr.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="grey", linestyle=":", label="lr")
        ax_lr.set_ylabel("learning rate")
    ax_loss.legend(loc="upper right")
    if evals:
        xs = [r["step"] for r in evals]
        ax_recall.plot(xs, [r["mean_recall"] for r in evals], marker="o", label="mean recall")
        for direction, short in (("text_to_image", "t2i"), ("image_to_text", "i2t")):
            ax_recall.plot(xs, [r[direction].get("r1", 0.0) for r in evals], marker=".",
                           linestyle="--", label=f"{short} R@1")
        ax_recall.legend(loc="lower right")
    else:
        ax_recall.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax_recall.transAxes)
    ax_recall.set_xlabel("step")
    ax_recall.set_ylabel("recall (%)")
    ax_recall.set_title("validation")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    target = Path(out) if out is not None else run_dir / PLOT_FILE
    atomic_write_bytes(target, buffer.getvalue())
    return target
