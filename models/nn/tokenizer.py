"""WordPiece tokenization through the `tokenizers` library (Rust; imports in milliseconds).

We do not go through `transformers.BertTokenizer`: with transformers 5 it was seen to map every token
to [UNK] when built from a bare vocab file (seen with transformers 5.x). Tests check that real words get real ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.core.errors import ModelError

if TYPE_CHECKING:
    import tokenizers


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def _clean(text: str) -> str:
    """Make any Python string safe for the Rust tokenizer (lone surrogates -> U+FFFD)."""
    return text.encode("utf-8", "replace").decode("utf-8", "replace") if not text.isascii() else text


class Tokenizer:
    """``[CLS] word-pieces [SEP]`` ids for BERT-family vocabularies."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "") -> None:
        self.backend = backend
        self.source = source
        self.cls_id = self._special("[CLS]")
        self.sep_id = self._special("[SEP]")
        self.pad_id = self._special("[PAD]")
        self.unk_id = self._special("[UNK]")
        self.mask_id = backend.token_to_id("[MASK]")

    def _special(self, token: str) -> int:
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise ModelError(f"tokenizer {self.source or ''} has no {token} token: is this a BERT vocabulary?")
        return idx

    @classmethod
    def from_path(cls, path: str | Path, lowercase: bool | None = None) -> Tokenizer:
        """A `tokenizer.json`, a `vocab.txt`, or a directory holding either (tokenizer.json preferred).

        ``lowercase`` applies to a bare vocab.txt; when None, a `tokenizer_config.json` beside it decides
        (``do_lower_case``), else cased.
        """
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers.implementations import BertWordPieceTokenizer

        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                path = path / "tokenizer.json"
            elif (path / "vocab.txt").is_file():
                path = path / "vocab.txt"
            else:
                raise ModelError(f"{path} holds no tokenizer.json or vocab.txt")
        if not path.is_file():
            raise ModelError(f"tokenizer file {path} does not exist")
        if path.suffix == ".json":
            try:
                backend = RustTokenizer.from_file(str(path))
            except Exception as exc:  # the Rust side raises plain Exception
                raise ModelError(f"{path} is not a valid tokenizer.json ({exc})") from None
            backend.no_padding()
            backend.no_truncation()
            return cls(backend, str(path))
        if lowercase is None:
            lowercase = _read_do_lower_case(path.parent / "tokenizer_config.json")
        wordpiece = BertWordPieceTokenizer(str(path), lowercase=lowercase, strip_accents=lowercase,
                                           clean_text=True, handle_chinese_chars=True)
        return cls(wordpiece._tokenizer, str(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def tokenize(self, text: str) -> list[str]:
        """Word-pieces of one text, without [CLS]/[SEP]."""
        return self.backend.encode(_clean(text), add_special_tokens=False).tokens

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """``[CLS] ids [SEP]`` of one text, cut to ``max_length`` ids (the [SEP] is kept)."""
        ids = self.backend.encode(_clean(text), add_special_tokens=False).ids
        if max_length is not None:
            ids = ids[: max(0, max_length - 2)]
        return [self.cls_id, *ids, self.sep_id]

    def batch(self, texts: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids (B, L) and attention mask (B, L) for a batch of texts."""
        encoded = self.backend.encode_batch([_clean(t) for t in texts], add_special_tokens=False)
        rows = []
        for enc in encoded:
            ids = enc.ids if max_length is None else enc.ids[: max(0, max_length - 2)]
            rows.append([self.cls_id, *ids, self.sep_id])
        return pad_ids(rows, self.pad_id)

    def save(self, directory: Path) -> None:
        """Write `tokenizer.json` (self-contained) into a model directory."""
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of ids -> (ids (B, L) long, mask (B, L) long)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _read_do_lower_case(config_path: Path) -> bool:
    try:
        return bool(json.loads(config_path.read_text()).get("do_lower_case", False))
    except (OSError, ValueError):
        return False


def has_tokenizer_files(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "vocab.txt").is_file()
