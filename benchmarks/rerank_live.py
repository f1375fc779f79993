"""ViLT re-ranking speed: ms per (text, image) pair and the time to re-rank one query's top 20 photos.

    python benchmarks/rerank_live.py                   # CPU, 2 threads
    python benchmarks/rerank_live.py --device cuda     # on a GPU (float16, as `ldot search --rerank` runs it)

ViLT-B/32's full-size config (12 layers, 768 wide, `ViltForImageAndTextRetrieval`) with random weights: speed does not
depend on the weights' values. The photos are 800 x 600 JPEG files (resized by ViLT's preprocessing to 384 x 512,
192 patches), read the way `ldot search --rerank` reads them: ldot's decoder, the model's preprocessing, one batch.
"Top 20" is the whole re-ranking step of one query: decode + preprocess + score 20 pairs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERY = "two people sitting on a bench in a park near a big tree"
WORDS = "two people sitting on a bench in park near big tree a dog beach red car street child ball snow".split()


def build(device: str):
    import torch
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import ViltConfig, ViltForImageAndTextRetrieval

    from models.nn.tokenizer import Tokenizer
    from models.nn.vilt import PixelPreprocessing, ViltReranker

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    backend = RustTokenizer(WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = BertNormalizer(lowercase=True)
    backend.pre_tokenizer = BertPreTokenizer()
    torch.manual_seed(0)
    model = ViltForImageAndTextRetrieval(ViltConfig(max_position_embeddings=40)).eval()
    dev = torch.device(device)
    model = model.to(dev, torch.float16 if dev.type == "cuda" else torch.float32)
    return ViltReranker(model, Tokenizer(backend, "benchmark"), PixelPreprocessing())


def photos(folder: Path, count: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        blocks = rng.integers(0, 256, size=(600 // 8, 800 // 8, 3), dtype=np.uint8)
        path = folder / f"photo_{i:02d}.jpg"
        Image.fromarray(np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)).save(path, quality=90)
        out.append(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--batches", default="1,8,20", help="batch sizes to time, comma-separated")
    args = parser.parse_args()
    import torch

    from feature_extraction.images.decode import load_image

    torch.set_num_threads(args.threads)
    reranker = build(args.device)
    folder = Path(tempfile.mkdtemp(prefix="ldot-bench-rerank-"))
    files = photos(folder, args.top)
    print(f"machine: {os.cpu_count()} CPUs visible, {args.threads} threads, device {args.device}, load average "
          f"{os.getloadavg()[0]:.1f} (wall times grow with the load; CPU time much less)"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    pixels = [reranker.prepare(load_image(p)) for p in files]
    print(f"ViLT-B/32 (random weights), photos 800 x 600 -> {tuple(pixels[0].shape[1:])} pixels, "
          f"{pixels[0].shape[1] // 32 * pixels[0].shape[2] // 32} patches; query of "
          f"{len(reranker.token_rows([QUERY])[0])} word-pieces")
    reranker.score_pixels([QUERY] * 2, pixels[:2])  # warm-up

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for batch in (int(b) for b in args.batches.split(",")):
        reranker.batch_size = batch
        times, cpu = [], []
        for _ in range(args.runs):
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            reranker.score_pixels([QUERY] * args.top, pixels)
            sync()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        per_pair = 1000 * statistics.median(times) / args.top
        per_pair_cpu = 1000 * statistics.median(cpu) / args.top
        print(f"  scoring, batches of {batch:>2}: {per_pair:7.1f} ms per pair of wall time, {per_pair_cpu:7.1f} ms of "
              f"CPU time over all threads (median of {args.runs})")
    reranker.batch_size = 32
    times, decode = [], []
    for _ in range(args.runs):
        sync()
        start = time.perf_counter()
        prepared = [reranker.prepare(load_image(p)) for p in files]
        decoded = time.perf_counter()
        reranker.score_pixels([QUERY] * args.top, prepared)
        sync()
        times.append(time.perf_counter() - start)
        decode.append(decoded - start)
    print(f"  top {args.top} of one query (decode + preprocess + score, as `ldot search --rerank --rerank-k "
          f"{args.top}`): {statistics.median(times):.2f} s, of which decode + preprocess "
          f"{statistics.median(decode):.2f} s (median of {args.runs})")


if __name__ == "__main__":
    main()
