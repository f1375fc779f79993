"""Index size tiers at scale: build time, bytes per image, query p50 and recall@10 for 1M and 10M synthetic
clustered 768-d vectors with the automatic index choice, then the 100M figures worked out from them.

    python benchmarks/scale.py                          # 1M and 10M (10M: ~15 GB of disk, an hour or more)
    python benchmarks/scale.py --sizes 1000000          # 1M only
    python benchmarks/scale.py --memory-budget 8GB      # the budget the automatic choice works with

The vectors go straight to the index tiers (`models.core.ann`): at 10M, float32 copies in SQLite would
take 31 GB, which is what the IVF-PQ tier avoids holding in RAM. Recall@10 is against exact search (a
streamed brute-force scan) for 100 queries near the data. No GPU here: extraction at 100M is costed at the
target of 25 images/s per GPU, not measured.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the ldot CLI does

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.search import p50

DIM = 768
CHUNK = 200_000
TARGET_IMAGES_PER_S = 25.0  # per GPU, detector + image tower (the target; no GPU measured here)


def write_clustered(path: Path, n: int, clusters: int, seed: int) -> np.memmap:
    """n clustered vectors as an fp16 file (the re-scoring file layout), written in chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    out = np.memmap(path, dtype="<f2", mode="w+", shape=(n, DIM))
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        assign = rng.integers(0, clusters, stop - start)
        out[start:stop] = centres[assign] + 0.35 * rng.standard_normal((stop - start, DIM)).astype(np.float32)
    out.flush()
    return out


def chunks(vectors: np.ndarray):
    def gen():
        for start in range(0, len(vectors), CHUNK):
            stop = min(len(vectors), start + CHUNK)
            yield np.arange(start + 1, stop + 1, dtype=np.int64), np.asarray(vectors[start:stop], dtype=np.float32)
    return gen


def measure(n: int, workdir: Path, budget: int) -> dict:
    import faiss

    from ldot_cli.index.layout import ANN_THRESHOLD
    from models.core import ann

    kind = ann.choose_kind(n, DIM, ANN_THRESHOLD, budget)
    started = time.perf_counter()
    data = write_clustered(workdir / f"v{n}.f16", n, clusters=max(100, n // 1000), seed=1)
    gen_s = time.perf_counter() - started
    rng = np.random.default_rng(2)
    queries = np.asarray(data[rng.integers(0, n, 100)], dtype=np.float32) + \
        0.1 * rng.standard_normal((100, DIM)).astype(np.float32)
    started = time.perf_counter()
    if kind == ann.PQ:
        sample = np.asarray(data[np.sort(rng.choice(n, ann.pq_training_size(n), replace=False))], dtype=np.float32)
        index = ann.build_pq(DIM, n, sample)
        train_s = time.perf_counter() - started
        for ids, vectors in chunks(data)():
            ann.add(index, ids, vectors)
        index = ann.Rescored(index, np.arange(1, n + 1, dtype=np.int64), data)
        ram = len(faiss.serialize_index(index.index))
        disk = ram + n * DIM * 2 + n * 8
    else:
        vectors = np.asarray(data, dtype=np.float32)
        index = ann.build(np.arange(1, n + 1), vectors, kind)
        train_s = 0.0
        ram = len(faiss.serialize_index(index))
        disk = ram
        del vectors
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    nprobe, recall = ann.tune_nprobe(index, chunks(data), queries)  # as the store does after a build
    tune_s = time.perf_counter() - started
    single = p50(lambda: ann.search(index, queries[:1], 10))
    factory = ann.factory_string(kind, n, DIM)
    return {"n": n, "kind": kind, "factory": factory, "generate_s": gen_s, "train_s": train_s, "build_s": build_s,
            "tune_s": tune_s, "nprobe": nprobe, "nlist": ann.nlist_of(index),
            "ram_bytes_per_image": ram / n, "disk_bytes_per_image": disk / n, "query_p50_ms": single,
            "recall_at_10": recall}


def project(rows: list[dict], budget: int) -> None:
    from ldot_cli.index.layout import ANN_THRESHOLD
    from models.core import ann

    n = 100_000_000
    kind = ann.choose_kind(n, DIM, ANN_THRESHOLD, budget)
    base = max((r for r in rows if r["kind"] == kind), key=lambda r: r["n"], default=rows[-1])
    scale = n / base["n"]
    ram = ann.ram_bytes(kind, n, DIM)
    sqlite = n * (DIM * 4 + 150)  # float32 blob + row overhead (the source of truth)
    rescore = n * (DIM * 2 + 8) if kind == ann.PQ else 0
    regions = n * 50 * 2048 * 2  # ~50 boxes of 2048 fp16 features per image, if regions are kept
    gpu_hours = n / TARGET_IMAGES_PER_S / 3600
    print(f"\n100M images, worked out from the {base['n']:,} run ({base['kind']}):")
    print(f"  index kind            {kind}: {ann.factory_string(kind, n, DIM)}")
    print(f"  RAM (vector index)    {ram / 1e9:.1f} GB ({ram / n:.0f} B/image)")
    print(f"  disk                  SQLite {sqlite / 1e9:.0f} GB + fp16 re-scoring {rescore / 1e9:.0f} GB "
          f"+ index {ram / 1e9:.1f} GB (+ regions for --rerank {regions / 1e12:.1f} TB, or --no-regions)")
    # adding is linear in n; k-means training grows with (training points x cells), both set by the cells
    if kind == ann.PQ and base["kind"] == ann.PQ:
        train_growth = (ann.pq_training_size(n) * ann.pq_nlist(n)) / (ann.pq_training_size(base["n"]) * ann.pq_nlist(base["n"]))
    else:
        train_growth = 1.0
    build_h = ((base["build_s"] - base["train_s"]) * scale + base["train_s"] * train_growth) / 3600
    print(f"  index build           ~{build_h:.1f} h on this 2-core machine (adding x{scale:.0f}, training "
          f"x{train_growth:.1f}), not counting reading the vectors back from SQLite")
    if base.get("nlist") and base.get("nprobe"):
        # codes scanned per query = nprobe * n / nlist; the cells grow as 4 sqrt(n), so the scan grows as sqrt(n)
        # at the same nprobe: an upper bound on the latency (the quantizer and the re-scoring do not grow)
        nlist = ann.pq_nlist(n) if kind == ann.PQ else ann.ivf_cells(n)
        growth = (n / nlist) / (base["n"] / base["nlist"])
        print(f"  query latency         <= ~{base['query_p50_ms'] * growth:.0f} ms p50 single query, 1 thread: the "
              f"{base['n']:,} p50 x {growth:.1f} (codes scanned at nprobe {base['nprobe']} of {nlist} cells: "
              f"{base['nprobe'] * n / nlist / 1e6:.2f}M per query)")
    else:
        print(f"  query latency         ~{base['query_p50_ms'] * scale:.0f} ms p50 if the scan grows linearly with n")
    print(f"  extraction            {gpu_hours:,.0f} GPU-hours at {TARGET_IMAGES_PER_S:.0f} images/s per GPU "
          f"(= {gpu_hours / 64:.0f} h on 64 GPUs); not measured: no GPU here")


def main() -> None:
    from models.core import ann

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--memory-budget", default=None, help="e.g. 8GB (default: half of this machine's RAM)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    budget = ann.parse_bytes(args.memory_budget) if args.memory_budget else ann.default_memory_budget()
    print(f"memory budget {budget / 2**30:.1f} GiB; {os.cpu_count()} cores", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.sizes:
            row = measure(n, Path(tmp), budget)
            rows.append(row)
            print(f"{n:>11,} {row['kind']:>6}  build {row['build_s']:7.1f} s (train {row['train_s']:.1f} s)  "
                  f"RAM {row['ram_bytes_per_image']:6.0f} B/image  disk {row['disk_bytes_per_image']:6.0f} B/image  "
                  f"query p50 {row['query_p50_ms']:6.1f} ms  recall@10 {row['recall_at_10']:.3f} at nprobe {row['nprobe']} "
                  f"of {row['nlist']} (tuned in {row['tune_s']:.0f} s)  [{row['factory']}]",
                  flush=True)
            (Path(tmp) / f"v{n}.f16").unlink()
    project(rows, budget)


if __name__ == "__main__":
    main()
