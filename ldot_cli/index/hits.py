"""A search result, and its JSON forms (kept free of numpy and torch: `ldot search` through a running
`ldot serve` imports only this)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any


def display_path(path: bytes) -> str:
    """A printable form of any path (undecodable bytes as \\xNN)."""
    return path.decode("utf-8", "backslashreplace")


@dataclass
class Hit:
    rank: int
    path: bytes
    score: float
    vector_id: int
    rerank_score: float | None = None
    # the boxes that most drive the score: (x1, y1, x2, y2 as fractions of width/height, score drop)
    regions: list[tuple[float, float, float, float, float]] | None = None
    size: tuple[int, int] | None = None  # (width, height) of the photo as shown, when regions are known

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "path": display_path(self.path), "score": round(self.score, 6)}
        if self.rerank_score is not None:
            out["rerank_score"] = round(self.rerank_score, 6)
        if self.regions is not None:
            out["regions"] = self.pixel_regions()
        return out

    def pixel_regions(self) -> list[list[float]]:
        """``[[x1, y1, x2, y2, weight], ...]`` in pixels of the photo as shown (EXIF orientation applied)."""
        width, height = self.size or (1, 1)
        return [[round(x1 * width, 1), round(y1 * height, 1), round(x2 * width, 1), round(y2 * height, 1),
                 round(weight, 6)] for x1, y1, x2, y2, weight in self.regions or []]



def hit_json(hit: Hit) -> dict[str, Any]:
    """A result as `ldot serve`'s API returns it: what `--json` prints, plus what the page and the CLI need."""
    out = hit.to_json()
    out["score"] = hit.score  # unrounded: the CLI rounds what it prints exactly as it would locally
    if hit.rerank_score is not None:
        out["rerank_score"] = hit.rerank_score
    out["id"] = hit.vector_id
    out["path_b64"] = base64.b64encode(hit.path).decode("ascii")  # any bytes the OS allows, exactly
    if hit.regions is not None:
        out["boxes"] = [list(r) for r in hit.regions]  # fractions of width/height + weight
        out["size"] = list(hit.size) if hit.size else None
    return out


def hit_from_json(data: dict[str, Any]) -> Hit:
    """The inverse of `hit_json` (the CLI rebuilds the results a server sent)."""
    regions = data.get("boxes")
    size = data.get("size")
    return Hit(int(data["rank"]), base64.b64decode(data["path_b64"]), float(data["score"]), int(data["id"]),
               data.get("rerank_score"), [tuple(r) for r in regions] if regions is not None else None,
               tuple(size) if size else None)
