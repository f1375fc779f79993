"""The one list of named checkpoints ldot knows, and what is present in the cache.

Official LightningDOT files list both official hosts as mirrors (both have been seen dead, as
https://github.com/intersun/LightningDOT/issues/12 reports); the Hugging Face hub files are live. No sha256
is published for any of them: the first verified download records it in ``<home>/known_hashes.json`` (trust
on first use) and later downloads and `ldot models verify` check against it.

Hub URLs honour ``HF_ENDPOINT`` (as the Hugging Face tools do), for mirrors and for tests.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from models.core.errors import ModelNotFoundError

HUB_PREFIX = "hf://"  # expanded to $HF_ENDPOINT (default https://huggingface.co) at download time
LDOT_HOSTS = ("https://acvrpublicycchen.blob.core.windows.net/lightningdot/",
              "https://convaisharables.blob.core.windows.net/lightningdot/")
MANIFEST = "ldot-manifest.json"
# The detector's 1,600 Visual Genome object names (one class a line, synonyms after commas), beside its weights:
# the tags of a decomposed model. The file the BUTD demo (and the LXMERT demo) read.
OBJECT_VOCAB_FILE = "objects_vocab.txt"
OBJECT_VOCAB_URL = ("https://raw.githubusercontent.com/airsplay/py-bottom-up-attention/master/demo/data/genome/"
                    "1600-400-20/objects_vocab.txt")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a checkpoint and where to get it."""

    filename: str  # name in the model directory
    urls: tuple[str, ...]  # mirrors, tried in order
    sha256: str | None = None  # published hash, when there is one
    size: int | None = None  # published size in bytes, when known
    optional: bool = False  # absent on some mirrors (a 404 is not an error)


@dataclass(frozen=True)
class ModelEntry:
    """A named checkpoint: `ldot models download NAME` fetches its files into ``<home>/models/NAME``."""

    name: str
    kind: str  # bi-encoder | dual-encoder | uniter-itm | lxmert | visualbert | vilt | detector | text-encoder
    description: str
    licence: str
    files: tuple[RemoteFile, ...]
    convert: bool = False  # an official torch pickle, converted once into a model directory
    approx_size: str = ""  # human size of the download
    tokenizer: str | None = None  # registry name whose tokenizer this model uses (None: its own files)
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def sources(self) -> list[str]:
        return [url for f in self.files for url in f.urls[:1]]


def _official(filename: str) -> RemoteFile:
    return RemoteFile(filename, tuple(host + filename for host in LDOT_HOSTS))


def _hub(repo: str, *files: str, optional: tuple[str, ...] = ()) -> tuple[RemoteFile, ...]:
    out = [RemoteFile(f, (f"{HUB_PREFIX}{repo}/resolve/main/{f}",)) for f in files]
    out += [RemoteFile(f, (f"{HUB_PREFIX}{repo}/resolve/main/{f}",), optional=True) for f in optional]
    return tuple(out)


# what a dual-encoder folder holds (`save_pretrained` of the model and its processor): config.json first
DUAL_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")
DUAL_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                        "spiece.model")


def _dual(repo: str) -> tuple[RemoteFile, ...]:
    return _hub(repo, *DUAL_FILES, optional=DUAL_TOKENIZER_FILES)


REGISTRY: tuple[ModelEntry, ...] = (
    ModelEntry("lightningdot", "bi-encoder",
               "LightningDOT pre-trained on COCO, VG, CC, SBU (VMLM + SMRM + CMR); zero-shot retrieval",
               "MIT", (_official("LightningDot.pt"),), convert=True, approx_size="~0.5 GB",
               tokenizer="bert-base-cased", aliases=("LightningDot.pt", "pretrained")),
    ModelEntry("flickr-ft", "bi-encoder", "LightningDOT fine-tuned on Flickr30k (Karpathy split)",
               "MIT", (_official("flickr-ft.pt"),), convert=True, approx_size="~0.9 GB + optimizer state",
               tokenizer="bert-base-cased", aliases=("flickr-ft.pt",)),
    ModelEntry("coco-ft", "bi-encoder", "LightningDOT fine-tuned on COCO (Karpathy split)",
               "MIT", (_official("coco-ft.pt"),), convert=True, approx_size="~0.9 GB + optimizer state",
               tokenizer="bert-base-cased", aliases=("coco-ft.pt",)),
    ModelEntry("uniter-base", "uniter-itm",
               "UNITER-base (LightningDOT's copy): cross-encoder for re-ranking, image-tower initialisation",
               "MIT", (_official("uniter-base.pt"),), convert=True, approx_size="~0.9 GB",
               tokenizer="bert-base-cased", aliases=("uniter-base.pt",)),
    ModelEntry("bert-base-cased", "text-encoder",
               "BERT-base cased: LightningDOT's tokenizer and text-tower initialisation (live on the hub)",
               "Apache-2.0", _hub("bert-base-cased", "config.json", "vocab.txt", "tokenizer_config.json",
                                  "model.safetensors", optional=("tokenizer.json",)), approx_size="~0.4 GB"),
    ModelEntry("bert-base-multilingual-cased", "text-encoder",
               "multilingual BERT: text tower for Multi30K (German, French, Czech) (live on the hub)",
               "Apache-2.0", _hub("bert-base-multilingual-cased", "config.json", "vocab.txt",
                                  "tokenizer_config.json", "model.safetensors", optional=("tokenizer.json",)),
               approx_size="~0.7 GB"),
    ModelEntry("butd-r101-vg", "detector",
               "Bottom-Up-Attention Faster R-CNN R101-C4, Visual Genome 1600 objects / 400 attributes "
               "(unc-nlp/frcnn-vg-finetuned, live on the hub)",
               "unstated", _hub("unc-nlp/frcnn-vg-finetuned", "pytorch_model.bin", "config.yaml")
               + (RemoteFile(OBJECT_VOCAB_FILE, (OBJECT_VOCAB_URL,), optional=True),),
               approx_size="~262 MB", aliases=("unc-nlp/frcnn-vg-finetuned", "frcnn-vg-finetuned")),
    ModelEntry("lxmert-base-uncased", "lxmert",
               "LXMERT with its image-text matching head: a live cross-encoder for re-ranking 36-box features "
               "(unc-nlp/lxmert-base-uncased)",
               "unstated", _hub("unc-nlp/lxmert-base-uncased", "config.json",
                                                  "pytorch_model.bin", "vocab.txt",
                                                  optional=("tokenizer.json", "tokenizer_config.json")),
               approx_size="~0.9 GB", aliases=("unc-nlp/lxmert-base-uncased", "lxmert")),
    ModelEntry("bert-base-uncased", "text-encoder",
               "BERT-base uncased: the tokenizer of VisualBERT (live on the hub)",
               "Apache-2.0", _hub("bert-base-uncased", "config.json", "vocab.txt", "tokenizer_config.json",
                                  optional=("tokenizer.json",)), approx_size="~1 MB"),
    # hub revision 884aaef is the repository's main (VisualBertForPreTraining, visual_embedding_dim 2048)
    ModelEntry("visualbert-vqa-coco-pre", "visualbert",
               "VisualBERT pre-trained on COCO (masked language modelling + image-sentence matching): a live "
               "single-stream BERT-base over 2048-d regions to decompose (`ldot train decompose`); its regions were "
               "Detectron fc6 features of 100 fixed boxes (Pythia), not bottom-up-attention res5 features: the "
               "width matches, the feature space does not",
               "unstated", _hub("uclanlp/visualbert-vqa-coco-pre", "config.json", "pytorch_model.bin"),
               approx_size="~448 MB", tokenizer="bert-base-uncased",
               aliases=("uclanlp/visualbert-vqa-coco-pre", "visualbert")),
    # -- dual encoders that read pixels (no detector): `transformers`' CLIP and SigLIP, live on the hub. The commit
    # of the first download is pinned (known_hashes.json); config.json comes first, so that `hf:ORG/NAME` of another
    # architecture is refused before its weights are fetched.
    ModelEntry("clip-vit-b32", "dual-encoder",
               "CLIP ViT-B/32 (OpenAI): zero-shot image-text dual encoder on pixels, 512-d, no detector; the default "
               "when flickr-ft is not in the cache", "MIT", _dual("openai/clip-vit-base-patch32"),
               approx_size="~0.6 GB", aliases=("openai/clip-vit-base-patch32",)),
    ModelEntry("clip-vit-b16", "dual-encoder",
               "CLIP ViT-B/16 (OpenAI): as clip-vit-b32 with 4x the image patches (about 4x slower, more accurate)",
               "MIT", _dual("openai/clip-vit-base-patch16"), approx_size="~0.6 GB",
               aliases=("openai/clip-vit-base-patch16",)),
    ModelEntry("clip-vit-l14", "dual-encoder",
               "CLIP ViT-L/14 (OpenAI): the large CLIP, 768-d (about 18x the image compute of ViT-B/32)",
               "MIT", _dual("openai/clip-vit-large-patch14"), approx_size="~1.7 GB",
               aliases=("openai/clip-vit-large-patch14",)),
    ModelEntry("siglip-base", "dual-encoder",
               "SigLIP base patch16 224 (Google): sigmoid-loss dual encoder on pixels, 768-d, texts padded to 64 "
               "tokens", "Apache-2.0", _dual("google/siglip-base-patch16-224"), approx_size="~0.8 GB",
               aliases=("google/siglip-base-patch16-224",)),
    # ViLT-B/32 fine-tuned for image-text retrieval (ViltForImageAndTextRetrieval): a live cross-encoder that reads
    # pixels (no detector), so it re-ranks any index; its weights are a pickle, read as tensors only
    ModelEntry("vilt-flickr30k", "vilt",
               "ViLT-B/32 fine-tuned on Flickr30k for image-text retrieval: a cross-encoder over pixels (no detector) "
               "that re-ranks any index (dandelin/vilt-b32-finetuned-flickr30k)",
               "Apache-2.0", _hub("dandelin/vilt-b32-finetuned-flickr30k", "config.json", "preprocessor_config.json",
                                  "pytorch_model.bin", "vocab.txt",
                                  optional=("tokenizer.json", "tokenizer_config.json")),
               approx_size="~446 MB", aliases=("dandelin/vilt-b32-finetuned-flickr30k",)),
    ModelEntry("vilt-coco", "vilt",
               "ViLT-B/32 fine-tuned on COCO for image-text retrieval: a cross-encoder over pixels (no detector) "
               "that re-ranks any index (dandelin/vilt-b32-finetuned-coco)",
               "Apache-2.0", _hub("dandelin/vilt-b32-finetuned-coco", "config.json", "preprocessor_config.json",
                                  "pytorch_model.bin", "vocab.txt",
                                  optional=("tokenizer.json", "tokenizer_config.json")),
               approx_size="~446 MB", aliases=("dandelin/vilt-b32-finetuned-coco",)),
)

HF_REPO_PREFIX = "hf:"  # `--model hf:ORG/NAME`: any hub repository of a dual-encoder architecture
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def hub_dual_entry(spec: str) -> ModelEntry | None:
    """The entry of ``hf:ORG/NAME`` (a dual encoder fetched like the catalogue's, cached as ``hf--ORG--NAME``);
    None for any other name. A repository id that is not one raises `ModelNotFoundError`."""
    if not spec.startswith(HF_REPO_PREFIX):
        return None
    repo = spec[len(HF_REPO_PREFIX):]
    if not _HF_REPO_RE.match(repo) or ".." in repo or repo.endswith((".", "-")) or "--" in repo:
        raise ModelNotFoundError(f"{spec!r} is not a hub repository id: write hf:ORG/NAME (e.g. "
                                 "hf:openai/clip-vit-base-patch32)")
    for entry in REGISTRY:
        if repo in entry.aliases:
            return entry
    return ModelEntry("hf--" + repo.replace("/", "--"), "dual-encoder", f"{repo} from the Hugging Face hub",
                      "see the repository", _dual(repo), aliases=(spec,))


# The defaults: what `ldot` uses when no name is given.
DEFAULT_BI_ENCODER = "flickr-ft"  # the bi-encoder that indexes and searches, when it is in the cache ...
DEFAULT_LIVE_ENCODER = "clip-vit-b32"  # ... else this live dual encoder (`models.hub.installed.default_bi_encoder`)
DEFAULT_DETECTOR = "butd-r101-vg"  # the region detector
# cross-encoders, in order of preference; those of a kind in REGION_RERANKER_KINDS need the index's region features,
# the others (ViLT) read the image files and re-rank any index
RERANKERS = ("uniter-base", "lxmert-base-uncased", "vilt-flickr30k", "vilt-coco")
REGION_RERANKER_KINDS = ("uniter-itm", "lxmert")
DEFAULT_EVAL_MODELS = {"flickr30k": "flickr-ft", "coco": "coco-ft"}  # Multi30K needs a multilingual text tower


def list_pretrained() -> list[ModelEntry]:
    """Every named checkpoint, in registry order."""
    return list(REGISTRY)


def find_entry(name: str) -> ModelEntry | None:
    for entry in REGISTRY:
        if name == entry.name or name in entry.aliases:
            return entry
    if name.startswith("hf--") and "/" not in name:  # the cache folder of an `hf:ORG/NAME` model
        org, sep, rest = name[4:].partition("--")
        return hub_dual_entry(f"{HF_REPO_PREFIX}{org}/{rest}") if sep and org and rest else None
    return hub_dual_entry(name)


def get_entry(name: str) -> ModelEntry:
    entry = find_entry(name)
    if entry is None:
        known = ", ".join(e.name for e in REGISTRY)
        raise ModelNotFoundError(f"no registry entry named {name!r}; known: {known}")
    return entry


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def expand_url(url: str) -> str:
    return f"{hub_endpoint()}/{url[len(HUB_PREFIX):]}" if url.startswith(HUB_PREFIX) else url
