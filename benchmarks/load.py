"""Checkpoint figures: a base-size bi-encoder (random weights) in both official layouts -> load time, one-time
conversion, bytes on disk after conversion, converted-dir load (memory-mapped), and one query's encode_text.

    PYTHONPATH=. python benchmarks/load.py [--threads 2]

Writes ~2.7 GB into a temporary directory (removed at the end). Times are medians of three warm loads.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the ldot CLI does

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def median_s(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ldot-load-"))
    os.environ["LDOT_HOME"] = str(home)
    try:
        run(home, args.threads)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run(tmp: Path, threads: int) -> None:
    import torch
    from ldot_testing import official_finetuned, official_pretrained, write_vocab

    import models
    from models.nn.bi_encoder import BiEncoder
    from models.nn.config import preset

    torch.set_num_threads(threads)
    with torch.device("meta"):
        model = BiEncoder(preset("base"))
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    print(f"torch {torch.__version__}, {threads} threads; base bi-encoder, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    torch.save(official_finetuned(model), tmp / "flickr-ft.pt")  # {model_dict: ...}, fp32
    torch.save(official_pretrained(model), tmp / "LightningDot.pt")  # flat bert.* fp16 with heads
    del model
    vocab = write_vocab(tmp / "vocab", size=28996)
    encoder = None
    for name in ("flickr-ft.pt", "LightningDot.pt"):
        print(f"{name}: {os.path.getsize(tmp / name) / 1e6:.0f} MB")
        official = median_s(lambda path=tmp / name: models.load_bi_encoder(path))
        print(f"  load_bi_encoder(official file): median {official:.2f} s")
        start = time.perf_counter()
        _, out = models.convert_checkpoint(tmp / name, tmp / f"converted-{name}", tokenizer=vocab)
        files = sorted(out.iterdir())
        print(f"  convert once: {time.perf_counter() - start:.2f} s; bytes on disk after conversion: "
              f"{sum(p.stat().st_size for p in files) / 1e6:.0f} MB ({', '.join(p.name for p in files)})")
        full = median_s(lambda path=out: models.load_bi_encoder(path))
        text = median_s(lambda path=out: models.load_bi_encoder(path, towers=("text",)))
        print(f"  load the converted dir (memory-mapped): median {1000 * full:.0f} ms; text tower only "
              f"{1000 * text:.0f} ms")
        encoder = encoder or models.load_bi_encoder(out)
    encoder.encode_text(["warm up"])
    times = []
    for _ in range(30):
        start = time.perf_counter()
        encoder.encode_text(["a dog on a beach"])
        times.append(time.perf_counter() - start)
    print(f"encode_text, one query, CPU fp32: p50 {1000 * statistics.median(times):.1f} ms")


if __name__ == "__main__":
    main()
