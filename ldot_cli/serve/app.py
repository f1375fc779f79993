"""`ldot serve`: the web page and the JSON API over one index, with the models and the index kept warm.

Routes (all GET unless said)::

    /                 the page (static/index.html: one file, no build step)
    /api/info         index, model, image count, what the page can offer (re-ranking, auto threshold)
    /api/search       POST {q | id | sha256, k, rerank, rerank_k, reranker, min_score, regions}: results
    /api/regions      POST {q | id | sha256, ids, of}: the boxes driving those results' scores (asked for after
                      the results: seconds per image on a CPU, so the page gets them on demand; ``of``: the
                      size of the grid they belong to, so each gets the same attribution effort either way)
    /thumb/<id>       the cached JPEG thumbnail of indexed image <id> (a vector id from a result)
    /photo/<id>       the full photo of indexed image <id>

Only indexed images are ever read: images are named by their vector id, never by a path. When the server
is bound to a non-loopback address every request must carry the access token (``?token=`` or the
``X-Ldot-Token`` header); on loopback the Host header must name the loopback (no DNS rebinding).

One query runs at a time (a lock around the `Searcher`); the index is re-read when a concurrent
`ldot index` changed it (a rebuilt index, another model: the searcher is reopened).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException
from fastapi import Path as UrlPart
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, Field

from ldot_cli.index.catalogue import FileRow
from ldot_cli.index.hits import display_path
from ldot_cli.index.layout import DB_FILE, IndexStoreError
from ldot_cli.index.search import QueryError, Request, Searcher
from models.core.errors import LdotError

STATIC = Path(__file__).parent / "static"
MAX_QUERY_CHARS = 10_000  # the text tower reads 512 word-pieces at most; longer is a mistake or an attack
MAX_BODY_BYTES = 64_000
MAX_K = 1000
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_ID = 2**63 - 1  # vector ids are SQLite integers: a larger one cannot name an image (and overflows SQLite)
MAX_MIN_SCORE_CHARS = 32
MAX_REGION_IDS = 50  # results whose boxes one /api/regions request may ask for


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def host_name(header: str) -> str:
    """The name in a Host header, without its port (``[::1]:80`` -> ``::1``)."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def names_loopback(hostname: str, bound: str) -> bool:
    """A Host a loopback server answers: the loopback names, the address it is bound to, or any literal
    loopback address (127.0.0.2...). A DNS name that merely resolves to 127.0.0.1 (DNS rebinding) is not."""
    if hostname in LOOPBACK or hostname == bound:
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


@dataclass
class ServeState:
    """The warm searcher of one index, reopened when the index under it was rebuilt."""

    name: str
    model: str | None = None
    device: str = "auto"
    reranker: str | None = None  # `ldot serve --reranker`: the one a request may name besides the catalogue's
    lock: threading.Lock = field(default_factory=threading.Lock)
    searcher: Searcher | None = None
    _identity: tuple[int, str | None] | None = None
    started: float = field(default_factory=time.time)
    answered: int = 0  # queries answered since start
    region_images: int = 0  # images whose boxes were found, and the time it took: the page says the cost
    region_ms: float = 0.0

    def _db_identity(self) -> tuple[int, str | None]:
        from ldot_cli.index.layout import index_path

        inode = os.stat(index_path(self.name) / DB_FILE).st_ino
        fp = self.searcher.store.meta.model_fingerprint if self.searcher is not None else None
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
        from models.hub.installed import default_reranker

        with self.lock:
            searcher = self.get()
            counts = searcher.store.counts()
            regions = searcher.has_boxes  # the page asks for boxes only where the index has them
            try:
                auto = searcher.auto_min_score()
            except LdotError:
                auto = None
            try:
                reranker = self.reranker or default_reranker(regions=searcher.has_regions)
            except LdotError:
                reranker = None
            return {"index": self.name, "model": searcher.model_source, "images": counts.get("indexed", 0),
                    "vectors": counts.get("vectors", 0), "regions": regions,
                    "boxes_note": None if regions else searcher.no_boxes_reason(), "reranker": reranker,
                    "auto_min_score": auto, "max_query_chars": MAX_QUERY_CHARS, "answered": self.answered,
                    "regions_ms_per_image": self.region_ms / self.region_images if self.region_images else None,
                    "max_region_ids": MAX_REGION_IDS}

    def search(self, request: Request) -> dict[str, Any]:
        with self.lock:
            searcher = self.get()
            start = time.perf_counter()
            answer = searcher.answer(request)
            self.answered += 1
            total = 1000 * (time.perf_counter() - start)
            data = answer.to_json()
            data["timings"]["total_ms"] = round(total, 2)
            data["boxes_note"] = searcher.no_boxes_reason() if request.regions and not searcher.has_boxes else None
            return data

    def regions(self, request: Request, ids: list[int], of: int | None = None) -> dict[str, Any]:
        """The boxes of some results (`Searcher.regions_of`), keyed by id, with what they cost."""
        with self.lock:
            searcher = self.get()
            start = time.perf_counter()
            hits = searcher.regions_of(request, ids, of)
            total = 1000 * (time.perf_counter() - start)
            spent = searcher.timings.extra.get("regions_ms", 0.0)
            if hits:
                self.region_images += len(hits)
                self.region_ms += spent
            out = {str(j["id"]): {"boxes": j.get("boxes"), "size": j.get("size")} for j in (h.api_json() for h in hits)}
            return {"regions": out, "timings": {"encode_ms": round(searcher.timings.encode_ms, 2),
                                                "regions_ms": round(spent, 2), "total_ms": round(total, 2),
                                                "per_image_ms": round(spent / len(hits), 2) if hits else None}}

    def _indexed(self, vector_id: int) -> tuple[str, list[FileRow]]:
        with self.lock:
            searcher = self.get()
            hashes = searcher.store.content_hashes([vector_id])
            rows = searcher.store.indexed_files(vector_id)
        if vector_id not in hashes:
            raise QueryError(f"no indexed image has id {vector_id}")
        return hashes[vector_id], rows

    def current_file(self, vector_id: int) -> tuple[str, FileRow]:
        """(content hash, file row) of an indexed image whose file still has the stamp (size, mtime) it was
        indexed with; QueryError when none has."""
        digest, rows = self._indexed(vector_id)
        for row in rows:
            try:
                info = os.stat(row.path)
            except OSError:
                continue
            if _stamp_matches(row, info):
                return digest, row
        raise QueryError(_gone(vector_id, rows))

    def image_bytes(self, vector_id: int) -> tuple[str, FileRow, bytes]:
        """(content hash, file row, bytes) of an indexed image: only bytes read from a file whose stamp still
        matches its row and whose sha256 is the indexed content hash (a file replaced, or a symlink swapped
        in, since it was indexed is never served); QueryError when no file of the image qualifies."""
        digest, rows = self._indexed(vector_id)
        for row in rows:
            data = _read_indexed(row)
            if data is not None and hashlib.sha256(data).hexdigest() == digest:
                return digest, row, data
        raise QueryError(_gone(vector_id, rows))

    def check_reranker(self, name: str | None) -> str | None:
        """The re-ranker a request may use: a catalogue cross-encoder's name or the server's own (a request never
        names a folder or file: any loopback client could make the server load anything)."""
        from models.hub.catalogue import RERANKERS

        if name is None or name == self.reranker:
            return self.reranker
        if name in RERANKERS:
            return name
        allowed = ", ".join(dict.fromkeys([*(x for x in (self.reranker,) if x), *RERANKERS]))
        raise HTTPException(422, f"bad request: reranker {name[:60]!r} is not one this server offers ({allowed})")

    def close(self) -> None:
        with self.lock:
            if self.searcher is not None:
                self.searcher.close()
                self.searcher = None


def _min_score(value: Any) -> Any:
    """``min_score``: a finite JSON number, a short string ("auto", "0.3"), or null; anything else is a 422
    (NaN, Infinity and 1e400 parse as non-finite floats; a bool is not a number)."""
    if value is None or isinstance(value, str) and len(value) <= MAX_MIN_SCORE_CHARS:
        return value
    if isinstance(value, str):
        raise ValueError(f"at most {MAX_MIN_SCORE_CHARS} characters")  # noqa: TRY004 - pydantic wants ValueError
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ValueError("must be a finite number")
        return number
    raise ValueError("must be a number, 'auto' or null")


VectorId = Annotated[int, UrlPart(ge=0, le=MAX_ID)]


class SearchBody(BaseModel):
    """One query of the API: exactly one of q, id and sha256."""

    q: str | None = Field(None, max_length=MAX_QUERY_CHARS)
    id: int | None = Field(None, ge=0, le=MAX_ID)
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    k: int = Field(10, ge=1, le=MAX_K)
    rerank: bool = False
    rerank_k: int = Field(50, ge=1, le=MAX_K)
    reranker: str | None = Field(None, max_length=200)
    min_score: Annotated[str | float | None, BeforeValidator(_min_score)] = None
    regions: bool = False


class RegionsBody(BaseModel):
    """The boxes of some results of one query: exactly one of q, id and sha256, and the results' ids."""

    q: str | None = Field(None, max_length=MAX_QUERY_CHARS)
    id: int | None = Field(None, ge=0, le=MAX_ID)
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    ids: list[Annotated[int, Field(ge=0, le=MAX_ID)]] = Field(..., min_length=1, max_length=MAX_REGION_IDS)
    of: int | None = Field(None, ge=1, le=MAX_K)  # the size of the grid these results are part of


def _one_query(body: SearchBody | RegionsBody) -> None:
    if sum(x is not None for x in (body.q, body.id, body.sha256)) != 1:
        raise QueryError("give exactly one of q (text), id (an indexed image) and sha256")


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
            hostname = host_name(request.headers.get("host") or "")
            if not names_loopback(hostname, host):
                return JSONResponse({"error": f"unexpected Host {hostname!r}"}, status_code=403)
        wanted = request.headers.get("x-ldot-index")  # `ldot search` names the index it means
        if wanted is not None and wanted != state.name:
            return JSONResponse({"error": f"this server serves index {state.name!r}, not {wanted!r}"},
                                status_code=409)
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
        _one_query(body)
        request = Request(text=body.q, vector_id=body.id, image_sha256=body.sha256, k=body.k,
                          rerank_k=body.rerank_k if body.rerank else None,
                          reranker=state.check_reranker(body.reranker),
                          min_score=body.min_score, regions=body.regions)
        return state.search(request)

    @app.post("/api/regions")
    def regions(body: RegionsBody) -> Any:
        _one_query(body)
        return state.regions(Request(text=body.q, vector_id=body.id, image_sha256=body.sha256), body.ids, body.of)

    def _missing(exc: QueryError) -> HTTPException:
        return HTTPException(404, str(exc))

    @app.get("/thumb/{vector_id}")
    def thumb(vector_id: VectorId) -> Any:
        from ldot_cli.index.layout import index_path
        from ldot_cli.index.thumbs import thumbnail

        try:
            digest, row = state.current_file(vector_id)
            data = thumbnail(index_path(state.name), digest, lambda: state.image_bytes(vector_id)[2],
                             name=display_path(row.path))
        except QueryError as exc:
            raise _missing(exc) from None
        except (OSError, ValueError, LdotError) as exc:
            raise HTTPException(404, f"cannot read image {vector_id}: {exc}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/photo/{vector_id}")
    def photo(vector_id: VectorId) -> Any:
        from ldot_cli.index.thumbs import browser_image

        try:
            _, row, raw = state.image_bytes(vector_id)
            data, kind = browser_image(raw, display_path(row.path))
        except QueryError as exc:
            raise _missing(exc) from None
        except (OSError, ValueError, LdotError) as exc:
            raise HTTPException(404, f"cannot read image {vector_id}: {exc}") from None
        return Response(data, media_type=kind, headers={
            "Content-Disposition": f"inline; filename*=UTF-8''{_quote(display_path(row.path))}"})

    return app


def _stamp_matches(row: FileRow, info: os.stat_result | None) -> bool:
    return (info is not None and stat.S_ISREG(info.st_mode) and info.st_size == row.size
            and info.st_mtime_ns == row.mtime_ns)


def _read_indexed(row: FileRow) -> bytes | None:
    """The bytes of an indexed file, read through one open descriptor whose stamp matches the row (so what is
    checked is what is read); None when the file is gone, changed or not a regular file."""
    try:
        fd = os.open(row.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO swapped in must not block
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not _stamp_matches(row, os.fstat(fd)):
            return None
        data = handle.read(row.size + 1)
    return data if len(data) == row.size else None


def _gone(vector_id: int, rows: list[FileRow]) -> str:
    if not rows:
        return f"the file of image {vector_id} is gone"
    return (f"the file of image {vector_id} is gone or changed since it was indexed: run `ldot index` on its "
            "folder again")


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(os.path.basename(path), safe="")
