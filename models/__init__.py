"""LightningDOT networks, checkpoints, losses and the named-checkpoint registry.

Public API::

    import models
    enc = models.load_bi_encoder(source, tokenizer=None, device="cpu")
    enc.encode_text(["a dog on a beach"])                 # (n, 768)
    enc.encode_token_ids(input_ids, attention_mask=None)  # (n, 768)
    enc.encode_regions(features, norm_bb, mask=None)      # (B, 768)
    rr = models.load_reranker(source)
    rr.score(texts, features, norm_bb, mask=None)         # (n,)

    # training (models.training; `ldot train` wraps it)
    model, report = models.initial_model("bert-base-cased")         # + uniter-base image tower when present
    models.train(run_dir, TrainData(pairs, features, val), models.finetune_config("flickr30k"), model, tokenizer)
    models.export_model(run_dir, "my-model")                        # -> <home>/models/my-model

Heavy modules (torch) load on first use, so importing this package is instant.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import CheckpointError, DownloadError, LdotError, ModelError, ModelNotFoundError, UnsafeCheckpointError
from .home import ldot_home
from .registry import list_pretrained

_LAZY = {
    "load_bi_encoder": "loading",
    "bi_encoder_from_state": "loading",
    "convert_checkpoint": "loading",
    "load_reranker": "reranker",
    "BiEncoder": "bi_encoder",
    "CrossEncoder": "reranker",
    "BiEncoderConfig": "config",
    "CrossEncoderConfig": "config",
    "TransformerConfig": "config",
    "preset": "config",
    "Tokenizer": "tokenizer",
    "download_entry": "download",
    "BiEncoderForPretraining": "pretraining",
    "initial_model": "initialization",
    "train": "training",
    "export_model": "training",
    "TrainConfig": "training",
    "finetune_config": "training",
    "pretrain_config": "training",
    "TrainData": "train_data",
    "PairSet": "train_data",
}

__all__ = ["CheckpointError", "DownloadError", "LdotError", "ModelError", "ModelNotFoundError",
           "UnsafeCheckpointError", "ldot_home", "list_pretrained", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
