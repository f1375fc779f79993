"""Entry points that turn a source (path, model dir, registry name) into a ready model."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from models.core.device import pick_device
from models.core.errors import CheckpointError, ModelError, ModelNotFoundError, option
from models.core.fileio import sha256_file
from models.core.home import models_dir
from models.hub.dual import is_dual_dir, load_dual_encoder
from models.hub.formats import (
    bi_encoder_from_state,
    bi_encoder_state,
    build_on_meta,
    cast_state,
    check_lxmert_config,
    cross_encoder_from_state,
    load_model_state,
    load_strict,
    load_tensors,
)
from models.hub.installed import check_model_files
from models.nn.config import BiEncoderConfig, CrossEncoderConfig, DecomposedConfig
from models.nn.cross_encoder import LxmertReranker, UniterReranker
from models.nn.decomposed import DecomposedEncoder
from models.nn.encoder import Encoder, Inputs
from models.nn.tokenizer import Tokenizer, has_tokenizer_files
from models.nn.vilt import PREPROCESSOR_FILE, VILT_HEAD, VILT_WEIGHTS, ViltReranker

if TYPE_CHECKING:
    from models.nn.bi_encoder import TokenizerSpec
    from models.nn.vilt import ViltDecomposedEncoder

# what a caller may pass as a model's tokenizer: one, a path to its files, or None (the model's own, or the one its
# config names)
TokenizerArg = Tokenizer | str | Path | None
_C = TypeVar("_C")
_M = TypeVar("_M")


class _NamesTokenizer(Protocol):
    """A model config naming its tokenizer (a path or a registry name) and whether it lower-cases."""

    @property
    def tokenizer(self) -> str: ...

    @property
    def lowercase(self) -> bool: ...


def resolve_source(source: str | Path) -> Path:
    """A path as given, or the directory of a named model in the cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    name = str(source)
    candidate = models_dir() / name
    from models.hub.catalogue import find_entry
    from models.hub.installed import half_downloaded

    entry = find_entry(name)
    if candidate.exists() and not (candidate.is_dir() and half_downloaded(candidate)):
        return candidate
    if entry is not None:
        from models.hub.installed import is_present

        if is_present(entry.name):
            return models_dir() / entry.name
        raise ModelNotFoundError(f"model {name!r} is not downloaded (or only partly): run `ldot models download "
                                 f"{entry.name}` (it resumes), or `ldot models import FILE --as {entry.name}`")
    raise ModelNotFoundError(f"no model or file named {name!r}: see `ldot models list`, or pass a path")


def load_bi_encoder(source: str | Path, tokenizer: TokenizerArg = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = torch.float32,
                    towers: tuple[str, ...] = ("text", "image")) -> Encoder:
    """Load the encoder a search runs on (`models.nn.encoder.Encoder`): a LightningDOT bi-encoder from an official
    ``.pt`` (fine-tuned or pre-trained), a converted model directory, a ``.safetensors`` file, or a registry name
    present in the cache; a decomposed (VLDeformer) model dir; or a CLIP / SigLIP folder (a `DualEncoder` that
    reads pixels). ``towers=("text",)`` loads a LightningDOT bi-encoder's text tower alone; ``("image",)`` the image
    tower alone of a bi-encoder or a dual encoder (a decomposed model always loads whole).

    Never touches the network: the tokenizer (``tokenizer=`` a path, else the model's own, else the
    configured name) is resolved on the first `encode_text`.
    """
    path = resolve_source(source)
    model_dir = None
    if path.is_dir() and is_dual_dir(path):
        check_model_files(path)
        if tokenizer:
            raise ModelError(f"{source} is a dual encoder: it reads texts with its own tokenizer (leave out "
                             f"{option('tokenizer')})")
        return load_dual_encoder(path, device=device, dtype=dtype, image_only=tuple(towers) == ("image",))
    if path.is_dir():
        check_model_files(path)
        meta, state = load_model_state(path)
        if meta["kind"] == "decomposed":
            return _load_decomposed(path, meta, state, tokenizer, device, dtype)
        if meta["kind"] == "decomposed-vilt":
            return _load_decomposed_vilt(path, meta, state, tokenizer, device, dtype)
        if meta["kind"] != "bi-encoder":
            raise CheckpointError(f"{path} holds a {meta['kind']} model, not a bi-encoder")
        config = BiEncoderConfig.from_dict(meta["config"], str(path / "config.json"))
        model_dir = str(path)
    else:
        state, _ = bi_encoder_state(load_tensors(path))
        config = None
    model = bi_encoder_from_state(state, config, device=device, dtype=dtype, towers=towers)
    # found (or fetched) on the first encode_text
    model._tokenizer = _lazy_tokenizer(tokenizer, model.config, model_dir)
    return model


def model_inputs(source: str | Path) -> Inputs:
    """What a model's image tower reads, known without loading it (nor downloading it: a registry entry not in
    the cache answers from its kind): ``pixels`` (a dual encoder: no detector) or ``regions``."""
    from models.hub.catalogue import find_entry

    path = Path(source).expanduser()
    if not path.exists():
        entry = find_entry(str(source))
        if entry is not None:
            return "pixels" if entry.kind == "dual-encoder" else "regions"
        path = resolve_source(source)
    if not path.is_dir():
        return "regions"
    if is_dual_dir(path):
        return "pixels"
    try:  # an ldot model dir: a decomposed ViLT reads pixels too
        meta = json.loads((path / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return "regions"
    return "pixels" if isinstance(meta, dict) and meta.get("kind") == "decomposed-vilt" else "regions"


def _load_decomposed(path: Path, meta: dict[str, Any], state: dict[str, torch.Tensor], tokenizer: TokenizerArg,
                     device: str | torch.device, dtype: torch.dtype | None) -> DecomposedEncoder:
    """A decomposed (VLDeformer) encoder from its model dir: one body for texts and images."""
    config = DecomposedConfig.from_dict(meta["config"], str(path / "config.json"))
    model = build_on_meta(DecomposedEncoder, config)
    load_strict(model, cast_state(state, dtype), assign=True)
    model = model.to(pick_device(device)).eval()
    model._tokenizer = _lazy_tokenizer(tokenizer, config, str(path))
    return model


def _lazy_tokenizer(tokenizer: TokenizerArg, config: _NamesTokenizer, model_dir: str | None) -> TokenizerSpec:
    """What a model is given as its tokenizer: the one passed, or a callable that finds it (`resolve_tokenizer`)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    return functools.partial(resolve_tokenizer, tokenizer, config, model_dir)


def _load_decomposed_vilt(path: Path, meta: dict[str, Any], state: dict[str, torch.Tensor], tokenizer: TokenizerArg,
                          device: str | torch.device, dtype: torch.dtype | None) -> ViltDecomposedEncoder:
    """A decomposed ViLT from its model dir: one body for texts and pixels (`encode_text`, `encode_pixels`)."""
    from models.nn.vilt import ViltDecomposedConfig, ViltDecomposedEncoder

    config = ViltDecomposedConfig.from_dict(meta["config"], str(path / "config.json"))
    model = _build_without_init(ViltDecomposedEncoder, config)
    load_strict(model, cast_state(state, dtype))
    model = model.to(pick_device(device)).eval()
    model._tokenizer = _lazy_tokenizer(tokenizer, config, str(path))
    return model


def fingerprint(source: str | Path) -> str:
    """A short identity of a model's weights: what an index records to refuse another model.

    For a model directory, derived from the hashes in its manifest (recorded at download, import or
    training, so no re-hashing); otherwise from the weight files' sha256.
    """
    from models.hub.installed import read_manifest

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


def load_reranker(source: str | Path, tokenizer: TokenizerArg = None, device: str | torch.device | None = "auto",
                  dtype: torch.dtype | None = None) -> UniterReranker | LxmertReranker | ViltReranker:
    """A re-ranker from a registry name, a model directory, or a UNITER ``.pt``/``.safetensors``.

    UNITER and LXMERT score region features (``inputs == "regions"``); ViLT scores pixels (``"pixels"``).

    ``device="auto"`` takes the GPU when present. On a GPU the default dtype is float16; on CPU float32.
    """
    path = resolve_source(source)
    dev = pick_device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if path.is_dir():
        check_model_files(path)
    if path.is_dir() and (path / "config.json").is_file():
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path / 'config.json'} ({exc}): re-import or re-download the "
                                  "model") from None
        if isinstance(raw, dict) and raw.get("model_type") == "lxmert":
            check_lxmert_config(raw, path / "config.json")
            return _load_lxmert(path, tokenizer, dev, dtype)
        if isinstance(raw, dict) and raw.get("model_type") == "vilt":
            return load_vilt(path, tokenizer, dev, dtype)
        meta, state = load_model_state(path)
        if meta["kind"] != "uniter-itm":
            raise CheckpointError(f"{path} holds a {meta['kind']} model, not a re-ranker")
        config = CrossEncoderConfig.from_dict(meta["config"], str(path / "config.json"))
        model = cross_encoder_from_state(state, config, dtype=dtype).to(dev)
        return UniterReranker(model, resolve_tokenizer(tokenizer, config, str(path)))
    if path.is_dir():
        raise CheckpointError(f"{path} holds no config.json: not a model directory")
    model = cross_encoder_from_state(load_tensors(path), dtype=dtype).to(dev)
    return UniterReranker(model, resolve_tokenizer(tokenizer, model.config, None))


def _load_lxmert(path: Path, tokenizer: TokenizerArg, device: torch.device, dtype: torch.dtype) -> LxmertReranker:
    try:
        from transformers import LxmertForPreTraining
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise ModelError(f"LXMERT needs transformers ({exc})") from None
    try:
        model = LxmertForPreTraining.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load LXMERT from {path}: {str(exc).splitlines()[0]}") from None
    # (transformers wraps `to` with functools.wraps(nn.Module.to): typeshed's `_Wrapped` then wants ``self`` again)
    model = model.to(device).eval()  # type: ignore[arg-type]
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        tok = Tokenizer.from_path(tokenizer or path, lowercase=True)
    return LxmertReranker(model, tok)


def read_vilt_folder(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json without its bookkeeping keys, preprocessor_config.json, weights) of a ViLT retrieval folder
    (``config.json``, ``preprocessor_config.json``, ``model.safetensors`` or ``pytorch_model.bin``), every part
    checked: the head is ``ViltForImageAndTextRetrieval``, the processor's values are sane, and the weights (read as
    tensors only: safetensors, or a pickle through ``weights_only``; no code from the folder runs) have exactly the
    shapes the config asks for, checked on the meta device before anything is allocated."""
    try:
        from transformers import ViltConfig, ViltForImageAndTextRetrieval
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise ModelError(f"ViLT needs transformers ({exc})") from None
    from models.core.fileio import read_json_object
    from models.hub.formats import check_state, normalize_keys
    from models.nn.vilt import PixelPreprocessing

    raw = read_json_object(path / "config.json", CheckpointError, f"{path} holds no config.json",
                           "re-import or re-download the model")
    heads = raw.get("architectures") or [VILT_HEAD]
    if VILT_HEAD not in heads:
        raise CheckpointError(f"{path} holds a ViLT with another head ({', '.join(map(str, heads))}): ldot needs "
                              f"{VILT_HEAD} (vilt-coco, vilt-flickr30k)")
    config = {k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype", "dtype", "_name_or_path",
                                                        "transformers_version")}
    try:
        vilt_config = ViltConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / 'config.json'} is not a ViLT config ({exc})") from None
    weights = next((path / f for f in VILT_WEIGHTS if (path / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} holds no {' or '.join(VILT_WEIGHTS)}: download or import the model again")
    processor = read_json_object(path / PREPROCESSOR_FILE, CheckpointError, f"{path} holds no {PREPROCESSOR_FILE}",
                                 "re-import the save_pretrained folder with its processor files, or re-download")
    PixelPreprocessing.from_processor_config(processor, str(path / PREPROCESSOR_FILE))
    state = dict(normalize_keys(load_tensors(weights)))
    state.pop("vilt.embeddings.text_embeddings.token_type_ids", None)  # a buffer older files saved; no weights
    check_state(_build_without_init(ViltForImageAndTextRetrieval, vilt_config, meta=True), state)
    return config, processor, state


def load_vilt(path: Path, tokenizer: TokenizerArg = None, device: str | torch.device | None = "cpu",
              dtype: torch.dtype | None = torch.float32) -> ViltReranker:
    """ViLT fine-tuned for image-text retrieval from a Hugging Face folder (`read_vilt_folder`, and the tokenizer's
    files: vocab.txt or tokenizer.json, uncased), loaded strictly into ``ViltForImageAndTextRetrieval``.

    A config asking for a positive ``max_image_length`` (patches sampled at random) is read with every patch, so
    that a pair always gets the same score."""
    from transformers import ViltConfig, ViltForImageAndTextRetrieval

    from models.hub.formats import load_strict
    from models.nn.vilt import PixelPreprocessing

    raw, processor, state = read_vilt_folder(path)
    config = ViltConfig.from_dict(raw)
    config.max_image_length = -1
    model = _build_without_init(ViltForImageAndTextRetrieval, config)
    load_strict(model, cast_state(state, dtype) if dtype is not None else state)
    model = model.to(pick_device(device)).eval()  # type: ignore[arg-type]  # (`to` as in `_load_lxmert`)
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        tok = Tokenizer.from_path(tokenizer or path, lowercase=True)
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"the tokenizer of {path} has {tok.vocab_size} word-pieces and the model "
                              f"{config.vocab_size}: give the model's own vocab.txt / tokenizer.json")
    return ViltReranker(model, tok, PixelPreprocessing.from_processor_config(processor))


def _build_without_init(cls: Callable[[_C], _M], config: _C, meta: bool = False) -> _M:
    """A transformers model whose random initialisation is skipped (its weights are loaded right after: 0.1 s
    instead of 6 s for ViLT-B/32, measured); on the meta device (``meta``: shapes only, nothing allocated)."""
    with _no_init_weights(), (torch.device("meta") if meta else contextlib.nullcontext()):
        return cls(config)


def _no_init_weights() -> contextlib.AbstractContextManager[object]:
    """`transformers`' context that skips the random initialisation of the models built in it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x (mypy reads 5.x, where this module no longer has it)
        try:
            from transformers.modeling_utils import no_init_weights as no_init_weights_4  # type: ignore[attr-defined]
        except ImportError:  # pragma: no cover
            return contextlib.nullcontext()
        return no_init_weights_4()
    return no_init_weights()


def resolve_tokenizer(spec: TokenizerArg, config: _NamesTokenizer, model_dir: str | None) -> Tokenizer:
    """Find the tokenizer for a model.

    Order: an explicit ``spec`` (a Tokenizer, or a path to a file/dir); the model's own directory;
    ``config.tokenizer`` as a path or a registry name (from the cache, downloading its tokenizer files
    if missing: the only step that may touch the network).
    """
    if isinstance(spec, Tokenizer):
        return spec
    if spec:
        return Tokenizer.from_path(spec, lowercase=config.lowercase)
    if model_dir and has_tokenizer_files(Path(model_dir)):
        return Tokenizer.from_path(model_dir, lowercase=config.lowercase)
    name = config.tokenizer
    if not name:
        raise ModelError("this model names no tokenizer: pass tokenizer= a vocab.txt/tokenizer.json path")
    if Path(name).expanduser().exists():
        return Tokenizer.from_path(Path(name).expanduser(), lowercase=config.lowercase)
    from models.hub.fetch import ensure_tokenizer

    return Tokenizer.from_path(ensure_tokenizer(name), lowercase=config.lowercase)
