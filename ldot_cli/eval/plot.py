"""`ldot eval --plot FILE.png`: recall@K both ways (bi-encoder, re-ranked, published) and the speed-ups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.core.errors import LdotError, option


def plot_report(report: dict[str, Any], target: Path) -> Path:
    """Draw an `EvalReport.to_dict()` into a PNG: two recall@K panels and one speed-up panel."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LdotError(f"{option('plot')} needs matplotlib: pip install '.[plot]' in ldot's folder") from None

    series = [("bi-encoder (ours)", report["recall"], "-", "o")]
    series += [(f"re-rank top {m}", rec, "-", "s") for m, rec in report["rerank"].items()]
    if report.get("published"):
        series.append((f"published: {report['published']['setting']}", report["published"], "--", "^"))
    timing = report["timing"]
    bars = []
    if timing.get("speedup"):
        bars.append(("bi-encoder", timing["speedup"]))
    bars += [(f"re-rank top {m}", s) for m, s in (timing.get("rerank_speedup") or {}).items() if s]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1, 1, 0.9]})
    for ax, direction, title in ((axes[0], "text_to_image", "text → image"),
                                 (axes[1], "image_to_text", "image → text")):
        for label, rec, style, marker in series:
            points = sorted((int(str(k).lstrip("r")), v) for k, v in rec[direction].items())  # "r1": 69.9, ...
            ax.plot([k for k, _ in points], [v for _, v in points], style, marker=marker, label=label)
        ax.set_title(f"{title} recall@K")
        ax.set_xlabel("K")
        ax.set_ylabel("recall (%)")
        ax.set_xticks([1, 5, 10])
        ax.grid(alpha=0.3)
        ax.set_ylim(top=100)
    axes[0].legend(fontsize=8, loc="lower right")
    ax = axes[2]
    if bars:
        names = [b[0] for b in bars]
        values = [b[1] for b in bars]
        ax.bar(names, values, color=["#e8590c"] + ["#868e96"] * (len(bars) - 1))
        ax.set_yscale("log")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.0f}x" if v >= 10 else f"{v:.2g}x", ha="center", va="bottom", fontsize=9)
        ax.set_title("speed-up over the cross-encoder alone")
        ax.set_ylabel("times faster (log)")
        ax.tick_params(axis="x", labelrotation=15)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, f"no speed-up measured\n(give {option('reranker')} to time the cross-encoder)", ha="center",
                va="center", transform=ax.transAxes)
    split = {"1k": "1K (5 folds)", "test": "test", "val": "val"}.get(report["split"], report["split"])
    fig.suptitle(f"{report['dataset']} {split}: {report['num_images']:,} images, {report['num_captions']:,} "
                 f"captions · model {report['model']}")
    fig.tight_layout()
    target = Path(target)
    try:
        fig.savefig(target, dpi=110)
    except OSError as exc:
        raise LdotError(f"cannot write the plot to {target}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return target
