"""Reading official checkpoints safely, converting them, and our self-describing model directories.

Official LightningDOT/UNITER files are torch pickles without a config. They are read only with
``torch.load(weights_only=True)``; the format is detected by sentinel keys; names are mapped by pure
functions; the config is inferred from tensor shapes; and loading is strict (every key accounted for).

A converted model directory holds::

    config.json          {"format": "ldot-model", "format_version": 1, "kind": ..., "config": {...}, "source": {...}}
    model.safetensors    the weights (memory-mapped on load)
    tokenizer.json       when the tokenizer was available at conversion time
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn

from models.core.config import range_problem
from models.core.device import pick_device
from models.core.errors import CheckpointError, UnsafeCheckpointError
from models.core.fileio import new_dir, read_json_object
from models.nn.bi_encoder import BiEncoder, TokenizerSpec
from models.nn.config import BiEncoderConfig, CrossEncoderConfig, TransformerConfig
from models.nn.cross_encoder import CrossEncoder
from models.nn.tokenizer import Tokenizer

MODEL_FORMAT = "ldot-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# Pre-training heads in `LightningDot.pt` (and UNITER pre-training files), dropped for retrieval.
PRETRAIN_HEADS = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")

Tensors = dict[str, torch.Tensor]


# -- reading ---------------------------------------------------------------------------------------
def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with errors that say what happened and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): download or copy it again")
    with path.open("rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip archive, or a pickle (legacy)
        raise CheckpointError(f"{path} is not a model checkpoint (neither a torch file nor a pickle): give the "
                              ".pt/.bin/.pkl weights file or the model folder")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) torch files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "it is not a plain tensor pickle"
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            what = f" (it asks for {found.group(1)})" if found else ""
            raise UnsafeCheckpointError(
                f"refused to load {path}: the pickle needs more than tensors and plain containers{what}; "
                "only load checkpoints from sources you trust, and convert them to safetensors") from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({reason})") from None
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); download it again") from None


def load_tensors(path: str | Path) -> Any:
    """Any supported weight file: ``.safetensors`` (memory-mapped) or a torch pickle (weights only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file ({exc})") from None
    return safe_torch_load(path)


# -- key normalisation and format detection -----------------------------------------------------
def normalize_keys(state: Mapping[str, Any]) -> Tensors:
    """Old LayerNorm names ``gamma``/``beta`` -> ``weight``/``bias``; strip ``module.`` (DataParallel);
    drop ``position_ids`` buffers (transformers >= 3 adds them; they hold no weights)."""
    out: Tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
        key = key.removeprefix("module.")
        if key.endswith("position_ids"):
            continue
        key = re.sub(r"\.gamma$", ".weight", key)
        key = re.sub(r"\.beta$", ".bias", key)
        out[key] = value
    return out


def detect_format(obj: Any) -> str:
    """Name the layout of a loaded checkpoint by its sentinel keys.

    Returns one of ``lightningdot-finetuned`` (``{model_dict, ...}``), ``lightningdot-pretrained``
    (flat, ``bert.img_model.*`` + heads), ``bi-encoder`` (``img_model.*``/``txt_model.*``), ``uniter``
    (a UNITER body under ``bert.``/``uniter.``), ``bert`` (a text-only BERT), ``frcnn`` (the BUTD detector).
    """
    if isinstance(obj, Mapping) and "model_dict" in obj:
        return "lightningdot-finetuned"
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError("checkpoint holds no state dict (expected a dict of tensors)")
    keys = [k.removeprefix("module.") for k in obj]
    if any(k.startswith("bert.img_model.") or k.startswith("bert.txt_model.") for k in keys):
        return "lightningdot-pretrained"
    if any(k.startswith("img_model.") for k in keys) and any(k.startswith("txt_model.") for k in keys):
        return "bi-encoder"
    if any(k.startswith("backbone.") for k in keys) and any(k.startswith("roi_heads.") for k in keys):
        return "frcnn"
    if any(".img_embeddings." in k or k.startswith("img_embeddings.") for k in keys):
        return "uniter"
    if any(k.endswith("embeddings.word_embeddings.weight") for k in keys):
        return "bert"
    raise CheckpointError(f"unrecognised checkpoint layout (first keys: {', '.join(keys[:4])})")


def bi_encoder_state(obj: Any) -> tuple[Tensors, str]:
    """Any official bi-encoder layout -> (our state dict ``img_model.*``/``txt_model.*``, format name)."""
    fmt = detect_format(obj)
    if fmt == "lightningdot-finetuned":
        state = normalize_keys(obj["model_dict"])
    elif fmt == "lightningdot-pretrained":
        state = {}
        for key, value in normalize_keys(obj).items():
            if key.startswith("bert."):
                state[key[len("bert."):]] = value
            elif not key.startswith(PRETRAIN_HEADS):
                raise CheckpointError(f"unexpected key {key!r} in a LightningDOT pre-training checkpoint")
    elif fmt == "bi-encoder":
        state = normalize_keys(obj)
    elif fmt == "uniter":
        raise CheckpointError("this is a UNITER checkpoint, not a bi-encoder: use it as a re-ranker "
                              "(models.load_reranker / `ldot search --rerank`) or to initialise `ldot train`")
    else:
        raise CheckpointError(f"this is a {fmt} checkpoint, not a LightningDOT bi-encoder")
    return state, fmt


def uniter_state(obj: Any) -> Tensors:
    """A UNITER checkpoint -> our cross-encoder keys (``bert.*`` body, ``rank_output.*``).

    Accepts the body under ``uniter.`` (UNITER repo) or ``bert.`` (LightningDOT's copy). A retrieval
    fine-tuned file has ``rank_output``; a pre-trained one only the 2-way ``itm_output``, whose
    "matched" row initialises ``rank_output`` (UNITER's own ``init_output``). Other heads are dropped.
    """
    if detect_format(obj) != "uniter":
        raise CheckpointError("not a UNITER checkpoint (no img_embeddings keys)")
    state: Tensors = {}
    heads: Tensors = {}
    for key, value in normalize_keys(obj).items():
        for prefix in ("uniter.", "bert."):
            if key.startswith(prefix):
                state["bert." + key[len(prefix):]] = value
                break
        else:
            if key.startswith(("rank_output.", "itm_output.")):
                heads[key] = value
            elif not key.startswith(PRETRAIN_HEADS):
                raise CheckpointError(f"unexpected key {key!r} in a UNITER checkpoint")
    if "rank_output.weight" in heads:
        state["rank_output.weight"] = heads["rank_output.weight"]
        state["rank_output.bias"] = heads["rank_output.bias"]
    elif "itm_output.weight" in heads:
        state["rank_output.weight"] = heads["itm_output.weight"][1:].clone()
        state["rank_output.bias"] = heads["itm_output.bias"][1:].clone()
    else:
        raise CheckpointError("UNITER checkpoint has neither rank_output nor itm_output: it cannot score pairs")
    return state


# -- config inference ------------------------------------------------------------------------------
def infer_transformer_config(state: Mapping[str, torch.Tensor], prefix: str) -> TransformerConfig:
    """Derive a body's shape from its tensors (heads = hidden / 64, the BERT convention)."""
    try:
        vocab, hidden = state[f"{prefix}embeddings.word_embeddings.weight"].shape
        max_pos = state[f"{prefix}embeddings.position_embeddings.weight"].shape[0]
        types = state[f"{prefix}embeddings.token_type_embeddings.weight"].shape[0]
        inter = state[f"{prefix}encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the model shape: missing {exc.args[0]!r}") from None
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", k))}
    try:
        return TransformerConfig(vocab_size=vocab, hidden_size=hidden, num_layers=len(layer_ids),
                                 num_heads=max(1, hidden // 64), intermediate_size=inter,
                                 max_position_embeddings=max_pos, type_vocab_size=types)
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's shape is not a model ldot can build: {exc}") from None


def heads_of_bare_checkpoint(path: str | Path, body: TransformerConfig) -> TransformerConfig:
    """``body`` with the attention-head count of a bare checkpoint file (a state dict: no head count in it):
    from a BERT-style JSON config beside it (``<stem>.json`` as UNITER ships ``uniter-base.json``, or
    ``config.json``; key ``num_attention_heads``) when there is one; else the shapes' assumption
    (hidden / 64) stays and a warning says so, since a wrong count changes every score silently."""
    import warnings

    from models.core.errors import LdotWarning

    path = Path(path)
    for cand in (path.with_suffix(".json"), path.parent / CONFIG_FILE):
        if not cand.is_file():
            continue
        try:
            raw = json.loads(cand.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{cand} is not valid JSON ({exc})") from None
        heads = raw.get("num_attention_heads") if isinstance(raw, dict) else None
        if heads is None:
            continue
        if not isinstance(heads, int) or heads < 1 or body.hidden_size % heads:
            raise CheckpointError(f"{cand}: num_attention_heads {heads!r} does not divide the hidden size "
                                  f"{body.hidden_size} of {path.name}")
        return replace(body, num_heads=heads)
    warnings.warn(LdotWarning(f"{path} holds no attention-head count: assumed {body.num_heads} (hidden "
                              f"{body.hidden_size} / 64, BERT's convention); if it has another, put its config "
                              f"(num_attention_heads) beside it as {path.with_suffix('.json').name}"), stacklevel=2)
    return body


def infer_bi_encoder_config(state: Mapping[str, torch.Tensor], **overrides: Any) -> BiEncoderConfig:
    """A `BiEncoderConfig` that fits the given bi-encoder state dict."""
    try:
        img_dim = state["img_model.bert.img_embeddings.img_linear.weight"].shape[1]
        pos_dim = state["img_model.bert.img_embeddings.pos_linear.weight"].shape[1]
        project_dim = state["txt_model.encode_proj.3.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the model shape: missing {exc.args[0]!r}") from None
    fields: dict[str, Any] = dict(text=infer_transformer_config(state, "txt_model.bert."),
                                  image=infer_transformer_config(state, "img_model.bert."),
                                  img_dim=img_dim, pos_dim=pos_dim, project_dim=project_dim)
    fields.update(overrides)
    try:
        return BiEncoderConfig(**fields)
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's shape is not a model ldot can build: {exc}") from None


def infer_cross_encoder_config(state: Mapping[str, torch.Tensor], **overrides: Any) -> CrossEncoderConfig:
    try:
        img_dim, pos_dim = (state[f"bert.img_embeddings.{n}.weight"].shape[1] for n in ("img_linear", "pos_linear"))
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the model shape: missing {exc.args[0]!r}") from None
    try:
        return CrossEncoderConfig(body=infer_transformer_config(state, "bert."), img_dim=img_dim, pos_dim=pos_dim,
                                  **overrides)
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's shape is not a model ldot can build: {exc}") from None


# -- Hugging Face config.json (VisualBERT, LXMERT) ----------------------------------------------------
HF_BODY_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_attention_heads": "num_heads",
                "intermediate_size": "intermediate_size", "max_position_embeddings": "max_position_embeddings",
                "type_vocab_size": "type_vocab_size", "layer_norm_eps": "layer_norm_eps",
                "hidden_dropout_prob": "dropout"}  # its key -> our `TransformerConfig` field


def hf_transformer_config(raw: Mapping[str, Any], path: str | Path, layers: str = "num_hidden_layers",
                          required: Iterable[str] = ()) -> TransformerConfig:
    """The transformer body a Hugging Face BERT-family ``config.json`` describes (``layers``: the key of its layer
    count), every value range-checked as ldot's own configs are (`models.core.config.bounded`). Raises
    `CheckpointError` naming the file and ITS key for a missing required key or an absurd value."""
    keys = {**HF_BODY_KEYS, layers: "num_layers"}
    missing = [k for k in required if k not in raw]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(map(repr, missing))}: not a complete model config")
    values = {ours: raw[theirs] for theirs, ours in keys.items() if theirs in raw}
    problem = range_problem(TransformerConfig, values, {ours: theirs for theirs, ours in keys.items()})
    if problem is None:
        try:
            return TransformerConfig(**values)
        except (ValueError, TypeError) as exc:
            problem = str(exc)
    raise CheckpointError(f"{path}: {problem}: not a model ldot can build (the file is damaged or not this model's)")


def check_lxmert_config(raw: Mapping[str, Any], path: str | Path) -> None:
    """An LXMERT ``config.json`` checked before transformers builds it: its body (each of its language, cross and
    vision layer counts) and region sizes in range. Raises `CheckpointError` naming the file and the key."""
    for layers in ("l_layers", "x_layers", "r_layers"):
        hf_transformer_config(raw, path, layers)
    names = {"img_dim": "visual_feat_dim", "pos_dim": "visual_pos_dim"}
    problem = range_problem(CrossEncoderConfig, {ours: raw[theirs] for ours, theirs in names.items() if theirs in raw},
                            names)
    if problem:
        raise CheckpointError(f"{path}: {problem}: not a model ldot can build (the file is damaged or not this "
                              "model's)")


def visualbert_config(hf: dict[str, Any], path: str | Path = "config.json") -> tuple[TransformerConfig, int]:
    """(body shape, region feature size) from a VisualBERT ``config.json`` (``path``), range-checked: a
    `CheckpointError` naming the file and the key otherwise."""
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"VisualBERT hidden_act {act!r} is not supported (expected 'gelu')")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "visual_embedding_dim")
    body = hf_transformer_config(hf, path, "num_hidden_layers", required)
    pad = hf.get("pad_token_id", 1)  # the row without gradient: VisualBertConfig's default 1
    if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < body.vocab_size:
        raise CheckpointError(f"{path}: pad_token_id {pad!r} is not a row of the {body.vocab_size}-word vocabulary: "
                              "not a model ldot can build")
    body = dataclasses.replace(body, padding_idx=pad)
    problem = range_problem(CrossEncoderConfig, {"img_dim": hf["visual_embedding_dim"]},
                            {"img_dim": "visual_embedding_dim"})
    if problem:
        raise CheckpointError(f"{path}: {problem}: not a model ldot can build")
    return body, int(hf["visual_embedding_dim"])


# -- strict loading ------------------------------------------------------------------------------
def _short(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], *, assign: bool = False) -> None:
    """Load every tensor or fail listing the missing, unexpected and mis-shaped keys."""
    check_state(model, state)
    model.load_state_dict(state, strict=True, assign=assign)


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Fail listing the missing, unexpected and mis-shaped keys of ``state`` for ``model`` (which may be on the meta
    device: a check of shapes before anything is allocated)."""
    expected = model.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_short(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} of another shape: {_short(shapes, 4)}")
    if problems:
        raise CheckpointError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(problems))


_P = ParamSpec("_P")
_M = TypeVar("_M", bound=nn.Module)


def _keep(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """An initialiser that leaves the tensor as it is."""
    return tensor


def _no_fill(self: nn.Embedding) -> None:
    """`nn.Embedding`'s zeroing of its padding row, skipped."""


def build_on_meta(factory: Callable[_P, _M], *args: _P.args, **kwargs: _P.kwargs) -> _M:
    """Build a module without allocating or initialising weights (they are assigned by `load_strict`).

    Initialisers are skipped too: on the meta device they would go through torch's reference ops, whose
    first use imports torch._dynamo (1.7 s of a search's start-up, measured).
    """
    import contextlib
    from unittest import mock

    with contextlib.ExitStack() as skip:
        for name in ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_"):
            skip.enter_context(mock.patch.object(nn.init, name, _keep))
        skip.enter_context(mock.patch.object(nn.Embedding, "_fill_padding_idx_with_zero", _no_fill))
        with torch.device("meta"):
            return factory(*args, **kwargs)


def cast_state(state: Tensors, dtype: torch.dtype | None) -> Tensors:
    if dtype is None:
        return state
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


# -- model directories ----------------------------------------------------------------------------
def read_model_config(directory: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a model directory, checked for our format and version."""
    path = Path(directory) / CONFIG_FILE
    meta = read_json_object(path, CheckpointError, f"{directory} is not an ldot model directory (no {CONFIG_FILE})",
                            "re-import or re-download the model")
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not an ldot model config (format {meta.get('format')!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version {version!r} is not a number: re-import or re-download the "
                              "model")
    if not isinstance(meta.get("kind"), str) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} lacks its model kind or config (or they are of the wrong type): re-import or "
                              "re-download the model")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{directory} was written by a newer ldot (model format {version}, this ldot "
                              f"reads {FORMAT_VERSION}): upgrade ldot, or re-import the original checkpoint")
    return meta


def save_model_dir(directory: str | Path, kind: str, config: dict[str, Any], state: Tensors,
                   source: dict[str, Any] | None = None, tokenizer: Tokenizer | None = None) -> Path:
    """Write a self-describing model directory atomically (a temp dir renamed into place)."""
    from safetensors.torch import save_file

    from models.core.version import __version__

    directory = Path(directory)
    with new_dir(directory) as tmp:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(contiguous, str(tmp / WEIGHTS_FILE), metadata={"format": MODEL_FORMAT, "kind": kind})
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "config": config,
                "source": source or {}, "ldot_version": __version__}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_model_state(directory: str | Path) -> tuple[dict[str, Any], Tensors]:
    """(config.json contents, memory-mapped weights) of a model directory."""
    meta = read_model_config(directory)
    return meta, load_tensors(Path(directory) / WEIGHTS_FILE)


def cross_encoder_from_state(obj: Any, config: CrossEncoderConfig | None = None,
                             dtype: torch.dtype | None = torch.float32) -> CrossEncoder:
    """A `CrossEncoder` from any UNITER layout (official or our own keys; `uniter_state` maps both)."""
    state: Tensors = uniter_state(obj)
    config = config or infer_cross_encoder_config(state)
    model = build_on_meta(CrossEncoder, config)
    load_strict(model, cast_state(state, dtype), assign=True)
    return model.eval()


TOWERS = {"text": "txt_model", "image": "img_model"}


def bi_encoder_from_state(state: Tensors, config: BiEncoderConfig | None = None,
                          device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
                          tokenizer: TokenizerSpec = None, towers: tuple[str, ...] = ("text", "image")) -> BiEncoder:
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
