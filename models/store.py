"""The named models on disk under ``<home>/models``: list, import, verify, remove."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .download import record_model, verify_dir
from .errors import CheckpointError, ModelError, ModelNotFoundError
from .home import models_dir
from .registry import MANIFEST, find_entry, read_manifest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DETECTOR_SUFFIXES = (".pkl",)


@dataclass
class LocalModel:
    """A model directory in the cache."""

    name: str
    path: Path
    kind: str
    complete: bool
    origin: str  # download | import | train
    size: int  # bytes on disk

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
        manifest = read_manifest(path)
        if not manifest:
            continue
        out.append(LocalModel(path.name, path, manifest.get("kind", "?"), bool(manifest.get("complete")),
                              manifest.get("origin", "?"), dir_size(path)))
    return out


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ModelError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (no slashes)")
    return name


def import_model(src: str | Path, name: str, force: bool = False) -> LocalModel:
    """Install a checkpoint the user already has under ``name``.

    - an official LightningDOT ``.pt`` (fine-tuned or pre-trained) or a UNITER ``.pt`` is converted once
      into a model directory (config.json + model.safetensors + tokenizer);
    - detector weights (hub ``pytorch_model.bin`` or detectron2 ``.pkl``) and Hugging Face model
      directories (LXMERT, BERT) are copied as they are;
    - an ldot model directory is copied.
    """
    from .checkpoints import detect_format, load_tensors
    from .loading import convert_checkpoint

    check_name(name)
    src = Path(src).expanduser()
    if not src.exists():
        raise ModelError(f"{src} does not exist")
    target = models_dir() / name
    if target.exists() and not force:
        raise ModelError(f"a model named {name!r} already exists: pass --force to replace it, or choose another --as")
    entry = find_entry(name)
    if src.is_dir():
        kind = _dir_kind(src)
        _copy_dir(src, target)
    elif src.suffix in DETECTOR_SUFFIXES:
        kind = "detector"
        _copy_file(src, target, src.name)
    else:
        fmt = detect_format(load_tensors(src))
        if fmt == "frcnn":
            kind = "detector"
            _copy_file(src, target, "pytorch_model.bin")
        elif fmt == "bert":
            raise CheckpointError(f"{src} is a text-only BERT checkpoint: it initialises `ldot train`, pass it there")
        else:
            kind, _ = convert_checkpoint(src, target, tokenizer=entry.tokenizer if entry else None)
    if entry is not None and entry.kind != kind:
        shutil.rmtree(target, ignore_errors=True)
        raise ModelError(f"{src} holds a {kind} model but {name!r} is the registry's {entry.kind}: "
                         "choose another --as name")
    record_model(target, name, kind, "import", imported_from=str(src.absolute()))
    return LocalModel(name, target, kind, True, "import", dir_size(target))


def _dir_kind(src: Path) -> str:
    config = src / "config.json"
    if config.is_file():
        try:
            meta = json.loads(config.read_text())
        except ValueError:
            raise CheckpointError(f"{config} is not valid JSON") from None
        if meta.get("format") == "ldot-model":
            from .checkpoints import read_model_config

            return read_model_config(src)["kind"]
        if meta.get("model_type") == "lxmert":
            return "lxmert"
        if meta.get("model_type") == "bert":
            return "text-encoder"
    if any(src.glob("*.pkl")) or (src / "pytorch_model.bin").is_file():
        return "detector"
    if (src / "vocab.txt").is_file() or (src / "tokenizer.json").is_file():
        return "text-encoder"  # a tokenizer alone (e.g. bert-base-cased's vocab.txt)
    raise CheckpointError(f"{src} is not a model directory ldot knows (no ldot, LXMERT or BERT config.json)")


def _copy_dir(src: Path, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=_ensure(target.parent)))
    try:
        for path in src.iterdir():
            if path.is_file() and path.name != MANIFEST:
                shutil.copy2(path, tmp / path.name)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_file(src: Path, target: Path, filename: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=_ensure(target.parent)))
    try:
        shutil.copy2(src, tmp / filename)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _swap_in(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


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
