"""What a query is: a `Request` as `ldot search` and `ldot serve` take it, and the error for one that cannot be
answered as given."""

from __future__ import annotations

from dataclasses import dataclass

from models.core.errors import LdotError


class QueryError(LdotError):
    """A query that cannot be answered as given (empty, unreadable image…)."""


@dataclass
class Request:
    """One query, as `ldot search` and `ldot serve` take it: text, or an image (a file, an indexed image's id
    or content hash), with its options."""

    text: str | None = None
    image_path: str | None = None
    vector_id: int | None = None
    image_sha256: str | None = None
    k: int = 10
    rerank_k: int | None = None  # re-rank the top M (text queries only)
    reranker: str | None = None
    min_score: str | float | None = None  # a number or "auto"
    regions: bool = False
