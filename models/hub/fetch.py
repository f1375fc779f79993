"""Downloads that resume, verify and never leave a bad file at the final path.

Each file streams into ``<name>.part`` beside its destination; an interrupted download resumes with an
HTTP Range request; the size and sha256 are checked (the published ones, or the ones recorded at the
first verified download); only then is the file fsynced and renamed into place atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from models.core.errors import DownloadError
from models.core.fileio import atomic_write_text, replace_file, sha256_file
from models.core.home import ldot_home, models_dir
from models.core.progress import ProgressFn, report
from models.hub.cache import model_path, read_manifest, record_model, write_manifest
from models.hub.catalogue import (
    TOKENIZER_FILES,
    ModelEntry,
    RemoteFile,
    expand_url,
    get_entry,
)

CHUNK = 1 << 20
USER_AGENT = "ldot (+https://github.com/ldot)"


class _NotFound(Exception):
    pass


class UnreachableError(DownloadError):
    """No mirror served the file; ``failures`` says what each URL answered."""

    def __init__(self, filename: str, failures: list[str]) -> None:
        super().__init__(f"could not download {filename}: tried " + "; ".join(failures))
        self.failures = failures
        self.not_found = bool(failures) and all(f.endswith("(HTTP 404 Not Found)") for f in failures)


def _known_hashes_path() -> Path:
    return ldot_home() / "known_hashes.json"


def known_hash(key: str) -> str | None:
    try:
        return json.loads(_known_hashes_path().read_text()).get(key)
    except (OSError, ValueError):
        return None


def record_hash(key: str, sha256: str) -> None:
    """Remember the sha256 of a first verified download (trust on first use)."""
    from filelock import FileLock

    path = _known_hashes_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = sha256
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, socket.gaierror):
        return "no network (host name not resolved)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    return str(exc) or type(exc).__name__


def _fetch(url: str, part: Path, progress: ProgressFn | None, label: str, timeout: float) -> int | None:
    """Stream ``url`` into ``part``, resuming what is there. Returns the total size the server announced."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
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
        status = response.status
        length = response.headers.get("Content-Length")
        if status == 206:
            content_range = response.headers.get("Content-Range", "")
            total = int(content_range.rsplit("/", 1)[-1]) if "/" in content_range and not content_range.endswith("*") \
                else (have + int(length) if length else None)
            mode = "ab"
        else:  # 200: the server ignored the range, start over
            have = 0
            total = int(length) if length else None
            mode = "wb"
        with open(part, mode) as handle:
            done = have
            report(progress, label, done, total, "bytes")
            while block := response.read(CHUNK):
                handle.write(block)
                done += len(block)
                report(progress, label, done, total, "bytes")
            handle.flush()
            os.fsync(handle.fileno())
    return total


def download_file(urls: Iterable[str], dest: Path, sha256: str | None = None, size: int | None = None,
                  progress: ProgressFn | None = None, hash_key: str | None = None, timeout: float = 30.0) -> str:
    """Download to ``dest`` via ``dest.part``; resume, verify, rename. Returns the sha256.

    ``hash_key`` names the file in the known-hashes record: with no published ``sha256``, a recorded one
    is checked, or the first verified download records it.
    """
    urls = [expand_url(u) for u in urls]
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    expected = sha256 or (known_hash(hash_key) if hash_key else None)
    failures = []
    for url in urls:
        try:
            total = _fetch(url, part, progress, dest.name, timeout)
        except _NotFound:
            failures.append(f"{url} (HTTP 404 Not Found)")
            continue
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            failures.append(f"{url} ({_reason(exc)})")
            continue
        got = part.stat().st_size
        want = size or total
        if want is not None and got < want:
            raise DownloadError(f"download of {dest.name} from {url} stopped at {got} of {want} bytes; "
                                "run the same command again to resume")
        if want is not None and got > want:
            part.unlink()
            raise DownloadError(f"{dest.name} from {url} is {got} bytes, expected {want}: deleted; try again")
        digest = sha256_file(part)
        if expected and digest != expected:
            part.unlink()
            raise DownloadError(f"{dest.name} from {url} has sha256 {digest[:12]}…, expected {expected[:12]}…: "
                                "the file is corrupt or was changed; deleted, nothing installed")
        replace_file(part, dest)
        if hash_key and not expected:
            record_hash(hash_key, digest)
        return digest
    raise UnreachableError(dest.name, failures)


def download_entry(name: str, progress: ProgressFn | None = None, only: Iterable[str] | None = None,
                   keep_source: bool = False) -> Path:
    """Fetch a registry entry into ``<home>/models/NAME`` (converting official pickles once).

    ``only`` limits the download to some of the entry's files (e.g. just the tokenizer).
    """
    from filelock import FileLock

    entry = get_entry(name)
    target = models_dir() / entry.name
    models_dir().mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_dir() / f".{entry.name}.lock")):
        wanted = [f for f in entry.files if only is None or f.filename in set(only)]
        staging = models_dir() / ".downloads" / entry.name if entry.convert else target
        manifest = read_manifest(target)
        files = dict(manifest.get("files", {}))
        for remote in wanted:
            dest = staging / remote.filename
            if not entry.convert and remote.filename in files and dest.is_file():
                continue
            try:
                digest = download_file(remote.urls, dest, remote.sha256, remote.size, progress,
                                       hash_key=f"{entry.name}/{remote.filename}")
            except UnreachableError as exc:
                if exc.not_found and remote.optional:
                    continue
                raise DownloadError(_offline_message(entry, remote, "; ".join(exc.failures))) from None
            files[remote.filename] = {"sha256": digest, "size": dest.stat().st_size}
        if entry.convert:
            return _convert_download(entry, staging, target, files, keep_source)
        complete = all(f.filename in files for f in entry.files if not f.optional)
        write_manifest(target, {"name": entry.name, "kind": entry.kind, "files": files, "complete": complete,
                                "origin": "download"})
    return target


def _convert_download(entry: ModelEntry, staging: Path, target: Path, files: dict, keep_source: bool) -> Path:
    from models.hub.convert import convert_checkpoint

    raw = staging / entry.files[0].filename
    convert_checkpoint(raw, target, tokenizer=entry.tokenizer)
    record_model(target, entry.name, entry.kind, "download", source_files=files)
    if not keep_source:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _offline_message(entry: ModelEntry, remote: RemoteFile, why: str) -> str:
    if len(entry.files) == 1:
        have = f"If you have the file, run `ldot models import {remote.filename} --as {entry.name}`"
    else:
        have = (f"If you have its files ({', '.join(f.filename for f in entry.files if not f.optional)}), put them "
                f"in one folder and run `ldot models import FOLDER --as {entry.name}`")
    if entry.kind == "bi-encoder":  # the official LightningDOT hosts have been seen dead: say how to do without
        have += (f"; or make a bi-encoder from live weights with `ldot train finetune --data DIR --out NAME` and use "
                 f"it with `--model NAME` (README: Training a model)")
    elif entry.kind == "uniter-itm":
        have += ("; or re-rank with the live LXMERT: `ldot models download lxmert-base-uncased`, then "
                 "`--reranker lxmert-base-uncased`")
    return f"could not download {entry.name} ({remote.filename}): {why}. {have}"


def ensure_tokenizer(name: str) -> Path:
    """A directory holding the tokenizer files of registry entry ``name``; downloads only those files."""
    entry = get_entry(name)
    if entry.tokenizer:
        return ensure_tokenizer(entry.tokenizer)
    directory = model_path(entry.name)
    if any((directory / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        return directory
    from models.hub.fetch import download_entry

    download_entry(entry.name, only=TOKENIZER_FILES)
    return directory


def ensure_model(name: str, progress: ProgressFn | None = None) -> None:
    """Download a registry model that is missing (only registry names; paths and local names pass)."""
    from models.core.home import models_dir
    from models.hub.cache import is_present
    from models.hub.catalogue import find_entry
    from models.hub.fetch import download_entry

    if Path(name).expanduser().exists() or (models_dir() / name).exists():
        return
    entry = find_entry(name)
    if entry is not None and not is_present(entry.name):
        download_entry(entry.name, progress=progress)
