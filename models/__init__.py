"""LightningDOT networks, checkpoints, losses and the named-checkpoint registry.

Public API::

    import models
    enc = models.load_bi_encoder(source, tokenizer=None, device="cpu")
    enc.encode_text(["a dog on a beach"])                 # (n, 768)
    enc.encode_token_ids(input_ids, attention_mask=None)  # (n, 768)
    enc.encode_regions(features, norm_bb, mask=None)      # (B, 768)
    rr = models.load_reranker(source)
    rr.score(texts, features, norm_bb, mask=None)         # (n,)
    vilt = models.load_reranker("vilt-flickr30k")        # a cross-encoder that reads pixels (vilt.inputs == "pixels")
    vilt.score_images(texts, rgb_images)                  # (n,): decoded (H, W, 3) uint8 images

    # training (models.training.loop; `ldot train` wraps it)
    model, report = models.initial_model("bert-base-cased")         # + uniter-base image tower when present
    models.train(run_dir, TrainData(pairs, features, val), models.finetune_config("flickr30k"), model, tokenizer)
    models.export_model(run_dir, "my-model")                        # -> <home>/models/my-model

Heavy modules (torch) load on first use, so importing this package is instant.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from models.core.errors import (
    CheckpointError,
    DownloadError,
    LdotError,
    ModelError,
    ModelNotFoundError,
    UnsafeCheckpointError,
)
from models.core.home import ldot_home

_LAZY = {
    "list_pretrained": "hub.catalogue",
    "load_bi_encoder": "hub.load",
    "bi_encoder_from_state": "hub.formats",
    "convert_checkpoint": "hub.convert",
    "load_reranker": "hub.load",
    "BiEncoder": "nn.bi_encoder",
    "CrossEncoder": "nn.cross_encoder",
    "ViltReranker": "nn.vilt",
    "DualEncoder": "nn.dual",
    "Encoder": "nn.encoder",
    "load_dual_encoder": "hub.dual",
    "BiEncoderConfig": "nn.config",
    "CrossEncoderConfig": "nn.config",
    "TransformerConfig": "nn.config",
    "preset": "nn.config",
    "Tokenizer": "nn.tokenizer",
    "download_entry": "hub.fetch",
    "BiEncoderForPretraining": "nn.pretraining",
    "initial_model": "training.initialization",
    "train": "training.loop",
    "export_model": "training.loop",
    "TrainConfig": "training.loop",
    "finetune_config": "training.loop",
    "pretrain_config": "training.loop",
    "TrainData": "training.data",
    "PairSet": "training.data",
}

__all__ = ["CheckpointError", "DownloadError", "LdotError", "ModelError", "ModelNotFoundError",
           "UnsafeCheckpointError", "ldot_home", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
