"""The one HTTP downloader of ldot (model checkpoints, dataset files, per-image requests).

Each file streams into ``<name>.part`` beside its destination, so nothing half-written is ever at the final
path. An interrupted transfer resumes with an HTTP Range request (in the same run after a short back-off, or in
the next run from the ``.part`` left behind); a server that ignores the range restarts the file cleanly. The
size and sha256 are checked (the published ones, or the ones recorded at the first verified download: trust on
first use, in ``<home>/known_hashes.json``); only then is the file fsynced and renamed into place. Mirrors are
tried in order. `download_many` runs several small requests at once (e.g. COCO's per-image URLs) and reports
one aggregate byte count. Progress goes through `models.core.progress` (unit ``bytes``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from models.core.errors import DownloadError
from models.core.fileio import atomic_write_text, replace_file, sha256_file
from models.core.home import ldot_home
from models.core.progress import ProgressFn, report

CHUNK = 1 << 20
USER_AGENT = "ldot (+https://github.com/ldot)"
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class UnreachableError(DownloadError):
    """No mirror served the file; ``failures`` says what each URL answered."""

    def __init__(self, filename: str, failures: list[str], part: Path | None = None) -> None:
        kept = ""
        if part is not None and part.is_file() and part.stat().st_size:
            kept = f"; {part.stat().st_size} bytes kept in {part}: run the same command again to resume"
        super().__init__(f"could not download {filename}: tried " + "; ".join(failures) + kept)
        self.failures = failures
        self.kept = kept  # "; N bytes kept in X.part: run the same command again to resume", or ""
        self.not_found = bool(failures) and all(f.endswith("(HTTP 404 Not Found)") for f in failures)


class _NotFound(Exception):
    pass


class _Truncated(Exception):
    def __init__(self, got: int, want: int) -> None:
        super().__init__(f"stopped at {got} of {want} bytes")
        self.got, self.want = got, want


# ------------------------------------------------------------------------------------------ known hashes
def _known_hashes_path() -> Path:
    return ldot_home() / "known_hashes.json"


def known_hash(key: str) -> str | None:
    try:
        value = json.loads(_known_hashes_path().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def record_hash(key: str, sha256: str) -> None:
    """Remember the sha256 of a first verified download (trust on first use)."""
    from filelock import FileLock

    path = _known_hashes_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = sha256
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------ one file
def reason(exc: BaseException) -> str:
    """A few words for why a request failed (for one-line messages)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, _Truncated):
        return str(exc)
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, socket.gaierror):
        return "no network (host name not resolved)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    return str(exc) or type(exc).__name__


def _transient(exc: BaseException) -> bool:
    """Worth another try after a pause: time-outs, resets, truncation, 5xx/429 (not 4xx, not a dead host)."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in RETRY_STATUS
    if isinstance(exc, _Truncated):
        return True
    if isinstance(exc, urllib.error.URLError):
        inner = exc.reason
        return isinstance(inner, (TimeoutError, socket.timeout, ConnectionResetError))
    return isinstance(exc, (TimeoutError, socket.timeout, ConnectionResetError, ConnectionAbortedError))


def _fetch(url: str, part: Path, on_bytes: Callable[[int, int | None], None], timeout: float,
           headers: Mapping[str, str]) -> int | None:
    """Stream ``url`` into ``part``, resuming what is there. Returns the total size the server announced."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the part file is already whole
            return have
        if exc.code == 404:
            raise _NotFound(url) from None
        raise
    with response:
        length = response.headers.get("Content-Length")
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            total = (int(content_range.rsplit("/", 1)[-1]) if "/" in content_range and not content_range.endswith("*")
                     else (have + int(length) if length else None))
            mode = "ab"
        else:  # 200: the server ignored the range, start over
            have = 0
            total = int(length) if length else None
            mode = "wb"
        with open(part, mode) as handle:
            done = have
            on_bytes(done, total)
            while block := response.read(CHUNK):
                handle.write(block)
                done += len(block)
                on_bytes(done, total)
            handle.flush()
            os.fsync(handle.fileno())
    if total is not None and done < total:
        raise _Truncated(done, total)
    return total


def download_file(urls: Iterable[str], dest: Path, sha256: str | None = None, size: int | None = None,
                  progress: ProgressFn | None = None, hash_key: str | None = None, timeout: float = 30.0,
                  retries: int = 3, backoff: float = 0.5, headers: Mapping[str, str] | None = None,
                  stage: str | None = None, record: bool = True) -> str:
    """Download to ``dest`` via ``dest.part``: resume, retry, verify, rename. Returns the sha256.

    ``urls`` are mirrors tried in order; on each, a transient failure (time-out, reset, truncated transfer,
    HTTP 5xx/429) is retried ``retries`` times after ``backoff * 2**n`` seconds, resuming from the bytes
    already written. ``hash_key`` names the file in the known-hashes record: with no published ``sha256``, a
    recorded one is checked, or (``record``) the first verified download records it. A file of the wrong size or
    sha256 is deleted (never installed) and the next mirror is tried; with none left, `DownloadError`.
    """
    urls = list(urls)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    expected = sha256 or (known_hash(hash_key) if hash_key else None)
    label = stage or dest.name
    failures: list[str] = []
    bad: list[str] = []

    def on_bytes(done: int, total: int | None) -> None:
        report(progress, label, done, size or total, "bytes")

    for url in urls:
        total: int | None = None
        error: BaseException | None = None
        for attempt in range(retries + 1):
            try:
                total = _fetch(url, part, on_bytes, timeout, headers or {})
                error = None
                break
            except _NotFound:
                error = _NotFound(url)
                break
            except (urllib.error.URLError, OSError, TimeoutError, _Truncated, ValueError) as exc:
                error = exc
                if not _transient(exc) or attempt == retries:
                    break
                time.sleep(backoff * 2 ** attempt)
        if isinstance(error, _NotFound):
            failures.append(f"{url} (HTTP 404 Not Found)")
            continue
        if error is not None:
            failures.append(f"{url} ({reason(error)})")
            continue
        got = part.stat().st_size
        want = size or total
        if want is not None and got != want:
            part.unlink()
            bad.append(f"{url} served {got} bytes, expected {want}")
            failures.append(f"{url} (wrong size: {got} bytes, expected {want}; deleted)")
            continue
        digest = sha256_file(part)
        if expected and digest != expected:
            part.unlink()
            bad.append(f"{url} served sha256 {digest[:12]}…, expected {expected[:12]}…")
            failures.append(f"{url} (sha256 {digest[:12]}…, expected {expected[:12]}…: corrupt or changed; deleted)")
            continue
        replace_file(part, dest)
        if hash_key and not expected and record:
            record_hash(hash_key, digest)
        return digest
    if bad and len(bad) == len(failures):
        raise DownloadError(f"{dest.name}: " + "; ".join(bad) + ": the file is corrupt or was changed; "
                            "deleted, nothing installed")
    raise UnreachableError(dest.name, failures, part)


# ------------------------------------------------------------------------------------------ many files
@dataclass(frozen=True)
class Job:
    """One file of a `download_many` batch."""

    urls: tuple[str, ...]
    dest: Path
    sha256: str | None = None
    size: int | None = None


@dataclass
class BatchResult:
    """What `download_many` did: sha256 of every file fetched, and what failed (dest -> reason)."""

    digests: dict[Path, str] = field(default_factory=dict)
    failures: dict[Path, DownloadError] = field(default_factory=dict)


def download_many(jobs: Sequence[Job], progress: ProgressFn | None = None, stage: str = "download",
                  workers: int = 8, expected_bytes: int | None = None, timeout: float = 30.0, retries: int = 3,
                  backoff: float = 0.5, headers: Mapping[str, str] | None = None) -> BatchResult:
    """Fetch ``jobs`` with ``workers`` requests at once (each as `download_file`, without recording hashes).

    Progress is ONE stage: bytes fetched over ``expected_bytes`` (an estimate when the sizes are not published),
    with ``info={"files": done, "of": len(jobs)}``. Files already at their destination are skipped. Failures
    do not stop the batch; they are returned.
    """
    lock = threading.Lock()
    state = {"bytes": 0, "files": 0}
    seen: dict[Path, int] = {}
    todo = [j for j in jobs if not j.dest.is_file()]
    state["files"] = len(jobs) - len(todo)
    result = BatchResult()

    def tick(job: Job) -> ProgressFn:
        def callback(p: object) -> None:
            with lock:
                done = getattr(p, "done", 0)
                state["bytes"] += done - seen.get(job.dest, 0)
                seen[job.dest] = done
                snapshot = state["bytes"], state["files"]
            report(progress, stage, snapshot[0], expected_bytes, "bytes", files=snapshot[1], of=len(jobs))
        return callback

    def one(job: Job) -> tuple[Job, str]:
        return job, download_file(job.urls, job.dest, job.sha256, job.size, tick(job), timeout=timeout,
                                  retries=retries, backoff=backoff, headers=headers, record=False)

    report(progress, stage, 0, expected_bytes, "bytes", event="start", files=state["files"], of=len(jobs))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(one, job): job for job in todo}
        for future in as_completed(futures):
            job = futures[future]
            try:
                _, digest = future.result()
                result.digests[job.dest] = digest
            except DownloadError as exc:
                result.failures[job.dest] = exc
            with lock:
                state["files"] += 1
                snapshot = state["bytes"], state["files"]
            report(progress, stage, snapshot[0], expected_bytes, "bytes", files=snapshot[1], of=len(jobs))
    report(progress, stage, state["bytes"], state["bytes"] if not result.failures else expected_bytes, "bytes",
           event="done", files=state["files"], of=len(jobs))
    return result
