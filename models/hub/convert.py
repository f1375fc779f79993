"""Foreign checkpoints into the cache: official LightningDOT/UNITER pickles converted once into
self-describing model directories, and files a user already has imported under a name."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from models.core.errors import CheckpointError, ModelError, option
from models.core.fileio import new_dir, read_json_object, sha256_file
from models.core.home import models_dir
from models.hub.catalogue import find_entry
from models.hub.formats import (
    bi_encoder_from_state,
    bi_encoder_state,
    check_lxmert_config,
    cross_encoder_from_state,
    detect_format,
    infer_bi_encoder_config,
    load_tensors,
    read_model_config,
    save_model_dir,
    visualbert_config,
)
from models.hub.installed import MANIFEST, LocalModel, check_name, dir_size, half_downloaded, record_model
from models.nn.bi_encoder import BiEncoder
from models.nn.config import BiEncoderConfig, CrossEncoderConfig
from models.nn.cross_encoder import CrossEncoder
from models.nn.tokenizer import Tokenizer, has_tokenizer_files


def _tokenizer_for_conversion(name: str, lowercase: bool) -> Tokenizer | None:
    """The tokenizer to bundle into a converted model, when it is already on disk (never downloads)."""
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
    src = Path(src)
    obj = load_tensors(src)
    fmt = detect_format(obj)
    source = {"file": src.name, "sha256": sha256_file(src), "format": fmt}
    dtype = None if keep_dtype else torch.float32
    model: CrossEncoder | BiEncoder
    config: CrossEncoderConfig | BiEncoderConfig
    if fmt == "uniter":
        model = cross_encoder_from_state(obj, dtype=dtype)
        config = model.config
        kind = "uniter-itm"
    else:
        state, _ = bi_encoder_state(obj)
        bi_config = infer_bi_encoder_config(state)
        if tokenizer is not None:
            bi_config = BiEncoderConfig.from_dict({**bi_config.to_dict(), "tokenizer": str(tokenizer)})
        model = bi_encoder_from_state(state, bi_config, dtype=dtype)
        config = bi_config
        kind = "bi-encoder"
    tok = _tokenizer_for_conversion(str(tokenizer or config.tokenizer), config.lowercase)
    out = save_model_dir(dest, kind, config.to_dict(), model.state_dict(), source=source, tokenizer=tok)
    return kind, out


DETECTOR_SUFFIXES = (".pkl",)


def import_model(src: str | Path, name: str, force: bool = False) -> LocalModel:
    """Install a checkpoint the user already has under ``name``.

    - an official LightningDOT ``.pt`` (fine-tuned or pre-trained) or a UNITER ``.pt`` is converted once
      into a model directory (config.json + model.safetensors + tokenizer);
    - detector weights (hub ``pytorch_model.bin`` or detectron2 ``.pkl``) and Hugging Face model
      directories (LXMERT, BERT; CLIP and SigLIP as `save_pretrained` writes them, model + processor) are copied
      as they are;
    - an ldot model directory is copied.
    """
    check_name(name)
    src = Path(src).expanduser()
    if not src.exists():
        raise ModelError(f"{src} does not exist")
    target = models_dir() / name
    entry = find_entry(name)
    if target.exists() and not force and not (target.is_dir() and half_downloaded(target)):
        raise ModelError(f"a model named {name!r} already exists: pass {option('force')} to replace it, or choose "
                         f"another {option('name')}")
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
                         f"choose another {option('name')}")
    record_model(target, name, kind, "import", imported_from=str(src.absolute()))
    return LocalModel(name, target, kind, True, "import", dir_size(target))


def _dir_kind(src: Path) -> str:
    config = src / "config.json"
    if config.is_file():
        meta = read_json_object(config, CheckpointError, f"{config} is missing", "not a model config ldot knows")
        if meta.get("format") == "ldot-model":
            return read_model_config(src)["kind"]
        if meta.get("model_type") in ("clip", "siglip"):
            from models.hub.dual import check_dual_dir

            check_dual_dir(src, str(src))
            return "dual-encoder"
        if meta.get("model_type") == "lxmert":
            check_lxmert_config(meta, config)
            return "lxmert"
        if meta.get("model_type") == "visual_bert":
            visualbert_config(meta, config)
            return "visualbert"
        if meta.get("model_type") == "vilt":
            _check_vilt_dir(src)
            return "vilt"
        if meta.get("model_type") == "bert":
            return "text-encoder"
    if any(src.glob("*.pkl")) or (src / "pytorch_model.bin").is_file():
        return "detector"
    if (src / "vocab.txt").is_file() or (src / "tokenizer.json").is_file():
        return "text-encoder"  # a tokenizer alone (e.g. bert-base-cased's vocab.txt)
    raise CheckpointError(f"{src} is not a model folder ldot knows: it holds none of an ldot model (config.json + "
                          "model.safetensors), an LXMERT or BERT folder (config.json with its model_type), a "
                          "tokenizer (vocab.txt) or detector weights (pytorch_model.bin + config.yaml, or a "
                          "detectron2 .pkl)")


def _check_vilt_dir(src: Path) -> None:
    """A ViLT folder (``save_pretrained`` of the model and of its processor) holds what re-ranking reads."""
    from models.nn.vilt import PREPROCESSOR_FILE, VILT_WEIGHTS

    missing = []
    if not any((src / f).is_file() for f in VILT_WEIGHTS):
        missing.append(" or ".join(VILT_WEIGHTS))
    if not (src / PREPROCESSOR_FILE).is_file():
        missing.append(PREPROCESSOR_FILE)
    if not has_tokenizer_files(src):
        missing.append("vocab.txt or tokenizer.json")
    if missing:
        raise CheckpointError(f"{src} is a ViLT folder without {', '.join(missing)}: save the processor too "
                              "(`ViltProcessor.save_pretrained(FOLDER)` beside `model.save_pretrained(FOLDER)`)")


def _copy_dir(src: Path, target: Path) -> None:
    with new_dir(target) as tmp:
        for path in src.iterdir():
            if path.is_file() and path.name != MANIFEST:
                shutil.copy2(path, tmp / path.name)


def _copy_file(src: Path, target: Path, filename: str) -> None:
    with new_dir(target) as tmp:
        shutil.copy2(src, tmp / filename)
