"""Sources of a decomposed (VLDeformer) encoder: single-stream cross-encoders converted to `DecomposedEncoder`.

- UNITER (the official ``uniter-base.pt``, the registry's ``uniter-base``, or a ``uniter-itm`` model dir of ours):
  the body's keys ARE `DecomposedBody`'s (region embedding ``uniter``); ``rank_output`` / ``itm_output`` and the
  pre-training heads are dropped.
- VisualBERT (hub ``uclanlp/visualbert-vqa-coco-pre``: a Hugging Face dir with ``config.json`` of model_type
  ``visual_bert`` and ``pytorch_model.bin``; `VisualBertForPreTraining` keys under ``visual_bert.`` or
  `VisualBertModel` keys without a prefix): region embedding ``visualbert``; ``cls.*`` heads dropped.
- A decomposed model dir of ours (continue decomposition).

Converters are pure functions on state dicts; each is checked against the source's own forward in the tests
(`transformers.VisualBertModel`, our `UniterBody`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from models.core.errors import CheckpointError, ModelError, option
from models.core.fileio import read_json_object
from models.hub.formats import (
    CONFIG_FILE,
    MODEL_FORMAT,
    PRETRAIN_HEADS,
    WEIGHTS_FILE,
    Tensors,
    detect_format,
    heads_of_bare_checkpoint,
    infer_transformer_config,
    load_strict,
    load_tensors,
    normalize_keys,
    read_model_config,
    visualbert_config,
)
from models.nn.config import CrossEncoderConfig, DecomposedConfig
from models.nn.decomposed import DecomposedEncoder

if TYPE_CHECKING:
    from models.nn.tokenizer import Tokenizer
    from models.nn.vilt import ViltDecomposedEncoder

_M = TypeVar("_M", bound=nn.Module)
VISUALBERT_REGION_KEYS = ("visual_projection.", "visual_token_type_embeddings.", "visual_position_embeddings.")


def uniter_to_decomposed(state: Tensors) -> Tensors:
    """A UNITER state dict (body under ``uniter.`` or ``bert.``) -> `DecomposedEncoder` keys (``bert.*``)."""
    out: Tensors = {}
    for key, value in normalize_keys(state).items():
        for prefix in ("uniter.", "bert."):
            if key.startswith(prefix):
                out["bert." + key[len(prefix):]] = value
                break
        else:
            if not key.startswith(("rank_output.", *PRETRAIN_HEADS)):
                raise CheckpointError(f"unexpected key {key!r} in a UNITER checkpoint")
    if not any(k.startswith("bert.img_embeddings.") for k in out):
        raise CheckpointError("not a UNITER checkpoint: no img_embeddings")
    return out


def visualbert_to_decomposed(state: Tensors) -> Tensors:
    """A VisualBERT state dict (`VisualBertForPreTraining`: ``visual_bert.*`` + ``cls.*``; or `VisualBertModel`)
    -> `DecomposedEncoder` keys: ``embeddings.visual_*`` become ``img_embeddings.visual_*``."""
    out: Tensors = {}
    for key, value in normalize_keys(state).items():
        if key.startswith("cls."):
            continue
        name = key.removeprefix("visual_bert.")
        if name.startswith("embeddings.") and name[len("embeddings."):].startswith(VISUALBERT_REGION_KEYS):
            name = "img_embeddings." + name[len("embeddings."):]
        elif not name.startswith(("embeddings.", "encoder.", "pooler.")):
            raise CheckpointError(f"unexpected key {key!r} in a VisualBERT checkpoint")
        out["bert." + name] = value
    if "bert.img_embeddings.visual_projection.weight" not in out:
        raise CheckpointError("not a VisualBERT checkpoint: no embeddings.visual_projection")
    return out


@dataclass
class DecomposeSource:
    """A resolved source: its converted weights, shape and tokenizer."""

    name: str
    kind: str  # uniter | visualbert | decomposed | vilt | decomposed-vilt
    state: Tensors  # `DecomposedEncoder` keys (`ViltDecomposedEncoder`'s for vilt / decomposed-vilt)
    config: Any  # `DecomposedConfig` (`ViltDecomposedConfig`): shape, tokenizer (tags and lengths set by the caller)
    directory: Path | None  # folder holding tokenizer files, when there is one


def read_decompose_source(name: str | Path) -> DecomposeSource:
    """Resolve a registry name / cache name / path to a single-stream source (never touches the network)."""
    from models.hub.catalogue import find_entry
    from models.hub.load import resolve_source

    path = resolve_source(name)
    entry = find_entry(str(name))
    if path.is_dir():
        config_path = path / CONFIG_FILE
        raw = read_json_object(config_path, CheckpointError, "", "re-download or re-import the model") \
            if config_path.is_file() else {}
        if raw.get("format") == MODEL_FORMAT:
            meta = read_model_config(path)
            state = load_tensors(path / WEIGHTS_FILE)
            if meta["kind"] == "decomposed":
                return DecomposeSource(str(name), "decomposed", dict(state),
                                       DecomposedConfig.from_dict(meta["config"]), path)
            if meta["kind"] == "decomposed-vilt":
                from models.nn.vilt import ViltDecomposedConfig

                return DecomposeSource(str(name), "decomposed-vilt", dict(state),
                                       ViltDecomposedConfig.from_dict(meta["config"]), path)
            if meta["kind"] == "uniter-itm":
                cross = CrossEncoderConfig.from_dict(meta["config"])
                config = DecomposedConfig(body=cross.body, img_dim=cross.img_dim, pos_dim=cross.pos_dim,
                                          tokenizer=cross.tokenizer, lowercase=cross.lowercase)
                return DecomposeSource(str(name), "uniter", uniter_to_decomposed(state), config, path)
            raise ModelError(f"{path} holds a {meta['kind']} model: decompose a single-stream cross-encoder "
                             "(uniter-base, visualbert-vqa-coco-pre, vilt-flickr30k, a uniter-itm model) instead")
        if raw.get("model_type") == "vilt":
            from models.hub.load import read_vilt_folder
            from models.nn.vilt import ViltDecomposedConfig, vilt_to_decomposed

            vilt, processor, state = read_vilt_folder(path)
            text_len = int(vilt.get("max_position_embeddings", 40))  # ViLT's own: every text position
            vilt_config = ViltDecomposedConfig(vilt=vilt, processor=processor, text_len=text_len)
            return DecomposeSource(str(name), "vilt", vilt_to_decomposed(state), vilt_config, path)
        if raw.get("model_type") == "visual_bert":
            weights = next((path / f for f in (WEIGHTS_FILE, "pytorch_model.bin") if (path / f).is_file()), None)
            if weights is None:
                raise ModelError(f"{path} holds no model.safetensors or pytorch_model.bin: download the weights "
                                 f"(`ldot models download {name}`)")
            body, img_dim = visualbert_config(raw, config_path)
            tokenizer = entry.tokenizer if entry is not None and entry.tokenizer else "bert-base-uncased"
            config = DecomposedConfig(body=body, img_dim=img_dim, region_embedding="visualbert", tokenizer=tokenizer,
                                      lowercase=True)
            return DecomposeSource(str(name), "visualbert", visualbert_to_decomposed(load_tensors(weights)), config,
                                   path)
        raise ModelError(f"{path} is neither an ldot cross-encoder nor a VisualBERT or ViLT directory: decompose "
                         "uniter-base, visualbert-vqa-coco-pre, vilt-flickr30k or a uniter-itm model")
    obj = load_tensors(path)
    if detect_format(obj) != "uniter":
        raise ModelError(f"{path} is a {detect_format(obj)} checkpoint: decompose a single-stream cross-encoder "
                         "(a UNITER .pt, uniter-base, visualbert-vqa-coco-pre)")
    state = uniter_to_decomposed(obj)
    body = heads_of_bare_checkpoint(path, infer_transformer_config({k[len("bert."):]: v for k, v in state.items()},
                                                                   ""))
    img_dim, pos_dim = (state[f"bert.img_embeddings.{n}.weight"].shape[1] for n in ("img_linear", "pos_linear"))
    tokenizer = entry.tokenizer if entry is not None and entry.tokenizer else "bert-base-cased"
    return DecomposeSource(str(name), "uniter", state, DecomposedConfig(body=body, img_dim=img_dim, pos_dim=pos_dim,
                                                                        tokenizer=tokenizer), None)


def decomposed_model(source: DecomposeSource, tokenizer: Tokenizer, *, tags: tuple[str, ...] = (),
                     text_len: int | None = None, max_regions: int | None = None,
                     temperature: float | None = None) -> DecomposedEncoder | ViltDecomposedEncoder:
    """The model decomposition starts from: the source's weights in a `DecomposedEncoder` (strictly loaded),
    with the tokenizer's special ids, the tag vocabulary and the input lengths; for ViLT (which reads pixels), a
    `ViltDecomposedEncoder` (no tags, no regions)."""
    overrides: dict[str, Any] = {"cls_token_id": tokenizer.cls_id, "sep_token_id": tokenizer.sep_id,
                                 "pad_token_id": tokenizer.pad_id}
    if source.kind in ("vilt", "decomposed-vilt"):
        return _vilt_decomposed(source, tokenizer, overrides, tags, text_len, max_regions, temperature)
    if source.kind != "decomposed" or tags:
        overrides["tags"] = tuple(tags)
    for key, value in (("text_len", text_len), ("max_regions", max_regions), ("temperature", temperature)):
        if value is not None:
            overrides[key] = value
    try:
        config = replace(source.config, **overrides)
    except ValueError as exc:  # a length or temperature out of range (`models.nn.config.DecomposedConfig`)
        raise ModelError(f"cannot decompose {source.name}: {exc}") from None
    if config.body.vocab_size != tokenizer.vocab_size:
        raise ModelError(f"{source.name} has a {config.body.vocab_size}-word vocabulary but its tokenizer has "
                         f"{tokenizer.vocab_size}: pass the source's own tokenizer")
    model = DecomposedEncoder(config, tokenizer)
    return _with_source_weights(model, source)


def _with_source_weights(model: _M, source: DecomposeSource) -> _M:
    """``model`` with the source's weights (float32), loaded strictly: a key missing or left over is an error."""
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in source.state.items()}
    try:
        load_strict(model, state)
    except CheckpointError as exc:
        raise CheckpointError(f"{source.name}: {exc}") from None
    return model


def _vilt_decomposed(source: DecomposeSource, tokenizer: Tokenizer, overrides: dict[str, Any], tags: tuple[str, ...],
                     text_len: int | None, max_regions: int | None, temperature: float | None) -> ViltDecomposedEncoder:
    from models.nn.vilt import ViltDecomposedEncoder

    if tags or max_regions is not None:
        raise ModelError(f"{source.name} reads pixels: object tags and {option('max_regions')} do not apply to it")
    for key, value in (("text_len", text_len), ("temperature", temperature)):
        if value is not None:
            overrides[key] = value
    try:
        config = replace(source.config, **overrides)
    except ValueError as exc:
        raise ModelError(f"{source.name}: {exc}") from None
    if tokenizer.vocab_size > int(config.vilt["vocab_size"]):
        raise ModelError(f"{source.name} has a {config.vilt['vocab_size']}-word vocabulary but its tokenizer has "
                         f"{tokenizer.vocab_size}: pass the source's own tokenizer")
    model = ViltDecomposedEncoder(config, tokenizer)
    return _with_source_weights(model, source)


def source_tokenizer(source: DecomposeSource) -> Tokenizer:
    """The tokenizer of a source: its own files, else its configured one (fetched when missing)."""
    from models.hub.load import resolve_tokenizer

    return resolve_tokenizer(None, source.config, str(source.directory) if source.directory else None)
