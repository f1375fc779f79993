"""Search speed: warm query latency at 100k and 1M images, ANN recall, process start-to-results, and the
LightningDOT claim (dot product vs cross-encoder over 1,000 images), all measured in one run.

    python benchmarks/search.py                    # everything (1M needs ~8 GB RAM and a few minutes)
    python benchmarks/search.py --sizes 100000     # skip the 1M part

Weights are random (base-size towers): speed does not depend on their values. Vectors are synthetic and
clustered (recall of approximate search on random Gaussian vectors is meaningless: 0.1-0.3 for HNSW, measured).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the ldot CLI does (ldot_cli/main.py)

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUERIES = ["a dog on a beach", "two people sitting on a bench in a park", "a red car parked on the street",
           "a child playing with a ball", "snow on the mountains under a blue sky"]


def clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """Unit-norm-ish vectors around `clusters` centres (what image embeddings look like: clustered)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        assign = rng.integers(0, clusters, stop - start)
        out[start:stop] = centres[assign] + 0.35 * rng.standard_normal((stop - start, d)).astype(np.float32)
    return out


def p50(fn, repeat: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def base_text_encoder(home: Path):
    """A base-size bi-encoder with random weights, installed in the cache as 'bench' (tokenizer: tiny vocab)."""
    import torch

    from models.hub.formats import save_model_dir
    from models.hub.installed import record_model
    from models.nn.bi_encoder import BiEncoder
    from models.nn.config import preset
    from models.nn.tokenizer import Tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from ldot_testing import write_vocab

    vocab = write_vocab(home / "vocab", size=28996)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = BiEncoder(preset("base"))
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    target = home / "models" / "bench"
    save_model_dir(target, "bi-encoder", preset("base").to_dict(), model.state_dict(),
                   tokenizer=Tokenizer.from_path(vocab))
    record_model(target, "bench", "bi-encoder", "benchmark")
    return model


def fake_index(name: str, vectors: np.ndarray, model: str = "bench", photos: Path | None = None) -> None:
    """An index of ``vectors`` with one file row each, written through the real store, for ``model`` (a region
    model's index records a detector). ``photos``: a folder where each row gets a real small JPEG (distinct
    bytes, so the page can show thumbnails); else the rows name files that do not exist."""
    from ldot_cli.index.catalogue import FileRow
    from ldot_cli.index.layout import index_path
    from ldot_cli.index.store import IndexStore
    from models.hub.load import fingerprint, model_inputs

    detector = None if model_inputs(model) == "pixels" else "butd-r101-vg"
    root = os.fsencode(photos) if photos is not None else b"/photos"
    with IndexStore(index_path(name), create=True) as store:
        store.update_meta(model=model, model_fingerprint=fingerprint(model), detector=detector, preset="uniter",
                          regions="none", dim=vectors.shape[1])
        for start in range(0, len(vectors), 20_000):
            with store.transaction() as db:
                rows = []
                for i in range(start, min(len(vectors), start + 20_000)):
                    path, size, mtime, digest = (root + f"/{i:07d}.jpg".encode(), 1, 1, f"{i:064x}")
                    if photos is not None:
                        size, mtime, digest = _small_jpeg(os.fsdecode(path), i)
                    vid = store.add_vector(db, digest, vectors[i], 0 if detector is None else 36)
                    rows.append(FileRow(path, root, size, mtime, digest, "indexed", None, 0, vid))
                store.put_files(db, rows)
        store.sync_faiss()


def _small_jpeg(path: str, seed: int) -> tuple[int, int, str]:
    """A 96x64 JPEG of its own (size, mtime_ns, sha256)."""
    import hashlib
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((96, 64)).save(buffer, "JPEG", quality=80)
    data = buffer.getvalue()
    with open(path, "wb") as handle:
        handle.write(data)
    return len(data), os.stat(path).st_mtime_ns, hashlib.sha256(data).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rerank-images", type=int, default=1000, help="images for the dot-vs-cross-encoder claim")
    args = parser.parse_args()

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    home = Path(tempfile.mkdtemp(prefix="ldot-bench-"))
    os.environ["LDOT_HOME"] = str(home)
    print(f"machine: {os.cpu_count()} CPUs visible, {args.threads} threads; torch {torch.__version__}, "
          f"faiss {faiss.__version__}; LDOT_HOME={home}")

    from ldot_cli.index.layout import ANN_THRESHOLD
    from ldot_cli.index.search import Searcher
    from models.core import ann
    from models.hub.load import load_bi_encoder

    base_text_encoder(home)
    start = time.perf_counter()
    encoder = load_bi_encoder("bench", towers=("text",))
    print(f"text tower load (memory-mapped safetensors): {1000 * (time.perf_counter() - start):.0f} ms")
    encode_ms = p50(lambda: encoder.encode_text([QUERIES[0]]))
    print(f"encode one query (base BERT, CPU fp32): p50 {encode_ms:.1f} ms")

    for n in args.sizes:
        vectors = clustered(n, 768, clusters=max(100, n // 1000), seed=1)
        kind = ann.APPROX if n > ANN_THRESHOLD else ann.EXACT
        start = time.perf_counter()
        fake_index(f"n{n}", vectors)
        print(f"\n[{n:,} images] index build ({kind}) through the store: {time.perf_counter() - start:.1f} s")
        searcher = Searcher(f"n{n}")
        searcher.encoder  # warm
        qi = 0

        def one_query() -> None:
            nonlocal qi
            searcher.search(QUERIES[qi % len(QUERIES)], k=10)
            qi += 1

        total = p50(one_query, repeat=40)
        print(f"  warm text query, encoding included: p50 {total:.1f} ms "
              f"(encode {searcher.timings.encode_ms:.1f} ms + search {searcher.timings.search_ms:.1f} ms, last query)")
        queries = clustered(200, 768, clusters=max(100, n // 1000), seed=1)[:200] + \
            0.1 * np.random.default_rng(7).standard_normal((200, 768)).astype(np.float32)
        index, _ = searcher.vectors.load()
        exact = faiss.IndexFlatIP(768)
        exact.add(vectors)
        _, truth = exact.search(queries, 10)
        _, got = ann.search(index, queries, 10)
        got = got - 1  # vector ids start at 1, rows at 0
        recall = np.mean([len(set(truth[i]) & set(got[i])) / 10 for i in range(len(queries))])
        print(f"  recall@10 of the index against exact search (200 clustered queries): {recall:.4f}")
        if n == args.sizes[0]:
            cmd = [sys.executable, "-c", "from ldot_cli.main import run; run()", "search", "a dog on a beach",
                   "--name", f"n{n}", "--paths"]
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS":
                   str(args.threads)}
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, env=env)
                runs.append(time.perf_counter() - start)
            print(f"  `ldot search` process, start to printed results: median {statistics.median(runs):.2f} s "
                  f"(runs: {', '.join(f'{r:.2f}' for r in runs)})")
        searcher.close()
        del vectors, exact

    claim(args.rerank_images, encoder)


def claim(n_images: int, encoder) -> None:
    """Time to answer one query over n images: dot product vs scoring every pair with a cross-encoder."""
    import torch

    from models.nn.config import CROSS_PRESETS
    from models.nn.cross_encoder import CrossEncoder, UniterReranker

    rng = np.random.default_rng(3)
    image_vectors = rng.standard_normal((n_images, 768)).astype(np.float32)
    feats = rng.standard_normal((n_images, 36, 2048)).astype(np.float32)
    boxes = rng.uniform(0, 1, (n_images, 36, 6)).astype(np.float32)

    from models.core import ann

    index = ann.build(np.arange(1, n_images + 1), image_vectors, ann.EXACT)

    def dot() -> None:  # what `ldot search` does: encode, then one inner product per image
        ann.search(index, encoder.encode_text([QUERIES[0]]).numpy(), 10)

    dot_ms = p50(dot, repeat=20)
    with torch.device("meta"):
        cross = CrossEncoder(CROSS_PRESETS["base"])
    cross = cross.to_empty(device="cpu").eval()
    for p in cross.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    reranker = UniterReranker(cross, encoder.tokenizer)
    start = time.perf_counter()
    reranker.score([QUERIES[0]] * n_images, feats, boxes)
    cross_s = time.perf_counter() - start
    print(f"\n[LightningDOT claim, {n_images} images, one query, CPU] dot product (encode + score all): "
          f"{dot_ms:.1f} ms; cross-encoder scoring all {n_images} pairs (36 regions each): {cross_s:.1f} s; "
          f"ratio {1000 * cross_s / dot_ms:,.0f}x")


if __name__ == "__main__":
    main()
