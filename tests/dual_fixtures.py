"""Tiny random CLIP and SigLIP folders, as `save_pretrained` writes them (model + processor), built offline.

CLIP gets a real byte-level BPE `CLIPTokenizer` (the 256 byte characters, their ``</w>`` forms, a few merged
words); SigLIP a real SentencePiece model trained on a few sentences. Weights are random (seeded).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

WORDS = ("dog", "cat", "beach", "snow", "car", "red", "sea", "on", "the", "in", "a")
SENTENCES = ["a dog on a beach", "a cat on a sofa", "two dogs play in the snow", "a red car in the street",
             "people walk by the sea", "a photo of a cat", "the dog runs"] * 20


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what CLIP's BPE vocabulary is built on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_clip_tokenizer(directory: Path, max_length: int = 77):
    """A real `CLIPTokenizer` (byte-level BPE, lower-cased) over a tiny vocabulary; returns it."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:  # merge each word left to right: d o -> do, do g</w> -> dog</w>
        current = word[0]
        for i, ch in enumerate(word[1:], 1):
            piece = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{current} {piece}")
            current = current + piece
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    src = directory / "src"
    src.mkdir(exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"), model_max_length=max_length)
    return tokenizer


def write_siglip_tokenizer(directory: Path, max_length: int = 64):
    """A real `SiglipTokenizer` (SentencePiece, trained here on a few sentences); returns it."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=buf, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2)
    (directory / "spiece.model").write_bytes(buf.getvalue())
    return SiglipTokenizer(vocab_file=str(directory / "spiece.model"), model_max_length=max_length)


def tiny_dual(arch: str = "clip", seed: int = 0, image_size: int = 32, patch: int = 8, hidden: int = 32,
              layers: int = 2, heads: int = 2, projection: int = 16, vocab: int | None = None, full: bool = False):
    """(model, tokenizer, image processor) of a random CLIP / SigLIP; ``full``: the full-size config."""
    import tempfile

    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    scratch = Path(tempfile.mkdtemp(prefix="tok-"))
    torch.manual_seed(seed)
    if arch == "clip":
        tokenizer = write_clip_tokenizer(scratch)
        n = len(tokenizer)
        if full:
            config = CLIPConfig(text_config={"vocab_size": max(n, 49408), "eos_token_id": tokenizer.eos_token_id,
                                             "bos_token_id": tokenizer.bos_token_id,
                                             "pad_token_id": tokenizer.pad_token_id}, vision_config={})
            processor = CLIPImageProcessor()
        else:
            config = CLIPConfig(
                text_config={"vocab_size": vocab or n, "hidden_size": hidden, "intermediate_size": 37,
                             "num_hidden_layers": layers, "num_attention_heads": heads, "max_position_embeddings": 77,
                             "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
                             "pad_token_id": tokenizer.pad_token_id},
                vision_config={"hidden_size": hidden, "intermediate_size": 37, "num_hidden_layers": layers,
                               "num_attention_heads": heads, "image_size": image_size, "patch_size": patch},
                projection_dim=projection)
            processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size})
        model = CLIPModel(config)
    else:
        tokenizer = write_siglip_tokenizer(scratch)
        config = SiglipConfig(
            text_config={"vocab_size": vocab or len(tokenizer), "hidden_size": hidden, "intermediate_size": 37,
                         "num_hidden_layers": layers, "num_attention_heads": heads, "max_position_embeddings": 64,
                         "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id},
            vision_config={"hidden_size": hidden, "intermediate_size": 37, "num_hidden_layers": layers,
                           "num_attention_heads": heads, "image_size": image_size, "patch_size": patch})
        model = SiglipModel(config)
        processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    if not full:
        with torch.no_grad():  # wider random weights: tiny models then give distinct vectors
            for name, p in model.named_parameters():
                if "norm" not in name and "logit" not in name:  # the temperature stays CLIP's / SigLIP's
                    p.normal_(0, 0.2)
    return model.eval(), tokenizer, processor


def write_tiny_dual(directory: Path, arch: str = "clip", seed: int = 0, **kwargs) -> Path:
    """A tiny random CLIP / SigLIP saved as `save_pretrained` writes it: model + tokenizer + image processor."""
    model, tokenizer, processor = tiny_dual(arch, seed, **kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return directory


def install_tiny_dual(name: str, arch: str = "clip", seed: int = 0, **kwargs) -> Path:
    """A tiny random dual encoder imported into the cache as ``name`` (`ldot models import DIR --as NAME`)."""
    import tempfile

    from models.hub.convert import import_model

    folder = write_tiny_dual(Path(tempfile.mkdtemp(prefix="dual-")) / "model", arch, seed, **kwargs)
    return import_model(folder, name).path


def hub_files(directory: Path) -> dict[str, bytes]:
    """Every file of a model folder, by name (for a fake hub repository)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
