"""The one HTTP downloader of ldot (model checkpoints, dataset files, per-image requests).

Each file streams into ``<name>.part`` beside its destination, so nothing half-written is ever at the final
path. An interrupted transfer resumes with an HTTP Range request (in the same run after a short back-off, or in
the next run from the ``.part`` left behind); a server that ignores the range restarts the file cleanly. The
size and sha256 are checked (the published ones, or the ones recorded at the first verified download: trust on
first use, in ``<home>/known_hashes.json``); only then is the file fsynced and renamed into place. Mirrors are
tried in order. A resumed answer must continue the part file (its Content-Range starts where the part ends, and
its total is the published size), else the file restarts from zero; a body is bounded by the published size (or
`Limits.max_unknown_bytes` when no length is known), and a minimum rate and an overall deadline (`Limits`) give
up on a server that trickles. `download_many` runs several small requests at once (e.g. COCO's per-image URLs) and reports
one aggregate byte count. Progress goes through `models.core.progress` (unit ``bytes``).
"""

from __future__ import annotations

import json
import os
import re
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
from models.core.home import known_hashes_path
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


@dataclass(frozen=True)
class Limits:
    """What one file's download may cost before it is given up (`LIMITS` is the default).

    ``max_unknown_bytes``: the most a body may hold when neither a published size nor the server's length
    says how long it is (with one, the body may not exceed it). ``min_bytes_per_s`` over each
    ``rate_window_s``: a server slower than that (e.g. one byte every 2 s, which no socket time-out notices)
    is timed out, and the transfer resumes or goes to the next mirror. ``deadline_s``: the whole download
    (every retry and mirror) is given up after that many seconds.
    """

    max_unknown_bytes: int = 16 << 30
    min_bytes_per_s: float = 1024.0
    rate_window_s: float = 60.0
    deadline_s: float = 6 * 3600.0


LIMITS = Limits()


class _NotFound(Exception):
    pass


class _Truncated(Exception):
    def __init__(self, got: int, want: int) -> None:
        super().__init__(f"stopped at {got} of {want} bytes")
        self.got, self.want = got, want


class _TooSlow(TimeoutError):
    """Fewer bytes than the minimum rate in a window: a time-out (transient: resumed, then the next mirror)."""


class _Refused(Exception):
    """The server's answer cannot be the file: the part file is deleted, the mirror not retried."""


class _Deadline(Exception):
    """The file's overall deadline passed."""


class _Restart(Exception):
    """A resumed answer that does not continue the part file: the part is deleted and the file restarts from 0."""


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


# ------------------------------------------------------------------------------------------ known hashes
def known_hash(key: str) -> str | None:
    try:
        value = json.loads(known_hashes_path().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def record_hash(key: str, sha256: str) -> None:
    """Remember the sha256 of a first verified download (trust on first use)."""
    from filelock import FileLock

    path = known_hashes_path()
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
    if isinstance(exc, (_Truncated, _TooSlow, _Refused, _Restart, _Deadline)):
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
    if isinstance(exc, (_Truncated, _Restart)):
        return True
    if isinstance(exc, (_Refused, _Deadline)):
        return False
    if isinstance(exc, urllib.error.URLError):
        inner = exc.reason
        return isinstance(inner, (TimeoutError, socket.timeout, ConnectionResetError))
    return isinstance(exc, (TimeoutError, socket.timeout, ConnectionResetError, ConnectionAbortedError))


def _fetch(url: str, part: Path, on_bytes: Callable[[int, int | None], None], timeout: float,
           headers: Mapping[str, str], size: int | None = None, limits: Limits = LIMITS,
           deadline: float = float("inf")) -> int | None:
    """Stream ``url`` into ``part``, resuming what is there. Returns the total size the server announced.

    A 206 is appended only when its Content-Range starts where the part file ends and its total agrees with the
    published ``size``; the body is bounded (``size``, else the announced total, else ``limits.max_unknown_bytes``),
    and read as it arrives so that the minimum rate and the ``deadline`` (a `time.monotonic` time) hold."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch, if the part file is the whole file the server has
            match = re.fullmatch(r"bytes\s+\*/(\d+)\s*", exc.headers.get("Content-Range", "") if exc.headers else "")
            if match and int(match.group(1)) == have and size in (None, have):
                return have
            part.unlink(missing_ok=True)
            raise _Restart(f"answered 416 with {exc.headers.get('Content-Range') if exc.headers else None!r} to a "
                           f"part file of {have:,} bytes") from None
        if exc.code == 404:
            raise _NotFound(url) from None
        raise
    with response:
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.strip().isdigit() else None
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                part.unlink(missing_ok=True)
                raise _Restart(f"asked for bytes from {have:,}, answered "
                               f"{response.headers.get('Content-Range') or 'no Content-Range'!r}")
            first, last = int(match.group(1)), int(match.group(2))
            total = int(match.group(3)) if match.group(3) != "*" else (have + length if length is not None else None)
            if last < first or (total is not None and last >= total) or \
                    (length is not None and length != last - first + 1):
                part.unlink(missing_ok=True)
                raise _Restart(f"answered an inconsistent range {response.headers.get('Content-Range')!r}")
            mode = "ab"
        else:  # 200: the server ignored the range, start over
            have = 0
            total = length
            mode = "wb"
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise _Refused(f"announced {total:,} bytes, expected {size:,}")
        bound = size if size is not None else total if total is not None else limits.max_unknown_bytes
        with open(part, mode) as handle:
            done = have
            on_bytes(done, total)
            window_start, window_bytes = time.monotonic(), done
            while block := response.read1(min(CHUNK, bound - done + 1)):
                done += len(block)
                if done > bound:
                    handle.close()
                    part.unlink(missing_ok=True)
                    raise _Refused(f"sent more than {bound:,} bytes")
                handle.write(block)
                on_bytes(done, total)
                now = time.monotonic()
                if now > deadline:
                    raise _Deadline(f"{done:,} bytes written when the {limits.deadline_s:g}-second deadline passed")
                if now - window_start >= limits.rate_window_s:
                    rate = (done - window_bytes) / (now - window_start)
                    if rate < limits.min_bytes_per_s:
                        raise _TooSlow(f"too slow ({rate:,.0f} bytes/s, under {limits.min_bytes_per_s:,.0f})")
                    window_start, window_bytes = now, done
            handle.flush()
            os.fsync(handle.fileno())
    if total is not None and done < total:
        raise _Truncated(done, total)
    return total


def download_file(urls: Iterable[str], dest: Path, sha256: str | None = None, size: int | None = None,
                  progress: ProgressFn | None = None, hash_key: str | None = None, timeout: float = 30.0,
                  retries: int = 3, backoff: float = 0.5, headers: Mapping[str, str] | None = None,
                  stage: str | None = None, record: bool = True, limits: Limits | None = None) -> str:
    """Download to ``dest`` via ``dest.part``: resume, retry, verify, rename. Returns the sha256.

    ``urls`` are mirrors tried in order; on each, a transient failure (time-out, reset, truncated transfer,
    HTTP 5xx/429) is retried ``retries`` times after ``backoff * 2**n`` seconds, resuming from the bytes
    already written. ``hash_key`` names the file in the known-hashes record: with no published ``sha256``, a
    recorded one is checked, or (``record``) the first verified download records it. A file of the wrong size or
    sha256 is deleted (never installed) and the next mirror is tried; with none left, `DownloadError`.
    ``limits`` (default `LIMITS`) bounds a body of unknown length, the minimum rate and the overall deadline.
    """
    limits = limits or LIMITS
    deadline = time.monotonic() + limits.deadline_s
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
        if time.monotonic() > deadline:
            failures.append(f"{url} (not tried: the {limits.deadline_s:g}-second deadline passed)")
            continue
        for attempt in range(retries + 1):
            try:
                total = _fetch(url, part, on_bytes, timeout, headers or {}, size, limits, deadline)
                error = None
                break
            except _NotFound:
                error = _NotFound(url)
                break
            except (urllib.error.URLError, OSError, TimeoutError, _Truncated, _Restart, _Refused, _Deadline,
                    ValueError) as exc:
                error = exc
                if not _transient(exc) or attempt == retries or time.monotonic() > deadline:
                    break
                if not isinstance(exc, _Restart):  # a restart from zero needs no pause
                    time.sleep(backoff * 2 ** attempt)
        if isinstance(error, _NotFound):
            failures.append(f"{url} (HTTP 404 Not Found)")
            continue
        if isinstance(error, _Refused):
            bad.append(f"{url} {error}")
            failures.append(f"{url} ({error}; deleted)")
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
