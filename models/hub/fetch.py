"""Registry models into the cache: fetched, verified, and present only when whole.

Bytes come through the one downloader (`models.core.download`: ``.part`` files resumed with HTTP Range, sizes and
sha256 checked, mirrors in order). Hub files are kept in the shared Hugging Face cache (`models.hub.hf_cache`) and
linked from ``<home>/models/NAME``; other files gather in ``<home>/models/.downloads/NAME`` (where an interrupted
download resumes) and the model folder is put in place, with its manifest, only when every file is verified: a
half download is never a model.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from models.core.download import (
    UnreachableError,
    download_file,
    known_hash,
    record_hash,
)
from models.core.errors import DownloadError, LdotError
from models.core.fileio import new_dir, recover_dir, replace_dir
from models.core.home import models_dir
from models.core.progress import ProgressFn
from models.hub.catalogue import (
    TOKENIZER_FILES,
    ModelEntry,
    RemoteFile,
    expand_url,
    get_entry,
)
from models.hub.hf_cache import (
    HubFile,
    HubOfflineError,
    fetch_hub_file,
    hub_cache_dir,
    parse_hub_url,
)
from models.hub.installed import model_path, read_manifest, record_model, write_manifest


def staging_dir(name: str) -> Path:
    """Where a registry model's files gather while they download (``.part`` files resume from here); the model
    directory itself appears only once every file is verified, so a half download never looks like a model."""
    return models_dir() / ".downloads" / name


def download_entry(name: str, progress: ProgressFn | None = None, only: Iterable[str] | None = None,
                   keep_source: bool = False) -> Path:
    """Fetch a registry entry into ``<home>/models/NAME`` (converting official pickles once).

    Files gather in `staging_dir` (an interrupted run resumes there) and the model directory is put in place
    only when every file is verified. ``only`` limits the download to some of the entry's files (e.g. just the
    tokenizer): those go straight into the model directory, whose manifest then says it is incomplete.
    """
    from filelock import FileLock

    entry = get_entry(name)
    target = models_dir() / entry.name
    models_dir().mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_dir() / f".{entry.name}.lock")):
        recover_dir(target)
        wanted = [f for f in entry.files if only is None or f.filename in set(only)]
        staging = target if only is not None else staging_dir(entry.name)
        manifest = read_manifest(target)
        complete_before = bool(manifest.get("complete"))
        files = dict(manifest.get("files", {})) if isinstance(manifest.get("files"), dict) else {}
        hub = _hub_files(entry)
        pin: dict[str, str] = {}
        pinned = known_hash(f"{entry.name}@commit") if hub else None  # the commit of the first download
        if pinned:
            pin["commit"] = pinned
        if only is None and not entry.convert:
            _reuse_verified(target, staging, {k: v for k, v in files.items() if k not in hub}, files)
        for remote in wanted:
            dest = staging / remote.filename
            if remote.filename in hub:
                _link_hub_file(entry, remote, hub[remote.filename], staging, files, pin, progress)
                if entry.kind == "dual-encoder" and remote.filename == "config.json":
                    from models.hub.dual import (
                        check_dual_config,  # another architecture: refused before its weights
                    )

                    try:
                        check_dual_config(staging / "config.json", f"hf:{hub[remote.filename].repo}")
                    except LdotError:
                        shutil.rmtree(staging, ignore_errors=True)
                        raise
                continue
            if not entry.convert and remote.filename in files and dest.is_file():
                continue
            try:
                digest = download_file([expand_url(u) for u in remote.urls], dest, remote.sha256, remote.size,
                                       progress, hash_key=f"{entry.name}/{remote.filename}")
            except UnreachableError as exc:
                if exc.not_found and remote.optional:
                    continue
                raise DownloadError(_offline_message(entry, remote, "; ".join(exc.failures), staging)) from None
            files[remote.filename] = {"sha256": digest, "size": dest.stat().st_size}
        if entry.convert:
            return _convert_download(entry, staging, target, files, keep_source)
        complete = all(f.filename in files for f in entry.files if not f.optional)
        if only is not None:
            write_manifest(target, {"name": entry.name, "kind": entry.kind, "files": files,
                                    "complete": complete or complete_before, "origin": "download"})
            return target
        files = {k: v for k, v in files.items() if (staging / k).is_file()}
        extra = {"hub": {"repo": next(iter(hub.values())).repo, "commit": pin.get("commit"),
                         "cache": str(hub_cache_dir())}} if hub else {}
        if hub and complete and pin.get("commit") and not pinned:
            record_hash(f"{entry.name}@commit", pin["commit"])  # later downloads take the same revision
        write_manifest(staging, {"name": entry.name, "kind": entry.kind, "files": files, "complete": complete,
                                 "origin": "download", **extra})
        replace_dir(staging, target)
    return target


def _hub_files(entry: ModelEntry) -> dict[str, HubFile]:
    """The hub location of each of ``entry``'s files that lives on the hub (kept in the shared hub cache); the
    others (another host, or an official pickle to convert) go through the staging folder."""
    if entry.convert:
        return {}
    parsed = {f.filename: parse_hub_url(f.urls[0]) for f in entry.files}
    return {name: where for name, where in parsed.items() if where is not None}


def _link_hub_file(entry: ModelEntry, remote: RemoteFile, where: HubFile, staging: Path, files: dict,
                   pin: dict[str, str], progress: ProgressFn | None) -> bool:
    """Put ``remote`` in the shared hub cache (downloading it only when missing) and link it from ``staging``.

    Returns False for an optional file the hub does not have."""
    try:  # every file at the commit the first one resolved to
        got = fetch_hub_file(where.repo, where.filename, pin.get("commit") or where.revision, progress)
    except UnreachableError as exc:
        if exc.not_found and remote.optional:
            return False
        raise DownloadError(_offline_message(entry, remote, "; ".join(exc.failures) + exc.kept, None)) from None
    except HubOfflineError as exc:
        if remote.optional:
            return False
        raise DownloadError(_offline_message(entry, remote, str(exc), None)) from None
    if got.commit:
        pin.setdefault("commit", got.commit)
    link = staging / remote.filename
    staging.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(got.path.absolute())
    files[remote.filename] = {"sha256": got.sha256, "size": got.size, "hub": str(got.path.absolute()),
                              **({"commit": got.commit} if got.commit else {})}
    return True




def _reuse_verified(target: Path, staging: Path, candidates: dict, files: dict) -> None:
    """Carry files already verified in a (partial) model directory into the staging folder (``candidates``: the
    manifest entries of files ldot keeps itself; one that is no longer intact is dropped from ``files``)."""
    staging.mkdir(parents=True, exist_ok=True)
    for filename, info in candidates.items():
        src, dest = target / filename, staging / filename
        if dest.is_file():
            continue
        if src.is_file() and not src.is_symlink() and src.stat().st_size == info.get("size"):
            shutil.copy2(src, dest)
        else:
            files.pop(filename, None)


def _convert_download(entry: ModelEntry, staging: Path, target: Path, files: dict, keep_source: bool) -> Path:
    from models.hub.convert import convert_checkpoint

    raw = staging / entry.files[0].filename
    with new_dir(target) as tmp:  # the model appears whole, with its manifest, or not at all
        convert_checkpoint(raw, tmp, tokenizer=entry.tokenizer)
        record_model(tmp, entry.name, entry.kind, "download", source_files=files)
    if not keep_source:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _offline_message(entry: ModelEntry, remote: RemoteFile, why: str, staging: Path | None) -> str:
    if len(entry.files) == 1:
        have = f"If you have the file, run `ldot models import {remote.filename} --as {entry.name}`"
    elif entry.kind == "dual-encoder":
        size = f" ({entry.approx_size})" if entry.approx_size else ""
        have = (f"Run `ldot models download {entry.name}` where the hub is reachable{size}, or import a folder "
                f"written by `save_pretrained` (model and processor): `ldot models import FOLDER --as {entry.name}`")
    else:
        have = (f"If you have its files ({', '.join(f.filename for f in entry.files if not f.optional)}), put them "
                f"in one folder and run `ldot models import FOLDER --as {entry.name}`")
    if entry.kind == "bi-encoder":  # the official LightningDOT hosts have been seen dead: say how to do without
        have += ("; or make a bi-encoder from live weights with `ldot train finetune --dataset flickr30k --out NAME` "
                 "and use it with `ldot index FOLDER --model NAME` (README: Training a model)")
    elif entry.kind == "uniter-itm":
        have += ("; or re-rank with the live LXMERT: `ldot models download lxmert-base-uncased`, then "
                 "`--reranker lxmert-base-uncased`")
    part = (staging or Path(".")) / (remote.filename + ".part")
    kept = (f"; {part.stat().st_size} bytes are kept in {part}: run the same command again to resume"
            if staging is not None and part.is_file() and part.stat().st_size else "")
    return f"could not download {entry.name} ({remote.filename}): {why}{kept}. {have}"


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
    """Download a registry model that is missing or half downloaded (resuming it); paths and local names pass."""
    from models.hub.catalogue import find_entry
    from models.hub.installed import half_downloaded, is_present

    entry = find_entry(name)
    if entry is not None and not Path(name).expanduser().exists():
        folder = models_dir() / entry.name
        if not is_present(entry.name) and (not folder.is_dir() or half_downloaded(folder)):
            download_entry(entry.name, progress=progress)  # resumes what an interrupted run left
