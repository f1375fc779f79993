"""The query encoder on the CPU: fp32 against int8 (dynamic quantisation of the linear layers,
`models.nn.quantize`), and bf16 where the CPU has it, measured in one run.

    python benchmarks/quantize.py                  # ~5 min on 2 shared cores
    python benchmarks/quantize.py --size 20000 --steps 60

1. Speed: warm encoding of one query by the base-size text tower (random weights: speed does not depend on
   their values), p50 over 30 queries, and what quantising costs at load.
2. Recall@10 against fp32 on the synthetic set of benchmarks/search.py: 200 distinct queries (words of the
   tokenizer's vocabulary) over clustered image vectors; the share of fp32's top 10 that int8's top 10 keeps
   (with random weights the queries collapse onto one vector: the figure counts rank flips among near-ties).
3. Recall on a tiny trained model (tests/learnset.py, the set of tests/test_learning.py): fine-tuned here, then
   text-to-image R@1/5/10 on held-out images with its text tower in fp32 and in int8.

Measured here (2 shared cores, AVX2, load ~13): int8 encodes a query ~2x faster (66-68 against 129-140 ms),
bf16 is emulated on this CPU (1.1 s); on the synthetic set int8 kept 99.8% of fp32's top 10 at 20k images but
91.9% at 100k (near-ties); the tiny trained model lost no R@10. Hence int8 is an option
(LDOT_QUERY_PRECISION=int8), not the default: fp32 answers stay the same in a server and in a plain process.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the ldot CLI does (ldot_cli/main.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def load() -> str:
    with open("/proc/loadavg") as handle:
        return "load average " + " ".join(handle.read().split()[:3])


def p50_ms(fn, items: list, warmup: int = 3) -> float:
    for item in items[:warmup]:
        fn(item)
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def queries(n: int, seed: int = 0) -> list[str]:
    from ldot_testing import WORDS  # the words of the benchmark's vocabulary

    words = sorted({w for w in WORDS if w.isalpha()})
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000, help="synthetic images for the recall of part 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=90, help="fine-tuning steps of the tiny model (part 3)")
    args = parser.parse_args()

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    home = Path(tempfile.mkdtemp(prefix="ldot-bench-quant-"))
    os.environ["LDOT_HOME"] = str(home)
    print(f"machine: {os.cpu_count()} CPUs visible, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}; {load()}")

    from search import base_text_encoder, clustered  # benchmarks/search.py

    from models.hub.load import load_bi_encoder
    from models.nn.quantize import int8_linears

    base_text_encoder(home)
    fp32 = load_bi_encoder("bench", towers=("text",))
    start = time.perf_counter()
    int8 = int8_linears(load_bi_encoder("bench", towers=("text",)))
    quantise_ms = 1000 * (time.perf_counter() - start)
    start = time.perf_counter()
    load_bi_encoder("bench", towers=("text",))
    load_ms = 1000 * (time.perf_counter() - start)
    texts = queries(200)
    print("\n[1] warm encoding of one query, base-size text tower (12 layers, 768 wide), CPU:")
    print(f"  loading the text tower {load_ms:.0f} ms; + quantising it to int8 {quantise_ms - load_ms:.0f} ms")
    for name, model in (("fp32", fp32), ("int8", int8), ("fp32", fp32), ("int8", int8)):  # twice: interleaved
        ms = p50_ms(lambda q, m=model: m.encode_text([q]), texts[:30])
        print(f"  {name}: p50 {ms:.1f} ms  ({load()})")
    bf16_capable = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") and "avx512_bf16" in \
        Path("/proc/cpuinfo").read_text()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ms = p50_ms(lambda q: bf16.encode_text([q]), texts[:10])
    print(f"  bf16: p50 {ms:.1f} ms (native bf16 on this CPU: {bf16_capable}; without it bf16 is emulated)")

    print(f"\n[2] recall@10 of int8 against fp32 over {args.size:,} synthetic clustered images, 200 queries:")
    vectors = clustered(args.size, 768, clusters=max(100, args.size // 1000), seed=1)
    index = faiss.IndexFlatIP(768)
    index.add(vectors)
    a = fp32.encode_text(texts).numpy()
    b = int8.encode_text(texts).numpy()
    scores, top_a = index.search(a, 11)
    _, top_b = index.search(b, 10)
    overlap = np.mean([len(set(x[:10]) & set(y)) / 10 for x, y in zip(top_a, top_b)])
    cos = np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    print(f"  int8 keeps {100 * overlap:.1f}% of fp32's top 10 (mean cosine of int8's and fp32's query vectors "
          f"{cos:.5f})")
    print(f"  caveat: with random weights the 200 queries collapse onto one vector (mean cosine between queries "
          f"{np.mean(unit @ unit.T):.4f}), and the 10th and 11th scores differ by a median "
          f"{np.median(scores[:, 9] - scores[:, 10]):.5f} on scores of {np.median(scores[:, 9]):.2f}: this counts "
          "rank flips among near-ties of one query, not lost matches")

    print(f"\n[3] a tiny model fine-tuned here ({args.steps} steps on tests/learnset.py), held-out text-to-image:")
    import learnset as L

    from models.training.loop import TrainConfig

    torch.set_num_threads(1)
    tok = L.tokenizer_for(home / "tok")
    train, lookup, _ = L.learnable_set(100, seed=0, tokenizer=tok)
    val, more, _ = L.learnable_set(60, seed=1, tokenizer=tok)
    lookup.update(more)
    model = L.bi_encoder()
    result = L.run_mode("finetune", model, train, val, lookup, tok,
                        TrainConfig(batch_size=16, lr=3e-3, epochs=None, steps=args.steps, warmup=0.1))
    chance = result.chance["text_to_image"]
    after32 = L.evaluate(model.eval(), val, lookup, tok)
    int8_linears(model.bert.txt_model)
    after8 = L.evaluate(model, val, lookup, tok)
    for name, figures in (("fp32", after32), ("int8", after8)):
        t2i = figures["text_to_image"]
        print(f"  {name}: R@1 {t2i['r1']:.1f}  R@5 {t2i['r5']:.1f}  R@10 {t2i['r10']:.1f}  "
              f"(mean recall {figures['mean_recall']:.1f}; chance R@10 {chance['r10']:.1f})")
    print(f"  R@10 lost by int8: {after32['text_to_image']['r10'] - after8['text_to_image']['r10']:+.1f} points; "
          f"{load()}")


if __name__ == "__main__":
    main()
