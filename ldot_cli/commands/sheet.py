"""Showing results as pictures: `--html` (a self-contained contact sheet) and `--preview` (terminal)."""

from __future__ import annotations

import base64
import html
import io
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldot_cli.commands.console import err, line, out, safe

if TYPE_CHECKING:
    from PIL import Image

SHEET_THUMB = 320
PREVIEW_CELLS = 24  # preview width in terminal columns


def _thumb(path: bytes, size: int) -> Image.Image | None:
    """The oriented photo, shrunk to ``size`` (None when it cannot be read any more)."""
    from PIL import Image

    from feature_extraction.images.decode import load_image
    from models.core.errors import LdotError

    try:
        image = Image.fromarray(load_image(os.fsdecode(path)))
    except (OSError, LdotError):
        return None
    image.thumbnail((size, size))
    return image


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sheet_html(hits: list[Any], query: str | None) -> str:
    """A contact sheet: every result's thumbnail (embedded), rank, score, path and region boxes."""
    cards = []
    for hit in hits:
        image = _thumb(hit.path, SHEET_THUMB)
        name = hit.path.decode("utf-8", "backslashreplace")
        boxes = []
        for i, (x1, y1, x2, y2, weight) in enumerate(hit.regions or []):
            boxes.append(f'<div class="box{" second" if i else ""}" title="score drop without this box: '
                         f'{weight:.3f}" style="left:{100 * x1:.2f}%;top:{100 * y1:.2f}%;'
                         f'width:{100 * (x2 - x1):.2f}%;height:{100 * (y2 - y1):.2f}%"></div>')
        picture = (f'<img src="{_data_uri(image)}" alt="{html.escape(name)}">' if image is not None
                   else '<div class="gone">file not readable</div>')
        rerank = f" · re-rank {hit.rerank_score:.3f}" if hit.rerank_score is not None else ""
        cards.append(f'<figure class="card" data-rank="{hit.rank}"><div class="pic">{picture}{"".join(boxes)}</div>'
                     f'<figcaption><b>#{hit.rank}</b> score {hit.score:.3f}{rerank}'
                     f'<div class="path">{html.escape(name)}</div></figcaption></figure>')
    title = html.escape(f"ldot: {query}" if query else "ldot results")
    stamp = html.escape(time.strftime("%Y-%m-%d %H:%M"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 20px; background: #f7f7f5; color: #1d1f23; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 14px; }}
.card {{ margin: 0; background: #fff; border: 1px solid #d9dce1; border-radius: 10px; overflow: hidden; }}
.pic {{ position: relative; display: block; width: 100%; }}
.pic img {{ display: block; width: 100%; height: auto; }}
.box {{ position: absolute; border: 2px solid #e8590c; box-shadow: 0 0 0 1px rgba(255,255,255,.8); }}
.box.second {{ border-style: dashed; opacity: .8; }}
figcaption {{ padding: 6px 9px; }}
.path {{ color: #6b7280; font-size: 12px; word-break: break-all; }}
.gone {{ padding: 40px 10px; color: #6b7280; }}
</style></head><body>
<h1 style="font-size:18px">{title}</h1><p>{len(hits)} results · {stamp}</p>
<div class="grid">{"".join(cards) if cards else "<p>no good match</p>"}</div>
</body></html>
"""


def write_sheet(target: Path, hits: list[Any], query: str | None) -> None:
    from models.core.fileio import atomic_write_text

    atomic_write_text(target, sheet_html(hits, query))
    err.print(line("contact sheet: ", target))


def preview_table(hits: list[Any]) -> bool:
    """The results with a thumbnail each, drawn by textual-image (kitty graphics, sixel — which iTerm2 also
    speaks — or coloured half blocks). False when stdout is no terminal (or the library is missing): the
    caller prints the plain table."""
    from rich.table import Table
    from rich.text import Text

    if not out.is_terminal or not hits:
        return False
    try:
        from textual_image.renderable import Image as TerminalImage
    except ImportError:
        err.print("--preview needs the preview extra: pip install '.[preview]' in ldot's folder", markup=False)
        return False
    table = Table(box=None, pad_edge=False, show_header=True)
    table.add_column("preview", width=PREVIEW_CELLS)
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("path", overflow="fold")
    for hit in hits:
        image = _thumb(hit.path, 256)
        cell: Any = TerminalImage(image, width=PREVIEW_CELLS, height="auto") if image is not None else Text("-")
        table.add_row(cell, str(hit.rank), f"{hit.score:.3f}", Text(safe(hit.path.decode("utf-8", "backslashreplace"))))
    out.print(table)
    return True
