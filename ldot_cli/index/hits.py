"""A search result and an answer to one query, with their JSON forms: what `ldot serve`'s API sends and what
`ldot search` rebuilds from it (kept free of numpy and torch: `ldot search` through a running `ldot serve` imports
only this)."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass, field
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

    def api_json(self) -> dict[str, Any]:
        """The result as `ldot serve`'s API returns it: what `--json` prints, plus what the page and the CLI
        need (`from_api_json` reads it back)."""
        out = self.to_json()
        out["score"] = self.score  # unrounded: the CLI rounds what it prints exactly as it would locally
        if self.rerank_score is not None:
            out["rerank_score"] = self.rerank_score
        out["id"] = self.vector_id
        out["path_b64"] = base64.b64encode(self.path).decode("ascii")  # any bytes the OS allows, exactly
        if self.regions is not None:
            out["boxes"] = [list(r) for r in self.regions]  # fractions of width/height + weight
            out["size"] = list(self.size) if self.size else None
        return out

    @classmethod
    def from_api_json(cls, data: Any) -> Hit:
        """The result a server sent (`api_json`); ValueError when ``data`` is not one."""
        if not isinstance(data, dict):
            raise ValueError("a result is not a JSON object")
        try:
            path = base64.b64decode(str(data["path_b64"]), validate=True)
            boxes, size, rerank = data.get("boxes"), data.get("size"), data.get("rerank_score")
            regions: Any = None if boxes is None else [tuple(_numbers(box, 5, _number)) for box in boxes]
            shown: Any = tuple(_numbers(size, 2, _integer)) if size else None
            return cls(_integer(data["rank"]), path, _number(data["score"]), _integer(data["id"]),
                       None if rerank is None else _number(rerank), regions, shown)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a result without a usable {exc}") from None


@dataclass
class QueryTimings:
    """Where one query's time went (milliseconds); ``extra``: parts only some queries have (``regions_ms``)."""

    encode_ms: float = 0.0
    search_ms: float = 0.0
    rerank_ms: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, float]:
        out = {"encode_ms": self.encode_ms, "search_ms": self.search_ms, "rerank_ms": self.rerank_ms,
               "regions_ms": 0.0, **self.extra}
        return {key: round(value, 2) for key, value in out.items()}

    @classmethod
    def from_json(cls, data: Any) -> QueryTimings:
        if not isinstance(data, dict):
            raise ValueError("timings are not a JSON object")
        times = {str(key): _number(value) for key, value in data.items()}
        return cls(times.pop("encode_ms", 0.0), times.pop("search_ms", 0.0), times.pop("rerank_ms", 0.0), times)


@dataclass
class Answer:
    """The results of one query as `ldot search` prints them and `ldot serve` returns them."""

    hits: list[Hit]
    min_score: float | None  # the level applied (auto resolved), None when none
    timings: QueryTimings
    below: int = 0  # results dropped by min_score

    @property
    def no_match(self) -> bool:
        return self.min_score is not None and not self.hits

    def to_json(self) -> dict[str, Any]:
        """The answer of `ldot serve`'s ``/api/search`` (`from_json` reads it back)."""
        return {"hits": [h.api_json() for h in self.hits], "min_score": self.min_score, "no_match": self.no_match,
                "below": self.below, "timings": self.timings.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> Answer:
        """The answer a server sent; ValueError when ``data`` is not one (the caller searches itself instead)."""
        if not isinstance(data, dict) or not isinstance(data.get("hits"), list):
            raise ValueError("an answer without a list of results")
        level = data.get("min_score")
        return cls([Hit.from_api_json(h) for h in data["hits"]], None if level is None else _number(level),
                   QueryTimings.from_json(data.get("timings", {})), _integer(data.get("below", 0)))


def _number(value: Any) -> float:
    """A finite JSON number (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"not a finite number: {str(value)[:40]!r}")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not an integer: {str(value)[:40]!r}")
    return value


def _numbers(values: Any, count: int, kind: Callable[[Any], Any]) -> list[Any]:
    if not isinstance(values, list) or len(values) != count:
        raise ValueError(f"not a list of {count} numbers: {str(values)[:60]!r}")
    return [kind(v) for v in values]
