"""`ldot serve`: the web page and the JSON API over one index, with the models and the index kept warm.

Routes (all GET unless said)::

    /                 the page (static/index.html: one file, no build step)
    /api/info         index, model, image count, what the page can offer (re-ranking, auto threshold)
    /api/search       POST {q | id | sha256, k, rerank, rerank_k, reranker, min_score, regions}: results
    /thumb/<id>       the cached JPEG thumbnail of indexed image <id> (a vector id from a result)
    /photo/<id>       the full photo of indexed image <id>

Only indexed images are ever read: images are named by their vector id, never by a path. When the server
is bound to a non-loopback address every request must carry the access token (``?token=`` or the
``X-Ldot-Token`` header); on loopback the Host header must name the loopback (no DNS rebinding).

One query runs at a time (a lock around the `Searcher`); the index is re-read when a concurrent
`ldot index` changed it (a rebuilt index, another model: the searcher is reopened).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from ldot_cli.index.hits import hit_json
from ldot_cli.index.search import QueryError, Request, Searcher
from ldot_cli.index.store import DB_FILE, IndexStoreError, display_path
from models.core.errors import LdotError

STATIC = Path(__file__).parent / "static"
MAX_QUERY_CHARS = 10_000  # the text tower reads 512 word-pieces at most; longer is a mistake or an attack
MAX_BODY_BYTES = 64_000
MAX_K = 1000
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


@dataclass
class ServeState:
    """The warm searcher of one index, reopened when the index under it was rebuilt."""

    name: str
    model: str | None = None
    device: str = "auto"
    lock: threading.Lock = field(default_factory=threading.Lock)
    searcher: Searcher | None = None
    _identity: tuple[int, str | None] | None = None
    started: float = field(default_factory=time.time)
    answered: int = 0  # queries answered since start

    def _db_identity(self) -> tuple[int, str | None]:
        from ldot_cli.index.store import index_path

        inode = os.stat(index_path(self.name) / DB_FILE).st_ino
        fp = self.searcher.store.get_meta("model_fingerprint") if self.searcher is not None else None
        return inode, fp

    def get(self) -> Searcher:
        """The searcher (call with the lock held)."""
        if self.searcher is not None:
            try:
                current = self._db_identity()
            except OSError:
                current = None
            if current != self._identity:
                self.searcher.close()
                self.searcher = None
        if self.searcher is None:
            self.searcher = Searcher(self.name, model=self.model, device=self.device)
            self._identity = self._db_identity()
        return self.searcher

    def warm(self) -> None:
        with self.lock:
            searcher = self.get()
            searcher.encoder  # noqa: B018 - load the text tower now, not on the first query
            searcher.store.counts()

    def info(self) -> dict[str, Any]:
        from models.hub.cache import default_reranker

        with self.lock:
            searcher = self.get()
            counts = searcher.store.counts()
            stored = searcher.store.get_meta("regions") != "none" and (searcher.store.dir / "regions").is_dir()
            regions = searcher.has_boxes  # the page asks for boxes only where the index has them
            try:
                auto = searcher.auto_min_score()
            except LdotError:
                auto = None
            try:
                reranker = default_reranker() if stored else None
            except LdotError:
                reranker = None
            return {"index": self.name, "model": searcher.model_source, "images": counts.get("indexed", 0),
                    "vectors": counts.get("vectors", 0), "regions": regions,
                    "boxes_note": None if regions else searcher.no_boxes_reason(), "reranker": reranker,
                    "auto_min_score": auto, "max_query_chars": MAX_QUERY_CHARS, "answered": self.answered}

    def search(self, request: Request) -> dict[str, Any]:
        with self.lock:
            searcher = self.get()
            start = time.perf_counter()
            answer = searcher.answer(request)
            self.answered += 1
            total = 1000 * (time.perf_counter() - start)
            t = answer.timings
            note = searcher.no_boxes_reason() if request.regions and not searcher.has_boxes else None
            return {"hits": [hit_json(h) for h in answer.hits], "min_score": answer.min_score,
                    "no_match": answer.no_match, "below": answer.below, "boxes_note": note,
                    "timings": {"encode_ms": round(t.encode_ms, 2), "search_ms": round(t.search_ms, 2),
                                "rerank_ms": round(t.rerank_ms, 2),
                                "regions_ms": round(t.extra.get("regions_ms", 0.0), 2), "total_ms": round(total, 2)}}

    def image_file(self, vector_id: int) -> tuple[str, bytes]:
        """(content hash, path) of an indexed image whose file still exists; QueryError when none."""
        with self.lock:
            searcher = self.get()
            hashes = searcher.store.content_hashes([vector_id])
            paths = searcher.store.paths_for_vectors([vector_id]).get(vector_id, [])
        if vector_id not in hashes:
            raise QueryError(f"no indexed image has id {vector_id}")
        for path in paths:
            if os.path.isfile(path):
                return hashes[vector_id], path
        raise QueryError(f"the file of image {vector_id} is gone")

    def close(self) -> None:
        with self.lock:
            if self.searcher is not None:
                self.searcher.close()
                self.searcher = None


class SearchBody(BaseModel):
    """One query of the API: exactly one of q, id and sha256."""

    q: str | None = Field(None, max_length=MAX_QUERY_CHARS)
    id: int | None = Field(None, ge=0)
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    k: int = Field(10, ge=1, le=MAX_K)
    rerank: bool = False
    rerank_k: int = Field(50, ge=1, le=MAX_K)
    reranker: str | None = Field(None, max_length=200)
    min_score: str | float | None = Field(None, max_length=32)
    regions: bool = False


def create_app(state: ServeState, token: str | None = None, host: str = "127.0.0.1") -> Any:
    """The ASGI app. ``token``: required on every request (a non-loopback bind)."""
    app = FastAPI(title="ldot", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next: Any) -> Any:
        if token is not None:
            given = request.headers.get("x-ldot-token") or request.query_params.get("token") or ""
            if not secrets.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "missing or wrong access token: open the URL `ldot serve` printed"},
                                    status_code=403)
        elif is_loopback(host):
            hostname = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
            if hostname not in LOOPBACK:
                return JSONResponse({"error": f"unexpected Host {hostname!r}"}, status_code=403)
        length = request.headers.get("content-length")
        if length is None and request.method not in ("GET", "HEAD"):  # a chunked body of any size: no
            return JSONResponse({"error": "Content-Length required"}, status_code=411)
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"error": f"request too large (at most {MAX_BODY_BYTES} bytes)"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(LdotError)
    async def ldot_error(request: HttpRequest, exc: LdotError) -> Any:
        status = 404 if isinstance(exc, QueryError) and "not in the index" in str(exc) else 400
        if isinstance(exc, IndexStoreError):
            status = 503
        raw = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
        # "error": for people; "raw": with the option markers, so `ldot search` names its own flags
        return JSONResponse({"error": " ".join(str(exc).split()), "raw": raw}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, exc: HTTPException) -> Any:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: HttpRequest, exc: RequestValidationError) -> Any:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                             for e in exc.errors()[:3])
        return JSONResponse({"error": f"bad request: {problems}"}, status_code=422)

    @app.get("/")
    def page() -> Any:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                                     "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                     "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"})

    @app.get("/api/info")
    def info() -> Any:
        return state.info()

    @app.post("/api/search")
    def search(body: SearchBody) -> Any:
        given = [x for x in (body.q, body.id, body.sha256) if x is not None]
        if len(given) != 1:
            raise QueryError("give exactly one of q (text), id (an indexed image) and sha256")
        request = Request(text=body.q, vector_id=body.id, image_sha256=body.sha256, k=body.k,
                          rerank_k=body.rerank_k if body.rerank else None, reranker=body.reranker,
                          min_score=body.min_score, regions=body.regions)
        return state.search(request)

    def _image(vector_id: int) -> tuple[str, bytes]:
        try:
            return state.image_file(vector_id)
        except QueryError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/thumb/{vector_id}")
    def thumb(vector_id: int) -> Any:
        from ldot_cli.index.store import index_path
        from ldot_cli.index.thumbs import thumbnail

        digest, path = _image(vector_id)
        try:
            data = thumbnail(index_path(state.name), digest, os.fsdecode(path))
        except (OSError, LdotError) as exc:
            raise HTTPException(404, f"cannot read image {vector_id}: {exc}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/photo/{vector_id}")
    def photo(vector_id: int) -> Any:
        from ldot_cli.index.thumbs import browser_image

        _, path = _image(vector_id)
        try:
            data, kind = browser_image(os.fsdecode(path))
        except (OSError, LdotError) as exc:
            raise HTTPException(404, f"cannot read image {vector_id}: {exc}") from None
        return Response(data, media_type=kind, headers={
            "Content-Disposition": f"inline; filename*=UTF-8''{_quote(display_path(path))}"})

    return app


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(os.path.basename(path), safe="")
