"""Entry points that turn a source (path, model dir, registry name) into a ready model."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from .bi_encoder import BiEncoder
from .checkpoints import (
    Tensors,
    bi_encoder_state,
    build_on_meta,
    cast_state,
    detect_format,
    infer_bi_encoder_config,
    load_model_state,
    load_strict,
    load_tensors,
    save_model_dir,
)
from .config import BiEncoderConfig
from .errors import CheckpointError, ModelNotFoundError
from .fileio import sha256_file
from .home import models_dir


def resolve_source(source: str | Path) -> Path:
    """A path as given, or the directory of a named model in the cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    name = str(source)
    candidate = models_dir() / name
    if candidate.exists():
        return candidate
    from .registry import find_entry

    entry = find_entry(name)
    if entry is not None:
        raise ModelNotFoundError(f"model {name!r} is not downloaded: run `ldot models download {name}` "
                                 f"(or `ldot models import FILE --as {name}`)")
    raise ModelNotFoundError(f"no model or file named {name!r}: see `ldot models list`, or pass a path")


def pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


TOWERS = {"text": "txt_model", "image": "img_model"}


def bi_encoder_from_state(state: Tensors, config: BiEncoderConfig | None = None,
                          device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
                          tokenizer: Any = None, towers: tuple[str, ...] = ("text", "image")) -> BiEncoder:
    """Build a `BiEncoder` around a state dict with our key names, strictly.

    ``towers=("text",)`` loads only the text tower (all a search needs): the image tower stays
    unallocated and `encode_regions` refuses to run.
    """
    config = config or infer_bi_encoder_config(state)
    model = build_on_meta(BiEncoder, config, tokenizer)
    device = pick_device(device)
    if set(towers) == set(TOWERS):
        load_strict(model, cast_state(state, dtype), assign=True)
        return model.to(device).eval()
    for tower in towers:
        prefix = TOWERS[tower] + "."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module = getattr(model, TOWERS[tower])
        load_strict(module, cast_state(part, dtype), assign=True)
        module.to(device)
    model.loaded_towers = tuple(towers)
    return model.eval()


def load_bi_encoder(source: str | Path, tokenizer: Any = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = torch.float32,
                    towers: tuple[str, ...] = ("text", "image")) -> BiEncoder:
    """Load a LightningDOT bi-encoder from an official ``.pt`` (fine-tuned or pre-trained), a converted
    model directory, a ``.safetensors`` file, or a registry name present in the cache.

    Never touches the network: the tokenizer (``tokenizer=`` a path, else the model's own, else the
    configured name) is resolved on the first `encode_text`.
    """
    path = resolve_source(source)
    model_dir = None
    if path.is_dir():
        meta, state = load_model_state(path)
        if meta["kind"] != "bi-encoder":
            raise CheckpointError(f"{path} holds a {meta['kind']} model, not a bi-encoder")
        config = BiEncoderConfig.from_dict(meta["config"])
        model_dir = str(path)
    else:
        state, _ = bi_encoder_state(load_tensors(path))
        config = None
    model = bi_encoder_from_state(state, config, device=device, dtype=dtype, tokenizer=tokenizer, towers=towers)
    model.tokenizer_hint = model_dir
    return model


def fingerprint(source: str | Path) -> str:
    """A short identity of a model's weights: what an index records to refuse another model.

    For a model directory, derived from the hashes in its manifest (recorded at download, import or
    training, so no re-hashing); otherwise from the weight files' sha256.
    """
    from .registry import read_manifest

    path = resolve_source(source)
    digest = hashlib.sha256()
    if path.is_dir():
        files = read_manifest(path).get("files") or {}
        weights = {n: f["sha256"] for n, f in files.items() if n.endswith((".safetensors", ".bin", ".pt", ".pkl"))}
        if not weights:
            weights = {p.name: sha256_file(p) for p in sorted(path.iterdir())
                       if p.suffix in (".safetensors", ".bin", ".pt", ".pkl")}
        for name in sorted(weights):
            digest.update(f"{name}:{weights[name]}\n".encode())
    else:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()[:16]


def _tokenizer_for_conversion(name: str, lowercase: bool) -> Any:
    """The tokenizer to bundle into a converted model, when it is already on disk (never downloads)."""
    from .tokenizer import Tokenizer, has_tokenizer_files

    candidates = [Path(name).expanduser(), models_dir() / name] if name else []
    for candidate in candidates:
        if candidate.is_dir() and has_tokenizer_files(candidate) or candidate.is_file():
            return Tokenizer.from_path(candidate, lowercase=lowercase)
    return None


def convert_checkpoint(src: str | Path, dest: str | Path, tokenizer: str | Path | None = None,
                       keep_dtype: bool = True) -> tuple[str, Path]:
    """Convert a foreign checkpoint into a self-describing model directory, once.

    Handles LightningDOT bi-encoders (fine-tuned and pre-trained) and UNITER cross-encoders.
    Returns (kind, directory). The detector has its own converter in `feature_extraction`.
    """
    from .reranker import CrossEncoder, cross_encoder_from_state

    src = Path(src)
    obj = load_tensors(src)
    fmt = detect_format(obj)
    source = {"file": src.name, "sha256": sha256_file(src), "format": fmt}
    dtype = None if keep_dtype else torch.float32
    if fmt == "uniter":
        model: torch.nn.Module = cross_encoder_from_state(obj, dtype=dtype)
        assert isinstance(model, CrossEncoder)
        config = model.config
        kind = "uniter-itm"
    else:
        state, _ = bi_encoder_state(obj)
        config = infer_bi_encoder_config(state)
        if tokenizer is not None:
            config = BiEncoderConfig.from_dict({**config.to_dict(), "tokenizer": str(tokenizer)})
        model = bi_encoder_from_state(state, config, dtype=dtype)
        kind = "bi-encoder"
    tok = _tokenizer_for_conversion(str(tokenizer or config.tokenizer), config.lowercase)
    out = save_model_dir(dest, kind, config.to_dict(), model.state_dict(), source=source, tokenizer=tok)
    return kind, out
