"""Starting weights for training, from weights that are live today.

- Text tower: a Hugging Face BERT (``bert-base-cased`` from the hub: ``model.safetensors`` with
  ``BertForPreTraining`` / ``BertForMaskedLM`` / ``BertModel`` key names), mapped by `hf_bert_body`.
- Image tower: UNITER-base when present (``uniter-base`` in the cache, or an official ``uniter-base.pt``),
  mapped by `uniter_body`; else the same BERT weights (UNITER itself was initialised from BERT) with a fresh
  region embedding (``img_embeddings.*``).
- Projections, fresh heads and anything not loaded: BERT's init (normal 0.02, zero biases, LayerNorm 1/0).
- Or a whole bi-encoder (``lightningdot``, ``flickr-ft``, a model you trained, an official ``.pt``, our
  pre-training ``.safetensors`` with heads) to continue from.

Converters are pure functions on state dicts; loading is strict per part (`models.hub.formats.load_strict`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from models.core.errors import CheckpointError, ModelError
from models.core.fileio import read_json_object
from models.hub.formats import (
    CONFIG_FILE,
    MODEL_FORMAT,
    PRETRAIN_HEADS,
    WEIGHTS_FILE,
    Tensors,
    bi_encoder_state,
    detect_format,
    heads_of_bare_checkpoint,
    hf_transformer_config,
    infer_bi_encoder_config,
    infer_transformer_config,
    load_strict,
    load_tensors,
    normalize_keys,
    read_model_config,
)
from models.nn.config import BiEncoderConfig, TransformerConfig
from models.nn.pretraining import NUM_REGION_LABELS, TIED, BiEncoderForPretraining

if TYPE_CHECKING:
    from models.nn.tokenizer import Tokenizer

BODY_PARTS = ("embeddings.", "encoder.", "pooler.")
HEADS_FILE = "heads.safetensors"  # pre-training heads beside a pre-trained model dir's weights


# -- pure converters ---------------------------------------------------------------------------------------
def hf_bert_body(state: dict[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
    """Hugging Face BERT keys -> (our `BertBody` keys, MLM head keys ``predictions.*``).

    Accepts ``BertModel`` (no prefix) and ``BertForPreTraining`` / ``BertForMaskedLM`` (``bert.`` + ``cls.``),
    old ``gamma``/``beta`` LayerNorm names and ``position_ids`` buffers. The decoder (tied to the word
    embeddings) and the next-sentence head are dropped; any other key is an error.
    """
    body: Tensors = {}
    head: Tensors = {}
    for key, value in normalize_keys(state).items():
        name = key[len("bert."):] if key.startswith("bert.") else key
        if name.startswith(BODY_PARTS):
            body[name] = value
        elif key.startswith("cls.predictions.decoder.") or key.startswith("cls.seq_relationship."):
            continue
        elif key.startswith("cls.predictions."):
            head[key[len("cls."):]] = value
        else:
            raise CheckpointError(f"unexpected key {key!r} in a BERT checkpoint")
    if "embeddings.word_embeddings.weight" not in body:
        raise CheckpointError("not a BERT checkpoint: no embeddings.word_embeddings.weight")
    return body, head


def uniter_body(state: dict[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
    """A UNITER state dict -> (our `UniterBody` keys, pre-training head keys in our layout).

    Accepts the body under ``uniter.`` (UNITER repo) or ``bert.`` (LightningDOT's copy, our cross-encoder
    model dirs). Heads ``cls.*`` / ``feat_regress.*`` / ``region_classifier.*`` / ``itm_output.*`` are
    returned for `BiEncoderForPretraining` (tied aliases dropped); ``rank_output`` / ``itm_output`` alone
    are ITM heads of the cross-encoder and ignored by the bi-encoder.
    """
    body: Tensors = {}
    heads: Tensors = {}
    aliases = {alias for alias, _ in TIED}
    for key, value in normalize_keys(state).items():
        for prefix in ("uniter.", "bert."):
            if key.startswith(prefix):
                body[key[len(prefix):]] = value
                break
        else:
            if key.startswith(PRETRAIN_HEADS):
                if key not in aliases and not key.startswith("cls.predictions.decoder."):
                    heads[key] = value
            elif not key.startswith("rank_output."):
                raise CheckpointError(f"unexpected key {key!r} in a UNITER checkpoint")
    if not any(k.startswith("img_embeddings.") for k in body):
        raise CheckpointError("not a UNITER checkpoint: no img_embeddings")
    return body, heads


def bert_config(directory: Path | None, body: Tensors) -> TransformerConfig:
    """The body's shape from a Hugging Face ``config.json`` beside the weights, else from tensor shapes."""
    path = directory / CONFIG_FILE if directory is not None else None
    if path is not None and path.is_file():
        hf = read_json_object(path, CheckpointError, f"{path} is missing", "not a BERT config.json")
        if hf.get("model_type") == "bert":
            act = hf.get("hidden_act", "gelu")
            if act != "gelu":
                raise CheckpointError(f"{path}: hidden_act {act!r} is not supported (BERT uses 'gelu')")
            return hf_transformer_config(hf, path, "num_hidden_layers", required=(
                "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings"))
    return infer_transformer_config(body, "")


# -- initialisation ----------------------------------------------------------------------------------------
def bert_init_(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation, in place: Linear/Embedding ~ N(0, std), zero biases and padding rows, LN 1/0."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, 0.0, std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, 0.0, std)
            if sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def centre_region_embedding_(model: BiEncoderForPretraining, mean: np.ndarray) -> None:
    """Centre a FRESH region embedding on the training features, in place: ``img_linear(f)`` becomes
    ``W (f - mean) + b`` (only the bias changes: ``b -= W @ mean``; the weight, tied to the MRFR head, does not).

    Why: region features are non-negative (ReLU then mean-pooling), so they share a large common part. Features
    of ldot's detector with random weights have a mean of norm 2.0 against 0.12 of spread around it; a fresh
    ``Linear`` (N(0, 0.02)) then ``LayerNorm`` passes the common part on, every image starts as nearly the same
    vector, and CMR stays on its plateau at ln(batch) (tests/test_train_photos.py, 160 photos, 300 steps: mean
    recall 17.1 / 15.2 not centred, 50.4 / 54.2 / 61.7 centred, chance 13.0). Weights loaded from a UNITER were
    trained on their features: they are left alone."""
    linear = model.bert.img_model.bert.img_embeddings.img_linear
    mean_t = torch.as_tensor(np.asarray(mean, dtype=np.float32))
    if mean_t.shape != (linear.in_features,):
        raise ModelError(f"the mean region feature has shape {tuple(mean_t.shape)}, the region embedding reads "
                         f"{linear.in_features} dims")
    with torch.no_grad():
        linear.bias.sub_(linear.weight.float() @ mean_t)


def _load_part(module: nn.Module, state: Tensors, what: str, optional: tuple[str, ...] = ()) -> None:
    """Strictly load ``state`` into ``module``; parts starting with ``optional`` may be absent (kept fresh)."""
    current = module.state_dict()
    merged = {k: v for k, v in current.items() if k.startswith(optional) and k not in state}
    merged.update(state)
    try:
        load_strict(module, {k: v.to(current[k].dtype) if k in current else v for k, v in merged.items()})
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None


@dataclass
class Source:
    """A resolved weight source: what it holds and its tensors."""

    name: str  # as the user gave it
    path: Path
    kind: str  # bert | uniter | bi-encoder
    state: Tensors
    directory: Path | None  # folder holding config / tokenizer files, when there is one
    meta: dict[str, Any] = field(default_factory=dict)  # ldot config.json, for our model dirs
    heads: Tensors = field(default_factory=dict)  # pre-training heads (official names), when it has them


def read_source(name: str | Path) -> Source:
    """Resolve a registry name / cache name / path and classify it (never touches the network)."""
    from models.hub.load import resolve_source

    path = resolve_source(name)
    if path.is_dir():
        config_file = path / CONFIG_FILE
        if config_file.is_file() and read_json_object(config_file, CheckpointError, f"{config_file} is missing",
                                                      "not a model config ldot knows").get("format") == MODEL_FORMAT:
            meta = read_model_config(path)
            state = load_tensors(path / WEIGHTS_FILE)
            kind = {"bi-encoder": "bi-encoder", "uniter-itm": "uniter"}.get(meta["kind"])
            if kind is None:
                raise ModelError(f"{path} holds a {meta['kind']} model: it cannot initialise a bi-encoder")
            heads = load_tensors(path / HEADS_FILE) if (path / HEADS_FILE).is_file() else {}
            return Source(str(name), path, kind, state, path, meta, heads)
        for weights in (WEIGHTS_FILE, "pytorch_model.bin"):
            if (path / weights).is_file():
                return _classify(str(name), path / weights, load_tensors(path / weights), path)
        raise ModelError(f"{path} holds no model.safetensors or pytorch_model.bin: download the weights "
                         f"(`ldot models download {name}`)")
    return _classify(str(name), path, load_tensors(path), None)


def _classify(name: str, path: Path, obj: Any, directory: Path | None) -> Source:
    fmt = detect_format(obj)
    if fmt == "bert":
        return Source(name, path, "bert", dict(obj), directory)
    if fmt == "uniter":
        return Source(name, path, "uniter", dict(obj), directory)
    if fmt in ("lightningdot-finetuned", "lightningdot-pretrained", "bi-encoder"):
        state = obj["model_dict"] if fmt == "lightningdot-finetuned" else obj
        heads = {k: v for k, v in normalize_keys(state).items() if k.startswith(PRETRAIN_HEADS)}
        return Source(name, path, "bi-encoder", dict(state), directory, heads=heads)
    raise ModelError(f"{path} is a {fmt} checkpoint: it cannot initialise a bi-encoder")


@dataclass
class InitReport:
    """Where each part of the initial model came from (recorded in the trained model's source)."""

    text: str
    image: str
    heads: str
    tokenizer_dir: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "image": self.image, "heads": self.heads, "tokenizer_dir": self.tokenizer_dir}


def initial_model(init: str | Path | Source = "bert-base-cased", image_init: str | Path | Source | None = None, *,
                  img_dim: int = 2048, project_dim: int | None = None,
                  num_region_labels: int = NUM_REGION_LABELS,
                  seed: int = 42, region_mean: Callable[[], np.ndarray] | None = None
                  ) -> tuple[BiEncoderForPretraining, InitReport]:
    """The model training starts from.

    ``init`` is a bi-encoder (everything comes from it; heads too when the file has them) or a BERT (the
    text tower). For a BERT, ``image_init`` names the image tower's weights: a UNITER (``uniter-base``),
    or a BERT; by default ``uniter-base`` when it is in the cache, else the text tower's BERT.

    ``region_mean``: returns the training features' mean region (`data.region_feature_mean`); called only when
    the region embedding is fresh (an image tower from a BERT), which is then centred on it
    (`centre_region_embedding_`).
    """
    torch.manual_seed(seed)
    source = init if isinstance(init, Source) else read_source(init)
    if source.kind == "bi-encoder":
        return _from_bi_encoder(source, num_region_labels)
    if source.kind != "bert":
        raise ModelError(f"{init} is a {source.kind} checkpoint: initialise the text tower with a BERT "
                         f"(bert-base-cased) or start from a bi-encoder; pass UNITER as the image tower")
    text_body, text_head = hf_bert_body(source.state)
    text_cfg = bert_config(source.directory, text_body)
    if isinstance(image_init, Source):
        image_source = image_init
    else:
        image_source = read_source(image_init) if image_init is not None else _default_image_source(source)
    if image_source.kind == "uniter":
        image_body, heads = uniter_body(image_source.state)
        image_cfg = replace(_uniter_heads(image_source, infer_transformer_config(image_body, "")),
                            dropout=text_cfg.dropout)
        img_dim = image_body["img_embeddings.img_linear.weight"].shape[1]
    elif image_source.kind == "bert":
        image_body, heads = hf_bert_body(image_source.state)
        image_cfg = bert_config(image_source.directory, image_body)
        heads = {f"cls.{k}": v for k, v in heads.items()}
    else:
        raise ModelError(f"{image_source.name} is a {image_source.kind} checkpoint: the image tower starts from "
                         "a UNITER (uniter-base) or a BERT")
    if image_cfg.vocab_size != text_cfg.vocab_size:
        raise ModelError(f"text tower vocabulary {text_cfg.vocab_size} != image tower vocabulary "
                         f"{image_cfg.vocab_size}: both towers must share one tokenizer")
    config = BiEncoderConfig(text=text_cfg, image=image_cfg, img_dim=img_dim,
                             project_dim=project_dim or text_cfg.hidden_size,
                             tokenizer=_tokenizer_name(source), lowercase=_lowercase(source.directory))
    model = BiEncoderForPretraining(config, num_region_labels)
    bert_init_(model)
    _load_part(model.bert.txt_model.bert, text_body, f"text tower from {source.name}", optional=("pooler.",))
    optional = ("pooler.", "img_embeddings.") if image_source.kind == "bert" else ("pooler.",)
    _load_part(model.bert.img_model.bert, image_body, f"image tower from {image_source.name}", optional=optional)
    centred = ""
    if image_source.kind == "bert" and region_mean is not None:
        centre_region_embedding_(model, region_mean())
        centred = ", centred on the training features' mean"
    heads_from = _load_heads(model, heads, image_source.name)
    if heads_from is None and text_head:
        heads_from = _load_heads(model, {f"cls.{k}": v for k, v in text_head.items()}, source.name)
    report = InitReport(text=source.name, image=image_source.name + ("" if image_source.kind == "uniter" else
                                                                      f" (BERT; fresh region embedding{centred})"),
                        heads=heads_from or "fresh", tokenizer_dir=str(source.directory) if source.directory else None)
    return model, report


def _uniter_heads(source: Source, body: TransformerConfig) -> TransformerConfig:
    """The UNITER's attention-head count: from its ldot config, else from a config beside the file (a warning
    says what was assumed when there is none: `heads_of_bare_checkpoint`)."""
    if source.meta:
        from models.nn.config import CrossEncoderConfig

        return replace(body, num_heads=CrossEncoderConfig.from_dict(source.meta["config"]).body.num_heads)
    return heads_of_bare_checkpoint(source.path, body)


def _default_image_source(text_source: Source) -> Source:
    from models.hub.installed import is_present

    if is_present("uniter-base"):
        return read_source("uniter-base")
    return text_source


def _load_heads(model: BiEncoderForPretraining, heads: Tensors, origin: str) -> str | None:
    """Load whichever head modules ``heads`` fully covers with matching shapes; returns what was loaded."""
    loaded = []
    aliases = {alias for alias, _ in TIED}
    for head in ("cls", "feat_regress", "region_classifier", "itm_output"):
        module = getattr(model, head)
        prefix = head + "."
        part = {k[len(prefix):]: v for k, v in heads.items() if k.startswith(prefix) and k not in aliases}
        expected = {k: v for k, v in module.state_dict().items() if prefix + k not in aliases}
        if part.keys() == expected.keys() and all(part[k].shape == expected[k].shape for k in part):
            module.load_state_dict({**module.state_dict(), **{k: v.to(expected[k].dtype) for k, v in part.items()}})
            loaded.append(head)
    return f"{'+'.join(loaded)} from {origin}" if loaded else None


def _from_bi_encoder(source: Source, num_region_labels: int) -> tuple[BiEncoderForPretraining, InitReport]:
    if source.meta:
        config = BiEncoderConfig.from_dict(source.meta["config"])
        state = dict(source.state)
    else:
        state, _ = bi_encoder_state(source.state)
        config = infer_bi_encoder_config(state)
    labels = source.heads.get("region_classifier.net.3.weight")
    model = BiEncoderForPretraining(config, labels.shape[0] if labels is not None else num_region_labels)
    bert_init_(model)
    _load_part(model.bert, state, f"bi-encoder from {source.name}")
    heads_from = _load_heads(model, source.heads, source.name) if source.heads else None
    tok_dir = str(source.directory) if source.directory else None
    return model, InitReport(text=source.name, image=source.name, heads=heads_from or "fresh", tokenizer_dir=tok_dir)


def _tokenizer_name(source: Source) -> str:
    from models.hub.catalogue import find_entry

    entry = find_entry(source.name)
    if entry is not None:
        return entry.tokenizer or entry.name
    return str(source.directory or source.path)


def _lowercase(directory: Path | None) -> bool:
    if directory is None:
        return False
    try:
        return bool(json.loads((directory / "tokenizer_config.json").read_text()).get("do_lower_case", False))
    except (OSError, ValueError, AttributeError):  # absent, not JSON, not an object
        return False


def source_tokenizer(source: Source) -> Tokenizer:
    """The tokenizer that goes with a weight source: its own files, else its configured tokenizer (a
    registry name such as ``bert-base-cased``, whose tokenizer files are fetched if missing)."""
    from models.hub.load import resolve_tokenizer

    if source.meta:
        config = BiEncoderConfig.from_dict(source.meta["config"])
    elif source.kind == "bert":
        config = BiEncoderConfig(tokenizer=_tokenizer_name(source), lowercase=_lowercase(source.directory))
    else:
        config = BiEncoderConfig()
    return resolve_tokenizer(None, config, str(source.directory) if source.directory else None)
