"""The named models on disk under ``<home>/models``: list, import, verify, remove."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from models.core.errors import (
    CheckpointError,
    LdotError,
    ModelError,
    ModelNotFoundError,
)
from models.core.fileio import atomic_write_text, file_stamp, sha256_file
from models.core.home import models_dir
from models.hub.catalogue import (
    DEFAULT_BI_ENCODER,
    DEFAULT_LIVE_ENCODER,
    MANIFEST,
    REGION_RERANKER_KINDS,
    RERANKERS,
    find_entry,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class LocalModel:
    """A model directory in the cache."""

    name: str
    path: Path
    kind: str
    complete: bool
    origin: str  # download | import | train
    size: int  # bytes on disk
    problem: str | None = None  # a damaged manifest: what is wrong with it (the model is not usable)

    @property
    def registered(self) -> bool:
        return find_entry(self.name) is not None


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def local_models() -> list[LocalModel]:
    """Every model directory in the cache with a manifest, sorted by name."""
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.name.startswith("."):
            continue
        manifest, problem = load_manifest(path)
        if problem is not None:  # listed as damaged; the others still list
            out.append(LocalModel(path.name, path, "?", False, "?", dir_size(path), problem))
            continue
        if not manifest:
            continue
        out.append(LocalModel(path.name, path, manifest.get("kind", "?"), bool(manifest.get("complete")),
                              manifest.get("origin", "?"), dir_size(path)))
    return out


def check_name(name: str, what: str = "model") -> str:
    """``name`` when it is a safe folder name (a model's, or ``what``'s: "index", "run"), else a one-line error."""
    if not NAME_RE.match(name):
        raise ModelError(f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-' (no slashes)")
    return name


def remove_model(name: str) -> Path:
    target = models_dir() / check_name(name)
    if not target.is_dir():
        raise ModelNotFoundError(f"no model named {name!r} in {models_dir()}: see `ldot models list`")
    shutil.rmtree(target)
    return target


def verify_models(names: list[str] | None = None) -> dict[str, list[str]]:
    """Re-hash each named (or every) local model; returns name -> problems (empty list when intact)."""
    available = {m.name: m for m in local_models()}
    if names:
        missing = [n for n in names if n not in available]
        if missing:
            raise ModelNotFoundError(f"not in the cache: {', '.join(missing)} (see `ldot models list`)")
    return {name: verify_dir(available[name].path) for name in (names or sorted(available))}


def model_path(name: str) -> Path:
    """Directory of a named model in the cache (which may not exist)."""
    entry = find_entry(name)
    return models_dir() / (entry.name if entry else name)


def read_manifest(directory: Path) -> dict:
    """A model dir's manifest; empty when it is missing or damaged (see `load_manifest` for why)."""
    manifest, problem = load_manifest(directory)
    return {} if problem else manifest


def load_manifest(directory: Path) -> tuple[dict, str | None]:
    """(manifest, None), ({}, None) when there is none, or ({}, what is wrong) when it is unreadable or of the
    wrong shape (valid JSON is not enough: every field is checked before anything uses it)."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as exc:
        return {}, f"{path} is unreadable ({type(exc).__name__})"
    problem = manifest_problem(manifest)
    return ({}, f"{path}: {problem}") if problem else (manifest, None)


def manifest_problem(manifest: object) -> str | None:
    """What is wrong with a parsed manifest's shape (None when it is sound)."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    for key in ("name", "kind", "origin"):
        if key in manifest and not isinstance(manifest[key], str):
            return f"{key!r} is not a string"
    if "complete" in manifest and not isinstance(manifest["complete"], bool):
        return "'complete' is not true/false"
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        return "'files' is not an object"
    for name, info in files.items():
        if (not isinstance(info, dict) or not isinstance(info.get("sha256"), str)
                or not isinstance(info.get("size"), int) or isinstance(info.get("size"), bool)):
            return f"the entry of {name!r} in 'files' is not {{sha256, size}}"
    return None


def is_present(name: str) -> bool:
    """Downloaded (or imported) and complete: every non-optional file, or a converted model."""
    directory = model_path(name)
    manifest = read_manifest(directory)
    if not (manifest.get("complete") and directory.is_dir()):
        return False
    files = manifest.get("files")  # a file linked from the shared hub cache may have been deleted there
    return not isinstance(files, dict) or all((directory / f).is_file() for f in files)


def half_downloaded(directory: Path) -> bool:
    """A folder an interrupted download left rather than a model: its manifest says incomplete, or it has no
    manifest and is empty or holds ``.part`` files (what older versions left). A hand-made folder of model files
    without a manifest is not one."""
    manifest = read_manifest(directory)
    if manifest:
        return not manifest.get("complete")
    try:
        entries = [p for p in directory.iterdir() if not p.name.endswith(".lock")]
    except OSError:
        return False
    return not entries or any(p.name.endswith(".part") for p in entries)


# written into a model dir after it is complete (each evaluation rewrites it): not part of the weights' manifest
MUTABLE_FILES = ("calibration.json",)


def hash_dir(directory: Path) -> dict[str, dict[str, object]]:
    """sha256 and size of every regular file in a model directory (the manifest excepted)."""
    out = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name not in (MANIFEST, *MUTABLE_FILES) and not path.name.endswith((".part", ".lock")):
            out[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return out


def write_manifest(directory: Path, manifest: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def record_model(directory: Path, name: str, kind: str, origin: str, **extra: object) -> None:
    """Write the manifest of a complete model directory: who it is, where it came from, every file's hash."""
    files = hash_dir(directory)
    write_manifest(directory, {"name": name, "kind": kind, "complete": True, "origin": origin, **extra,
                               "files": files})
    _remember_verified(directory, files)  # just hashed: the first load need not hash again


class DamagedModelError(CheckpointError):
    """A model file no longer matches the hash recorded when it was downloaded, imported or trained."""


VERIFIED_FILE = ".verified.json"  # in <home>/models: file -> (size, mtime, inode) when its hash last matched


def _stamp(path: Path) -> list[int]:
    return file_stamp(path)


def _verified() -> dict:
    try:
        data = json.loads((models_dir() / VERIFIED_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember_verified(directory: Path, files: dict[str, dict[str, object]]) -> None:
    seen = _verified()
    for filename, info in files.items():
        path = (directory / filename).resolve()
        try:
            seen[str(path)] = {"stamp": _stamp(path), "sha256": info["sha256"]}
        except OSError:
            continue
    try:
        models_dir().mkdir(parents=True, exist_ok=True)
        atomic_write_text(models_dir() / VERIFIED_FILE, json.dumps(seen, sort_keys=True))
    except OSError:
        pass  # only saves hashing next time


def check_model_files(directory: Path) -> None:
    """Before a model directory is used: every file its manifest lists has its recorded size (always), and its
    recorded sha256 whenever its size, mtime or inode changed since the hash last matched (then remembered).

    A directory without a manifest (a folder given as a path) is not checked. Raises `DamagedModelError`.
    """
    manifest, problem = load_manifest(directory)
    name = directory.name
    if problem:
        raise DamagedModelError(f"{problem}: re-download the model (`ldot models download {name}`) or re-import it")
    files = manifest.get("files") or {}
    if not files:
        return
    seen = _verified()
    rehashed: dict[str, dict[str, object]] = {}
    for filename, info in files.items():
        path = directory / filename
        try:
            stamp = _stamp(path)
        except OSError:
            raise DamagedModelError(f"{path} is missing: run `ldot models verify {name}`, then re-download "
                                    f"(`ldot models download {name}`) or re-import the model") from None
        if stamp[0] != info["size"]:
            raise DamagedModelError(f"{path} is damaged ({stamp[0]} bytes, {info['size']} recorded): run `ldot "
                                    f"models verify {name}`, then re-download or re-import the model")
        known = seen.get(str(path.resolve()))
        if isinstance(known, dict) and known.get("stamp") == stamp and known.get("sha256") == info["sha256"]:
            continue
        if sha256_file(path) != info["sha256"]:
            raise DamagedModelError(f"{path} is damaged (its sha256 differs from the one recorded when it was "
                                    f"stored): run `ldot models verify {name}`, then re-download (`ldot models "
                                    f"download {name}`) or re-import the model")
        rehashed[filename] = info
    if rehashed:
        _remember_verified(directory, rehashed)


def verify_dir(directory: Path) -> list[str]:
    """Re-hash a model directory against its manifest; returns the problems found (empty when intact)."""
    manifest, problem = load_manifest(directory)
    if problem:
        return [f"{problem}: re-download or re-import it"]
    if not manifest:
        return [f"{directory.name}: no {MANIFEST}: re-download or re-import it"]
    problems = []
    for filename, info in manifest.get("files", {}).items():
        path = directory / filename
        if not path.is_file():
            problems.append(f"{filename}: missing")
        elif path.stat().st_size != info["size"]:
            problems.append(f"{filename}: {path.stat().st_size} bytes, expected {info['size']}")
        elif sha256_file(path) != info["sha256"]:
            problems.append(f"{filename}: sha256 mismatch (corrupted)")
        elif info.get("hub"):
            from models.hub.hf_cache import blob_problem

            bad = blob_problem(path)
            if bad is not None:
                problems.append(f"{filename}: does not match its hub blob name ({bad}): changed in the shared cache")
    return problems


def default_reranker(regions: bool = True) -> str:
    """The best re-ranker present in the cache for an index: with its region features (``regions``), the first of
    `RERANKERS` present (UNITER ITM, LXMERT, then ViLT); without them, the first that reads pixels (ViLT)."""
    from models.hub.installed import is_present

    usable = [n for n in RERANKERS if regions or getattr(find_entry(n), "kind", None) not in REGION_RERANKER_KINDS]
    for name in usable:
        if is_present(name):
            return name
    if not regions:
        raise LdotError("no re-ranker for this index in the cache (it keeps no region features, so re-ranking reads "
                        "the photos): run `ldot models download vilt-flickr30k`, or `ldot models import FOLDER --as "
                        "vilt-flickr30k` for a save_pretrained folder")
    raise LdotError("no re-ranker in the cache: run `ldot models download vilt-flickr30k` (reads the photos) or "
                    "`ldot models download lxmert-base-uncased` (or import UNITER: `ldot models import uniter-base.pt "
                    "--as uniter-base`)")


def default_bi_encoder() -> tuple[str, str]:
    """(model, why) a new index uses: LightningDOT's ``flickr-ft`` when it is in the cache (downloaded, imported or
    trained under that name), else the live dual encoder ``clip-vit-b32`` (no detector)."""
    if is_present(DEFAULT_BI_ENCODER):
        return DEFAULT_BI_ENCODER, (f"{DEFAULT_BI_ENCODER} (LightningDOT fine-tuned on Flickr30k) is in the cache")
    return DEFAULT_LIVE_ENCODER, (f"{DEFAULT_BI_ENCODER} is not in the cache; {DEFAULT_LIVE_ENCODER} is a live "
                                  "zero-shot CLIP that reads pixels (no detector)")
