"""Dual-encoder model folders (CLIP, SigLIP) as `save_pretrained` writes them and the hub serves them.

A folder holds ``config.json`` (its ``model_type`` names the architecture), ``model.safetensors`` (pickled
``pytorch_model.bin`` weights are refused: loading them could run code), ``preprocessor_config.json`` and the
tokenizer's files. Nothing here touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.core.errors import CheckpointError, ModelError
from models.nn.dual import ARCHITECTURES, DualEncoder, PixelPreprocess, PixelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WEIGHTS = "model.safetensors"
PROCESSOR = "preprocessor_config.json"
MAX_TEXT_TOKENS = 4096  # a tokenizer's model_max_length above this is "no limit" (transformers' huge sentinel)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}: not a {what} folder (a folder written by "
                              "`save_pretrained` holds it)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} ({type(exc).__name__}): re-download or re-import the model") \
            from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object: re-download or re-import the model")
    return data


def hf_model_type(directory: Path) -> str | None:
    """The ``model_type`` of a `transformers` folder's config.json (None without one, or for an ldot model)."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return None
    data = _read_json(config, "model")
    kind = data.get("model_type")
    return kind if isinstance(kind, str) and data.get("format") != "ldot-model" else None


def is_dual_dir(directory: Path) -> bool:
    return Path(directory).is_dir() and hf_model_type(directory) in ARCHITECTURES


def check_dual_config(config: Path, source: str) -> str:
    """The architecture (``clip`` / ``siglip``) of a dual encoder's config.json; a one-line error for another."""
    data = _read_json(config, "model")
    kind = data.get("model_type")
    if kind not in ARCHITECTURES:
        archs = data.get("architectures")
        named = ", ".join(map(str, archs)) if isinstance(archs, list) and archs else repr(kind)
        raise CheckpointError(f"{source} is a {named} model, not a dual encoder ldot reads: give a CLIP "
                              "(CLIPModel) or SigLIP (SiglipModel) repository")
    return str(kind)


def check_dual_dir(directory: Path, source: str) -> str:
    """What a dual-encoder folder must hold, checked without loading it: its architecture, safetensors weights,
    readable image processor settings and a tokenizer. Returns the architecture."""
    directory = Path(directory)
    model_type = check_dual_config(directory / "config.json", source)
    if not (directory / WEIGHTS).is_file():
        pickled = " (it has pytorch_model.bin: ldot does not load pickled weights)" \
            if (directory / "pytorch_model.bin").is_file() else ""
        raise CheckpointError(f"{source} has no {WEIGHTS}{pickled}: save the model with `save_pretrained` "
                              "(safetensors) and import that folder")
    pixel_spec(directory, model_type)
    if not any((directory / f).is_file() for f in ("tokenizer.json", "vocab.json", "spiece.model")):
        raise CheckpointError(f"{source} has no tokenizer (tokenizer.json, vocab.json or spiece.model): save the "
                              "processor (or tokenizer) with `save_pretrained` into the same folder")
    return model_type


def _processor_defaults(model_type: str) -> dict[str, Any]:
    """The image processor class's own defaults (what `transformers` uses for keys a config leaves out)."""
    import transformers

    cls = getattr(transformers, ARCHITECTURES[model_type][1])
    keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "default_to_square")
    out = {k: getattr(cls, k, None) for k in keys}
    out["resample"] = int(out["resample"]) if out["resample"] is not None else None
    return out


def pixel_spec(directory: Path, model_type: str) -> PixelSpec:
    path = Path(directory) / PROCESSOR
    return PixelSpec.from_config(_read_json(path, "model"), _processor_defaults(model_type), str(path))


def dual_preprocess(directory: str | Path) -> PixelPreprocess:
    """The worker-side preprocessing of a dual-encoder folder (picklable), without loading its weights."""
    import functools

    from models.nn.dual import preprocess_pixels

    directory = Path(directory)
    return functools.partial(preprocess_pixels, spec=pixel_spec(directory, check_dual_config(
        directory / "config.json", str(directory))))


def load_dual_encoder(directory: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = torch.float32, image_only: bool = False) -> DualEncoder:
    """A `DualEncoder` from a CLIP / SigLIP folder (weights, image processor settings, tokenizer). ``image_only``:
    the image tower and its projection alone (what indexing needs: about 60% of ViT-B/32 CLIP's weights)."""
    import transformers

    directory = Path(directory)
    model_type = check_dual_dir(directory, str(directory))
    spec = pixel_spec(directory, model_type)
    full_config = getattr(transformers, ARCHITECTURES[model_type][0]).config_class.from_pretrained(str(directory))
    cls = getattr(transformers, ARCHITECTURES[model_type][3 if image_only else 0])
    extra: dict[str, Any] = {}
    if image_only:  # the image tower's own config, with the projection size the whole model's config holds
        extra["config"] = full_config.vision_config
        if hasattr(full_config, "projection_dim"):
            extra["config"].projection_dim = full_config.projection_dim
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # ldot draws its own progress; loading a local folder takes seconds
    hf_logging.set_verbosity_error()  # the image tower alone: the text tower's weights are left out on purpose
    try:
        model = cls.from_pretrained(str(directory), dtype=dtype or torch.float32, use_safetensors=True,
                                    local_files_only=True, **extra)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"cannot load the {model_type} model in {directory}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer = load_tokenizer(directory)
    limit = int(full_config.text_config.max_position_embeddings)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit <= MAX_TEXT_TOKENS:
        limit = min(limit, tok_limit)
    from models.hub.formats import pick_device

    return DualEncoder(model.to(pick_device(device)), tokenizer, spec, model_type, limit)


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = " (SigLIP's tokenizer needs the sentencepiece package)" if "sentencepiece" in text.lower() else ""
        raise ModelError(f"cannot load the tokenizer in {directory}: {text}{hint}") from None
    return tokenizer
