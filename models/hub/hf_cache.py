"""Hugging Face hub files kept the way the hub's own tools keep them: in the shared cache.

``<HF_HUB_CACHE>/models--<org>--<name>/blobs/<etag>`` holds the bytes, ``snapshots/<commit>/<file>`` points at
them and ``refs/<branch>`` names the commit, so a file already fetched by transformers or ``hf download`` is
used as it is (no second download of ~1.3 GB), and what ldot fetches is there for them. `huggingface_hub`
finds files in the cache (`try_to_load_from_cache`) and asks the hub for a file's commit, etag and size
(`get_hf_file_metadata`, honouring ``HF_ENDPOINT`` and ``HF_TOKEN``); ``HF_HUB_OFFLINE`` keeps ldot off the
network. The bytes come through ldot's own downloader: huggingface_hub 2.x writes each download to a
process-unique temp file and deletes it on failure, so an interrupted run starts over (read in its
``_download_to_tmp_and_move`` and measured), while ours resumes ``blobs/<etag>.part``
with a Range request. A large (LFS) file's etag is its sha256, which is checked; a small file's etag is its git
blob sha1, which is checked too. A blob already in the cache is checked against its name before it is used
(`blob_problem`): one that was changed there is deleted and downloaded again.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from models.core.download import UnreachableError, download_file
from models.core.errors import DownloadError
from models.core.fileio import atomic_write_text
from models.core.progress import ProgressFn
from models.hub.catalogue import HUB_PREFIX, hub_endpoint

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")


class HubOfflineError(DownloadError):
    """``HF_HUB_OFFLINE`` is set and the file is not in the shared cache."""


@dataclass(frozen=True)
class HubFile:
    repo: str
    revision: str
    filename: str


@dataclass(frozen=True)
class Fetched:
    """A hub file in the shared cache."""

    path: Path  # snapshots/<commit>/<file> (a link into blobs/)
    commit: str | None  # the commit it belongs to (None when found in the cache by branch name only)
    sha256: str
    size: int
    downloaded: bool  # False: it was in the shared cache already


def parse_hub_url(url: str) -> HubFile | None:
    """``hf://<repo>/resolve/<revision>/<file>`` -> its parts (None for any other URL)."""
    if not url.startswith(HUB_PREFIX) or "/resolve/" not in url:
        return None
    repo, rest = url[len(HUB_PREFIX):].split("/resolve/", 1)
    revision, _, filename = rest.partition("/")
    return HubFile(repo, revision, filename) if repo and revision and filename else None


def hub_cache_dir() -> Path:
    """The shared cache: huggingface_hub's own answer (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``), so ldot and the hub's tools always agree on it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(repo: str) -> Path:
    """A model repo's folder in the shared cache: ``models--<org>--<name>`` (the cache layout huggingface_hub
    documents), whose ``blobs/``, ``snapshots/`` and ``refs/`` hold its files."""
    return hub_cache_dir() / ("models--" + repo.replace("/", "--"))


def offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def cached(repo: str, filename: str, revision: str) -> Path | None:
    """The file in the shared cache at ``revision`` (a commit, or a branch the cache has a ref for)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=str(hub_cache_dir()), revision=revision)
    except (ValueError, OSError):
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file (the etag the hub gives files stored in git rather than LFS)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def blob_problem(path: Path) -> str | None:
    """What a file of the shared cache fails to be, by its blob's name: an LFS blob is named by its sha256, a
    small file's by its git blob sha1. Returns the hash it fails ("sha256", "git sha1"), or None when it holds
    what its name says (or its name is no hash)."""
    from models.core.fileio import sha256_file

    blob = path.resolve()
    if SHA256_RE.match(blob.name):
        return None if sha256_file(blob) == blob.name else "sha256"
    if SHA1_RE.match(blob.name):
        return None if git_blob_sha1(blob) == blob.name else "git sha1"
    return None


def _sha256_of(path: Path) -> str:
    from models.core.fileio import sha256_file

    blob = path.resolve()
    return blob.name if SHA256_RE.match(blob.name) else sha256_file(blob)  # an LFS blob is named by its sha256


def fetch_hub_file(repo: str, filename: str, revision: str = "main", progress: ProgressFn | None = None,
                   timeout: float = 30.0) -> Fetched:
    """The file ``repo/filename`` at ``revision`` in the shared cache, downloaded (resumably) when missing."""
    found = cached(repo, filename, revision)
    damaged = ""
    if found is not None:
        bad = blob_problem(found)
        if bad is None:
            return Fetched(found, revision if SHA1_RE.match(revision) else None, _sha256_of(found),
                           found.stat().st_size, False)
        damaged = f"{found.resolve()} (the cached {filename} of {repo}) does not match its {bad} name"
        if not offline():
            found.resolve().unlink()  # fetched again below
    endpoint = hub_endpoint()
    url = f"{endpoint}/{repo}/resolve/{revision}/{filename}"
    if damaged and offline():
        raise HubOfflineError(f"{damaged}, and HF_HUB_OFFLINE is set: unset it to download it again")
    if offline():
        raise HubOfflineError(f"{filename} of {repo} is not in the Hugging Face cache {hub_cache_dir()} and "
                              "HF_HUB_OFFLINE is set (unset it to download)")
    meta = _metadata(repo, filename, revision, endpoint, url, timeout)
    commit, etag, size = meta.commit_hash, meta.etag, meta.size
    if not commit or not etag:
        raise UnreachableError(filename, [f"{url} (no X-Repo-Commit / ETag: not a Hugging Face hub)"])
    storage = repo_folder(repo)
    blob = storage / "blobs" / etag
    pointer = storage / "snapshots" / commit / filename
    from filelock import FileLock

    lock = hub_cache_dir() / ".locks" / storage.name / f"{etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    downloaded = False
    with FileLock(str(lock)):
        if blob.is_file() and blob_problem(blob) is not None:  # changed in the cache: fetched again
            blob.unlink()
        if not blob.is_file():
            location = meta.location or url
            headers = {}
            token = _token()
            if token and location.startswith(endpoint):  # never send the token to a CDN
                headers["Authorization"] = f"Bearer {token}"
            lfs = bool(SHA256_RE.match(etag))
            download_file([location], blob, sha256=etag if lfs else None, size=size, progress=progress,
                          timeout=timeout, headers=headers, stage=filename, record=False)
            if not lfs and SHA1_RE.match(etag) and git_blob_sha1(blob) != etag:
                blob.unlink()
                raise DownloadError(f"{filename} from {location} does not match the hub's git hash {etag[:12]}…: "
                                    "deleted, nothing installed")
            downloaded = True
        if not pointer.is_file():
            pointer.parent.mkdir(parents=True, exist_ok=True)
            if pointer.is_symlink():
                pointer.unlink()
            try:
                pointer.symlink_to(os.path.relpath(blob, pointer.parent))
            except OSError:  # no symlinks here (as huggingface_hub does): a copy
                import shutil

                shutil.copyfile(blob, pointer)
        if revision != commit:
            ref = storage / "refs" / revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(ref, commit)
    return Fetched(pointer, commit, etag if SHA256_RE.match(etag) else _sha256_of(blob), blob.stat().st_size,
                   downloaded)


def _metadata(repo: str, filename: str, revision: str, endpoint: str, url: str, timeout: float):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        return get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision, endpoint=endpoint),
                                    token=_token() or False, timeout=timeout, endpoint=endpoint)
    except EntryNotFoundError:
        raise UnreachableError(filename, [f"{url} (HTTP 404 Not Found)"]) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        why = "HTTP 404 Not Found" if status == 404 else (f"HTTP {status}" if status else str(exc).splitlines()[0])
        raise UnreachableError(filename, [f"{url} ({why})"]) from None
    except Exception as exc:  # httpx connection errors, time-outs, offline mode
        from models.core.download import reason

        cause = exc.__cause__ or exc.__context__ or exc
        text = reason(cause) if isinstance(cause, OSError) else (str(exc).splitlines()[0] if str(exc) else
                                                                  type(exc).__name__)
        lowered = text.lower()
        if "refused" in lowered:
            text = "connection refused"
        elif "name or service not known" in lowered or "name resolution" in lowered or "nodename nor servname" \
                in lowered or "getaddrinfo" in lowered:
            text = "no network (host name not resolved)"
        elif "timed out" in lowered or "timeout" in lowered:
            text = "timed out"
        raise UnreachableError(filename, [f"{url} ({text})"]) from None
