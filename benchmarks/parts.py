"""One index vs the same vectors in N parts (how ldot stores its approximate tiers), measured in one run.

Builds one trained empty IVF (or OPQ + IVF-PQ) index on clustered synthetic vectors, then fills ONE clone with
every vector and N clones with contiguous id ranges (`ann.shards` searches them: FAISS's IndexShards, one
thread a part). Prints:
  - that both return the same top 10 (ids and scores) for every query;
  - single-query latency p50 (and a 100-query batch) for 1 part vs N parts, and their ratio;
  - what adding a few images costs: rewriting + hashing the whole file vs only the last part;
  - what opening costs: sha256 of every file (before parts) vs a stat per part (a part is re-hashed only when
    its size/mtime/inode stamp changed).

    python benchmarks/parts.py                      # 200,000 x 128, IVF, 8 parts
    python benchmarks/parts.py --n 1000000 --parts 4 --kind ivfpq
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def clustered(n: int, d: int, clusters: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        out[start:start + m] = centres[rng.integers(0, clusters, m)] + 0.35 * rng.standard_normal((m, d))
    return out


def p50_ms(fn, repeat: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--kind", choices=["ivf", "ivfpq"], default="ivf")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    import faiss

    from models.core import ann
    from models.core.fileio import file_stamp, sha256_file

    print(f"machine: {os.cpu_count()} CPUs visible, faiss {faiss.__version__}, omp threads "
          f"{faiss.omp_get_max_threads()}")
    vectors = clustered(args.n, args.dim)
    ids = np.arange(1, args.n + 1, dtype=np.int64)
    rng = np.random.default_rng(1)
    queries = vectors[rng.integers(0, args.n, args.queries)] + 0.1 * rng.standard_normal(
        (args.queries, args.dim)).astype(np.float32)

    start = time.perf_counter()
    size = ann.pq_training_size(args.n) if args.kind == "ivfpq" else 64 * ann.ivf_cells(args.n)
    sample = vectors[np.linspace(0, args.n - 1, min(size, args.n)).astype(int)]
    trained = ann.train_empty(args.kind, args.dim, args.n, sample)
    print(f"{args.n:,} x {args.dim} {args.kind}: {ann.nlist_of(trained)} cells, trained in "
          f"{time.perf_counter() - start:.1f} s; nprobe {args.nprobe}")

    single = ann.clone(trained)
    ann.add(single, ids, vectors)
    rows = -(-args.n // args.parts)
    parts = []
    for first in range(0, args.n, rows):
        part = ann.clone(trained)
        ann.add(part, ids[first:first + rows], vectors[first:first + rows])
        parts.append(part)
    sharded = ann.shards(parts, threaded=True)
    sequential = ann.shards(parts, threaded=False)
    if args.kind == "ivfpq":
        f16 = vectors.astype(np.float16)
        single, sharded, sequential = (ann.Rescored(i, ids, f16) for i in (single, sharded, sequential))
    for index in (single, sharded, sequential):
        ann.set_nprobe(index, args.nprobe)

    s1, i1 = ann.search(single, queries, 10)
    for index in (sharded, sequential):
        sn, i_n = ann.search(index, queries, 10)
        same = bool(np.array_equal(i1, i_n) and np.allclose(s1, sn, rtol=0, atol=1e-5))
        print(f"same top 10 (ids and scores) for all {args.queries} queries: {'yes' if same else 'NO'}")
    print(f"ldot's choice on this machine ({os.cpu_count()} cores): "
          f"{'threaded' if (os.cpu_count() or 1) >= ann.THREADED_SHARDS_MIN_CPUS else 'one thread'}")

    one = [queries[i:i + 1] for i in range(args.queries)]
    state = {"q": 0}

    def one_query(index):
        def run():
            state["q"] = (state["q"] + 1) % len(one)
            ann.search(index, one[state["q"]], 10)
        return run

    t1 = p50_ms(one_query(single), args.queries)
    tn = p50_ms(one_query(sharded), args.queries)
    ts = p50_ms(one_query(sequential), args.queries)
    print(f"one query, p50: 1 part {t1:.2f} ms; {len(parts)} parts threaded {tn:.2f} ms (1 part / N = {t1 / tn:.2f}x), "
          f"in one thread {ts:.2f} ms ({t1 / ts:.2f}x)")
    b1 = p50_ms(lambda: ann.search(single, queries[:100], 10), 5)
    bn = p50_ms(lambda: ann.search(sharded, queries[:100], 10), 5)
    bs = p50_ms(lambda: ann.search(sequential, queries[:100], 10), 5)
    print(f"100-query batch, p50: 1 part {b1:.1f} ms; {len(parts)} parts threaded {bn:.1f} ms ({b1 / bn:.2f}x), "
          f"in one thread {bs:.1f} ms ({b1 / bs:.2f}x)")

    with tempfile.TemporaryDirectory(prefix="ldot-parts-") as tmp:
        def write_and_hash(index, path: Path, part: bool) -> float:
            start = time.perf_counter()
            ann.write(index, str(path), without_quantizer=part)  # as the store writes parts: no quantizer copy
            sha256_file(path)
            return time.perf_counter() - start

        whole = write_and_hash(single, Path(tmp) / "one.faiss", False)
        last = write_and_hash(parts[-1], Path(tmp) / "last.faiss", True)
        for n, part in enumerate(parts[:-1]):
            ann.write(part, str(Path(tmp) / f"part{n}.faiss"), without_quantizer=True)
        one_bytes = (Path(tmp) / "one.faiss").stat().st_size
        print(f"adding images: rewrite + sha256 the whole file ({one_bytes / 1e6:.0f} MB) {1000 * whole:.0f} ms, "
              f"only the last part {1000 * last:.0f} ms (ratio {whole / last:.1f}x)")
        files = [p for p in Path(tmp).iterdir() if p.name != "one.faiss"]
        start = time.perf_counter()
        sha256_file(Path(tmp) / "one.faiss")
        hashed = time.perf_counter() - start
        start = time.perf_counter()
        for p in files:
            file_stamp(p)
        stamped = time.perf_counter() - start
        print(f"opening: sha256 of the whole file {1000 * hashed:.0f} ms, a stamp check of {len(files)} parts "
              f"{1000 * stamped:.2f} ms (hashing grows with the index: ~{hashed / one_bytes * 7.2e9:.0f} s for the "
              "7.2 GB IVF-PQ file of 100M images at this hashing rate)")


if __name__ == "__main__":
    main()
