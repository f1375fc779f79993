"""Helpers shared by the tests: tiny models, official-layout checkpoints, a local HTTP server."""

from __future__ import annotations

import http.server
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

WORDS = ("a dog cat on the beach runs in park man woman red blue car street water grass ball "
         "two people sitting bench playing with child white black small big near tree sky snow "
         "Dog Beach A The").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
HOOKS_DIR = Path(__file__).resolve().parent / "hooks"  # sitecustomize.py: the kill tests' hooks


def hooked_env(base: dict[str, str] | None = None, **variables: object) -> dict[str, str]:
    """The environment of a process the tests start with their hooks (`HOOKS_DIR`, first on PYTHONPATH) and the
    variables that set them (``LDOT_TEST_PAUSE_AFTER``, ``LDOT_TEST_PAUSE_FILE``, ``LDOT_RAY_PID_DIR``, ...)."""
    env = dict(os.environ if base is None else base)
    env.update({name: str(value) for name, value in variables.items()})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOKS_DIR), env.get("PYTHONPATH", "")) if p)
    return env


def write_meta_rows(store, rows: dict[str, str], db=None) -> None:
    """Write an index's meta rows as they are stored, past `IndexMeta`'s checks (damage, a concurrent writer)."""
    (db or store.db).executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(rows.items()))


def write_vocab(directory: Path, size: int = 128) -> Path:
    """A tiny cased WordPiece vocab (ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4), padded to ``size``."""
    tokens = SPECIALS + list(dict.fromkeys(WORDS)) + ["##s", "##ing", "##er", ".", ","]
    tokens += [f"##x{i}" for i in range(size - len(tokens))]
    assert len(tokens) == size
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n")
    return path


def tiny_bi_encoder(seed: int = 0):
    """A seeded tiny `BiEncoder` with BERT-style random init (std 0.02 is too flat for tests: use 0.2)."""
    from models.nn.bi_encoder import BiEncoder
    from models.nn.config import preset

    torch.manual_seed(seed)
    model = BiEncoder(preset("tiny"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("encode_proj.2.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.2)
    return model.eval()


def official_finetuned(model) -> dict:
    """The `flickr-ft.pt` layout: {model_dict, optimizer_dict, scheduler_dict, offset, epoch, encoder_params}."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"model_dict": state, "optimizer_dict": {"state": {}, "param_groups": [{"lr": 2e-5, "params": [0, 1]}]},
            "scheduler_dict": {"last_epoch": 10, "_step_count": 11, "lr_lambdas": [None]},
            "offset": 0, "epoch": 14, "encoder_params": None}


def official_pretrained(model, legacy_names: bool = True) -> dict:
    """The `LightningDot.pt` layout: flat fp16, every key under `bert.`, pre-training heads, and (optionally)
    old `gamma`/`beta` LayerNorm names and a transformers-3 `position_ids` buffer."""
    out = {}
    for key, value in model.state_dict().items():
        if legacy_names and key.endswith("LayerNorm.weight"):
            key = key[: -len("weight")] + "gamma"
        elif legacy_names and key.endswith("LayerNorm.bias"):
            key = key[: -len("bias")] + "beta"
        out["bert." + key] = value.half()
    hidden = model.config.image.hidden_size
    out["bert.txt_model.bert.embeddings.position_ids"] = torch.arange(model.config.text.max_position_embeddings)[None]
    out["cls.predictions.bias"] = torch.zeros(model.config.image.vocab_size).half()
    out["cls.predictions.transform.dense.weight"] = torch.randn(hidden, hidden).half()
    out["feat_regress.bias"] = torch.zeros(model.config.img_dim).half()
    out["region_classifier.net.3.weight"] = torch.randn(1601, hidden).half()
    out["itm_output.weight"] = torch.randn(2, hidden).half()
    return out


class MaliciousPayload:
    """Pickles into a call of os.system: loading it must be refused before anything runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


# -- a local HTTP server with Range support, for download tests -----------------------------------
@dataclass
class ServedFile:
    data: bytes
    cut_after: int | None = None  # close the connection after this many body bytes (a truncated transfer)
    ignore_range: bool = False
    delay: float = 0.0  # seconds to wait before sending the body (a slow server)
    fail_first: int = 0  # answer HTTP 503 to this many requests first (a flaky server)
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (e.g. the hub's X-Repo-Commit)
    redirect: str | None = None  # answer 302 to this URL ("{url}": this server; "{cdn}": it as another origin)
    range_from_zero: bool = False  # answer a Range request with a 206 starting at 0 (of the asked length)
    no_length: bool = False  # send no Content-Length: the body ends when the connection closes
    trickle: float = 0.0  # seconds between bytes (a server that is slow but never silent)


@dataclass
class Server:
    url: str
    files: dict[str, ServedFile]
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    auth: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization header)


@contextmanager
def http_server(files: dict[str, ServedFile]) -> Iterator[Server]:
    """Serve ``files`` (path -> ServedFile) on 127.0.0.1, honouring ``Range: bytes=N-``."""
    server_state = Server("", files)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):  # noqa: N802
            self._serve(head=True)

        def do_GET(self):  # noqa: N802
            self._serve(head=False)

        def _serve(self, head: bool):
            import time

            rng = self.headers.get("Range")
            server_state.requests.append((self.path, rng) if not head else ("HEAD " + self.path, rng))
            server_state.auth.append((self.path, self.headers.get("Authorization")))
            served = server_state.files.get(self.path.split("?")[0])
            if served is None:
                self.send_error(404)
                return
            if served.fail_first > 0:
                served.fail_first -= 1
                self.send_error(503)
                return
            if served.redirect is not None:
                self.send_response(302)
                cdn = server_state.url.replace("127.0.0.1", "localhost")  # another origin, as a CDN is
                self.send_header("Location", served.redirect.replace("{url}", server_state.url).replace("{cdn}", cdn))
                for key, value in served.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data, start = served.data, 0
            match = re.match(r"bytes=(\d+)-", rng or "")
            if match and not served.ignore_range:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                if served.range_from_zero:  # the asked length, from the wrong offset
                    data, start = data[: len(data) - start], 0
                    self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(served.data)}")
                else:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            if not served.no_length:
                self.send_header("Content-Length", str(len(body)))
            for key, value in served.headers.items():
                self.send_header(key, value)
            self.end_headers()
            if head:
                return
            if served.delay:
                time.sleep(served.delay)
            if served.cut_after is not None:
                body = body[: served.cut_after]
            try:
                if served.trickle:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(served.trickle)
                else:
                    self.wfile.write(body)
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
            if served.cut_after is not None or served.no_length:
                self.close_connection = True

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        httpd.shutdown()
        httpd.server_close()


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_repo_files(repo: str, files: dict[str, bytes], lfs: tuple[str, ...] = (), commit: str = HUB_COMMIT,
                   revision: str = "main", **served: object) -> dict[str, ServedFile]:
    """A repo laid out as the Hugging Face hub serves it: ``/<repo>/resolve/<revision or commit>/<file>`` with
    X-Repo-Commit and ETag (a small file: its git blob sha1); an LFS file answers 302 to ``/cdn/<sha256>`` (on
    ``localhost``: another origin, as the hub's CDN is) with
    X-Linked-Etag (its sha256) and X-Linked-Size, as the hub redirects to its CDN. ``served`` goes to the bytes."""
    import hashlib

    out: dict[str, ServedFile] = {}
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        for rev in (revision, commit):
            path = f"/{repo}/resolve/{rev}/{name}"
            if name in lfs:
                out[path] = ServedFile(b"", redirect="{cdn}/cdn/" + sha, headers={
                    "X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                    "ETag": f'"{sha}"'})
            else:
                git = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
                out[path] = ServedFile(data, headers={"X-Repo-Commit": commit, "ETag": f'"{git}"'}, **served)
        if name in lfs:
            out[f"/cdn/{sha}"] = ServedFile(data, **served)
    return out


def hub_online(monkeypatch, url: str) -> None:
    """Let huggingface_hub reach ``url`` (the tests' conftest sets HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused: "offline")."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def _spread(model: torch.nn.Module, keep: tuple[str, ...] = ()) -> None:
    """Widen random weights (std 0.2) so tiny models give distinct outputs; norms and ``keep`` stay as built."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "LayerNorm" not in pname and "layer_norm" not in pname and not pname.endswith(keep):
                p.normal_(0, 0.2)


def _install(name: str, kind: str, config: dict, model: torch.nn.Module, vocab_dir: Path) -> Path:
    """Save ``model`` as an ldot model dir in the cache, with the test vocabulary and a manifest."""
    from models.core.home import models_dir
    from models.hub.formats import save_model_dir
    from models.hub.installed import record_model
    from models.nn.tokenizer import Tokenizer

    target = models_dir() / name
    save_model_dir(target, kind, config, model.state_dict(), tokenizer=Tokenizer.from_path(vocab_dir / "vocab.txt"))
    record_model(target, name, kind, "test")
    return target


def install_tiny_model(name: str, vocab_dir: Path, img_dim: int = 2048, seed: int = 0) -> Path:
    """A tiny random bi-encoder installed in the cache as ``name`` (model dir + manifest, tokenizer bundled)."""
    from dataclasses import replace

    from models.nn.bi_encoder import BiEncoder
    from models.nn.config import preset

    torch.manual_seed(seed)
    config = replace(preset("tiny"), img_dim=img_dim, tokenizer="")
    model = BiEncoder(config)
    _spread(model, keep=("encode_proj.2.weight",))
    return _install(name, "bi-encoder", config.to_dict(), model, vocab_dir)


def make_photos(directory: Path, count: int, start: int = 0, size: tuple[int, int] = (48, 32)) -> list[Path]:
    """``count`` distinct small PNG images named img_<i>.png."""
    from imagegen import pattern, save

    directory.mkdir(parents=True, exist_ok=True)
    return [save(pattern(size[0], size[1], seed=i), directory / f"img_{i:03d}.png") for i in range(start, start + count)]


def install_tiny_reranker(name: str, vocab_dir: Path, img_dim: int = 2048, seed: int = 0) -> Path:
    """A tiny random UNITER cross-encoder installed in the cache as ``name``."""
    from dataclasses import replace

    from models.nn.config import CROSS_PRESETS
    from models.nn.cross_encoder import CrossEncoder

    torch.manual_seed(seed)
    config = replace(CROSS_PRESETS["tiny"], img_dim=img_dim)
    model = CrossEncoder(config)
    _spread(model)
    return _install(name, "uniter-itm", config.to_dict(), model, vocab_dir)


# -- training helpers -----------------------------------------------------------------------------
def tiny_hf_bert_state(seed: int = 0, legacy_names: bool = False) -> dict:
    """A `transformers.BertForPreTraining` state dict of the tiny shape (vocab 128, hidden 128, 2 layers),
    as the hub files hold it (optionally with old ``gamma``/``beta`` LayerNorm names)."""
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(seed)
    model = BertForPreTraining(BertConfig(**TINY_HF_CONFIG))
    out = {}
    for key, value in model.state_dict().items():
        if legacy_names and key.endswith("LayerNorm.weight"):
            key = key[: -len("weight")] + "gamma"
        elif legacy_names and key.endswith("LayerNorm.bias"):
            key = key[: -len("bias")] + "beta"
        out[key] = value.clone()
    return out


TINY_HF_CONFIG = dict(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=256, max_position_embeddings=128, type_vocab_size=2, hidden_act="gelu",
                      layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def write_tiny_hf_bert(directory: Path, seed: int = 0, legacy_names: bool = True) -> Path:
    """A fake hub `bert-base-cased` model dir: config.json, vocab.txt, tokenizer_config.json, model.safetensors."""
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = tiny_hf_bert_state(seed, legacy_names)
    state.pop("cls.predictions.decoder.weight")  # tied: the hub files omit it
    state.pop("cls.predictions.decoder.bias")
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "bert", **TINY_HF_CONFIG}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    write_vocab(directory)
    return directory


@dataclass
class PlantedRegions:
    features: object
    norm_bb: object
    soft_labels: object = None


def planted_pairs(n_images: int = 16, captions_per_image: int = 2, regions: int = 4, img_dim: int = 32,
                  labels: int = 11, seed: int = 0):
    """A learnable toy retrieval set: each image has its own feature pattern and its own caption word.

    Returns (PairSet, {key: PlantedRegions}); token ids are valid for `write_vocab`'s 128-word vocab.
    """
    import numpy as np

    from models.training.data import PairSet

    rng = np.random.default_rng(seed)
    lookup, keys = {}, []
    for i in range(n_images):
        key = f"img{i:03d}.npz"
        keys.append(key)
        pattern = rng.normal(size=img_dim).astype(np.float32)
        feats = (pattern + 0.1 * rng.normal(size=(regions, img_dim))).astype(np.float16)
        x1 = rng.uniform(0, 0.5, size=regions)
        y1 = rng.uniform(0, 0.5, size=regions)
        w, h = rng.uniform(0.1, 0.5, size=regions), rng.uniform(0.1, 0.5, size=regions)
        bb = np.stack([x1, y1, x1 + w, y1 + h, w, h], axis=1).astype(np.float32)
        soft = rng.dirichlet(np.ones(labels), size=regions).astype(np.float32)
        lookup[key] = PlantedRegions(feats, bb, soft)
    token_ids, caption_image = [], []
    for i in range(n_images):
        for c in range(captions_per_image):
            token_ids.append((10 + (i % 40), 60 + c, 61 + (i * 7 + c) % 30))
            caption_image.append(i)
    return PairSet(token_ids, caption_image, keys), lookup


def install_tiny_detector(name: str = "tiny-det", seed: int = 0) -> tuple[Path, int]:
    """A tiny random BUTD detector saved in the cache as ``name``; returns (its dir, its feature size)."""
    from detector_fixtures import random_hub_state_dict

    from feature_extraction.detector.config import tiny_config
    from feature_extraction.detector.weights import load_detector, save_detector
    from models.core.home import models_dir
    from models.hub.installed import record_model

    # scaled random weights (the detector tests' fixture): proposals and class scores vary usefully
    model = load_detector(random_hub_state_dict(tiny_config(), seed), tiny_config())
    target = save_detector(model, models_dir() / name)
    record_model(target, name, "detector", "test")
    return target, tiny_config().res5_channels


# -- ViLT (a cross-encoder over pixels) -----------------------------------------------------------
TINY_VILT_CONFIG = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, image_size=64, patch_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_image_length=-1)
# ViLT's image processor as its hub repos save it (shortest edge 384, longest <= 640, multiples of 32, mean/std 0.5)
VILT_PROCESSOR = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                  "do_normalize": True, "do_pad": True, "size_divisor": 32, "size": {"shortest_edge": 384},
                  "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                  "image_processor_type": "ViltImageProcessor"}


def tiny_vilt(seed: int = 0, **overrides):
    """A seeded random `transformers.ViltForImageAndTextRetrieval` of the tiny shape (weights widened: std 0.2)."""
    from transformers import ViltConfig, ViltForImageAndTextRetrieval

    torch.manual_seed(seed)
    model = ViltForImageAndTextRetrieval(ViltConfig(**{**TINY_VILT_CONFIG, **overrides}))
    _spread(model)
    return model.eval()


def write_tiny_vilt(directory: Path, vocab_dir: Path, seed: int = 0, shortest_edge: int = 64, pickle: bool = True,
                    model=None) -> Path:
    """A ViLT retrieval folder laid out as the hub repos hold it: config.json, preprocessor_config.json,
    pytorch_model.bin (a torch pickle, as dandelin/vilt-b32-finetuned-* ship it; ``pickle=False``: model.safetensors,
    as save_pretrained writes), vocab.txt and tokenizer_config.json (uncased)."""
    import json

    model = model if model is not None else tiny_vilt(seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # config.json (+ model.safetensors)
    if pickle:
        (directory / "model.safetensors").unlink()
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "pytorch_model.bin")
    processor = {**VILT_PROCESSOR, "size": {"shortest_edge": shortest_edge}}
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True,
                                                                 "tokenizer_class": "BertTokenizer"}))
    (directory / "vocab.txt").write_text((vocab_dir / "vocab.txt").read_text())
    return directory


def install_tiny_vilt(name: str, vocab_dir: Path, seed: int = 0, shortest_edge: int = 64) -> Path:
    """A tiny random ViLT installed in the cache as ``name`` (a registry name: vilt-flickr30k, vilt-coco)."""
    from models.core.home import models_dir
    from models.hub.installed import record_model

    target = write_tiny_vilt(models_dir() / name, vocab_dir, seed, shortest_edge)
    record_model(target, name, "vilt", "test")
    return target
