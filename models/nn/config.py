"""Model configurations as dataclasses, with named presets.

Constructors take these configs, never CLI namespaces. Every official LightningDOT file
carries no config: `models.hub.formats.infer_bi_encoder_config` derives one from tensor shapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from models.core.config import bounded, check_ranges, config_from_dict


@dataclass(frozen=True)
class TransformerConfig:
    """A BERT-shaped transformer body (the text tower, the UNITER image tower, the cross-encoder)."""

    # Each value is range-checked when a config is built (`bounded`): a config.json from elsewhere cannot ask for
    # zero heads, 100,000 layers or a 10^6-wide body.
    vocab_size: int = bounded(28996, 1, 1_000_000)  # word-piece vocabulary (bert-base-cased: 28996)
    hidden_size: int = bounded(768, 1, 16_384)  # width of every token state
    num_layers: int = bounded(12, 1, 256)  # transformer blocks
    num_heads: int = bounded(12, 1, 256)  # attention heads (official files: hidden_size / 64)
    intermediate_size: int = bounded(3072, 1, 65_536)  # feed-forward width
    max_position_embeddings: int = bounded(512, 1, 65_536)  # longest text the position table covers
    type_vocab_size: int = bounded(2, 1, 1024)  # token types: 0 text, 1 image region
    layer_norm_eps: float = bounded(1e-12, 1e-30, 1.0)  # LayerNorm epsilon everywhere in the body
    dropout: float = bounded(0.1, 0.0, 1.0)  # hidden and attention-probability dropout (training only)
    # the word-embedding row that gets no gradient (torch's padding_idx): BERT's [PAD] 0; a VisualBERT's config
    # pad_token_id (transformers' VisualBertConfig default 1, although its tokenizer pads with [PAD] = 0)
    padding_idx: int = bounded(0, 0, 1_000_000)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0 <= self.padding_idx < self.vocab_size:
            raise ValueError(f"padding_idx {self.padding_idx} is outside the {self.vocab_size}-word vocabulary")


@dataclass(frozen=True)
class BiEncoderConfig:
    """The LightningDOT bi-encoder: a BERT text tower and a UNITER image tower, no shared weights."""

    text: TransformerConfig = field(default_factory=TransformerConfig)  # text tower body
    image: TransformerConfig = field(default_factory=TransformerConfig)  # image tower body (UNITER)
    img_dim: int = bounded(2048, 1, 65_536)  # region feature size (BUTD res5 mean-pool)
    pos_dim: int = bounded(7, 1, 64)  # box feature size: norm_bb (6) + area
    project_dim: int = bounded(768, 1, 16_384)  # output of the Linear->GELU->LN->Linear projection, the retrieval vector
    cls_token_id: int = bounded(101, 0, 1_000_000)  # the one text token the image tower reads before the regions ([CLS])
    tokenizer: str = "bert-base-cased"  # registry name or path of the text tokenizer
    lowercase: bool = False  # tokenizer lower-cases and strips accents (uncased vocabularies)

    def __post_init__(self) -> None:
        check_ranges(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, what: str = "") -> BiEncoderConfig:
        """From JSON (a model dir's config.json, a run file); unknown keys and wrong shapes are a `ConfigError`."""
        return config_from_dict(cls, data, what, nested={"text": TransformerConfig, "image": TransformerConfig})


@dataclass(frozen=True)
class CrossEncoderConfig:
    """UNITER used as a cross-encoder: text tokens and regions in one stream, pooler -> Linear(hidden, 1)."""

    body: TransformerConfig = field(default_factory=TransformerConfig)  # the UNITER body
    img_dim: int = bounded(2048, 1, 65_536)  # region feature size
    pos_dim: int = bounded(7, 1, 64)  # box feature size
    tokenizer: str = "bert-base-cased"  # registry name or path of the text tokenizer
    lowercase: bool = False  # tokenizer lower-cases

    def __post_init__(self) -> None:
        check_ranges(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, what: str = "") -> CrossEncoderConfig:
        """From JSON; unknown keys and wrong shapes are a `ConfigError`."""
        return config_from_dict(cls, data, what, nested={"body": TransformerConfig})


BASE = TransformerConfig()
# A tiny body for tests and smoke runs: same code paths; heads = hidden / 64 as in official files.
TINY = TransformerConfig(vocab_size=128, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256,
                         max_position_embeddings=128)

PRESETS: dict[str, BiEncoderConfig] = {
    # LightningDOT as published: bert-base-cased text tower, UNITER-base image tower.
    "base": BiEncoderConfig(),
    # Multilingual text tower (Multi30K): bert-base-multilingual-cased, same image tower.
    "base-multilingual": BiEncoderConfig(text=replace(BASE, vocab_size=119547), tokenizer="bert-base-multilingual-cased"),
    # Tiny towers for tests: a 128-word vocabulary, 128-d states, 2 layers; small region features.
    "tiny": BiEncoderConfig(text=TINY, image=TINY, img_dim=32, project_dim=48, tokenizer=""),
}

CROSS_PRESETS: dict[str, CrossEncoderConfig] = {
    "base": CrossEncoderConfig(),
    "tiny": CrossEncoderConfig(body=TINY, img_dim=32, tokenizer=""),
}


def preset(name: str) -> BiEncoderConfig:
    """A named bi-encoder preset (`base`, `base-multilingual`, `tiny`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class DecomposedConfig:
    """A decomposed single-stream encoder (VLDeformer): ONE body that encodes a text alone and an image's regions
    alone; vectors are the tanh of the mean of every last-layer state, L2-normalised (cosine score).

    ``region_embedding`` says how regions enter the body: ``uniter`` (UNITER's LN(LN(W f) + LN(W_pos box7) +
    type 1)) or ``visualbert`` (VisualBERT's W f + visual type 1 + visual position 0, through the text
    embeddings' LayerNorm). Inputs are padded to fixed lengths, as VLDeformer's, so every position counts.
    """

    body: TransformerConfig = field(default_factory=TransformerConfig)  # the shared transformer
    img_dim: int = bounded(2048, 1, 65_536)  # region feature size
    pos_dim: int = bounded(7, 1, 64)  # box feature size (uniter region embedding)
    region_embedding: str = "uniter"  # uniter | visualbert
    text_len: int = bounded(35, 3, 4096)  # text input length: [CLS] word-pieces [SEP], cut and padded to this (also the tag part)
    max_regions: int = bounded(100, 1, 4096)  # regions per image: extras cut, fewer zero-padded
    temperature: float = bounded(0.005, 1e-6, 100.0)  # InfoNCE temperature of training (scores are cosine / temperature)
    cls_token_id: int = bounded(101, 0, 1_000_000)
    sep_token_id: int = bounded(102, 0, 1_000_000)
    pad_token_id: int = bounded(0, 0, 1_000_000)
    tags: tuple[str, ...] = ()  # object vocabulary (class id -> words) for the [CLS] tags [SEP] image prefix
    tokenizer: str = "bert-base-cased"  # registry name or path of the tokenizer
    lowercase: bool = False

    def __post_init__(self) -> None:
        if self.region_embedding not in ("uniter", "visualbert"):
            raise ValueError(f"unknown region embedding {self.region_embedding!r}: uniter or visualbert")
        check_ranges(self)

    @property
    def project_dim(self) -> int:
        return self.body.hidden_size

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        return data

    @classmethod
    def from_dict(cls, data: object, what: str = "") -> DecomposedConfig:
        """From JSON; unknown keys and wrong shapes are a `ConfigError` (the tag list becomes a tuple)."""
        if isinstance(data, dict) and isinstance(data.get("tags"), list):
            data = {**data, "tags": tuple(data["tags"])}
        return config_from_dict(cls, data, what, nested={"body": TransformerConfig})
