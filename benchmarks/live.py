"""The live dual encoder (clip-vit-b32) through `ldot index` and `ldot search`, against the region path.

Full-size models with seeded random weights (speed and memory do not depend on their values; nothing is
downloaded): CLIP ViT-B/32 (`transformers`' default CLIPConfig, 151M parameters) imported as ``clip-vit-b32``;
for the region path the BUTD R101-C4 detector (300 proposals) and a base-size LightningDOT bi-encoder. Synthetic
600x800 JPEGs. Each path indexes its folder in a fresh process exactly as `ldot index` does (two decode workers,
its default batch); the figures are photos per second (the whole run, model loading included, then a second folder
with the model loaded) and the peak resident memory of the process tree (the indexer and its decode workers,
sampled every 50 ms). Then warm text-query latency over an index of synthetic clustered 512-d vectors, in process
and through a running `ldot serve` (HTTP round trip, and the `ldot search` command as a user runs it).

    PYTHONPATH=. python benchmarks/live.py [--images 60] [--region-images 2] [--vectors 100000]
    PYTHONPATH=. python benchmarks/live.py --device cuda --images 1000 --region-images 0   # on a GPU machine

The text tower reads a tiny byte-level vocabulary here (no download): a query is a few more tokens than with
CLIP's real 49,408-token vocabulary, so the query timings are, if anything, pessimistic.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the ldot CLI does (ldot_cli/main.py)

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

QUERIES = ["a dog on a beach", "two people sitting on a bench in a park", "a red car parked on the street",
           "a child playing with a ball", "snow on the mountains under a blue sky"]


class TreeMemory(threading.Thread):
    """Samples the memory of this process and all its children: the peak of the summed RSS (which counts pages the
    decode workers share with their fork server once per process) and of the summed PSS (shared pages split
    between the processes that map them: what the tree really holds)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.peak_pss = 0
        self.stop = False

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop:
            rss = pss = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    info = proc.memory_full_info()
                    rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
                except psutil.Error:
                    pass
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            time.sleep(0.2)


# -------------------------------------------------------------------------------------------- setting up
def setup(home: Path, photos: Path, count: int, size: tuple[int, int], regions: bool) -> None:
    """clip-vit-b32 (full-size, random) in ``home``; with ``regions`` the detector and bi-encoder too; photos."""
    from dual_fixtures import tiny_dual
    from PIL import Image

    from tests.detector_fixtures import synthetic_image

    os.environ["LDOT_HOME"] = str(home)
    from models.hub.convert import import_model

    model, tokenizer, processor = tiny_dual("clip", seed=0, full=True)
    folder = home / "clip-src"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    import_model(folder, "clip-vit-b32")
    if regions:
        import torch

        from benchmarks.search import base_text_encoder
        from feature_extraction.detector.config import DetectorConfig
        from feature_extraction.detector.weights import load_detector, save_detector
        from models.hub.installed import record_model
        from tests.detector_fixtures import random_hub_state_dict

        base_text_encoder(home)  # 'bench'
        torch.manual_seed(0)
        det = load_detector(random_hub_state_dict(DetectorConfig(), seed=0), DetectorConfig())
        record_model(save_detector(det, home / "models" / "bench-det"), "bench-det", "detector", "benchmark")
    photos.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(synthetic_image(size[0], size[1], 300 + i)).save(photos / f"photo_{i:04d}.jpg", quality=90)


# -------------------------------------------------------------------------------------------- indexing
def measure(folders: list[str], model: str, detector: str | None, workers: int, threads: int, device: str) -> dict:
    """Index ``folders`` one after the other with one indexer per folder (the model loaded once, as a re-run of
    `ldot index` on a machine with a warm page cache); returns seconds and images per folder and the tree peak."""
    import torch

    torch.set_num_threads(threads)
    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions

    meter = TreeMemory()
    meter.start()
    runs, encoder = [], None
    for i, folder in enumerate(folders):
        indexer = Indexer("bench", IndexOptions(model=model, num_workers=workers, device=device), detector=detector)
        indexer._encoder = encoder  # the second folder: the model is loaded already
        start = time.perf_counter()
        report = indexer.run([folder])
        runs.append({"seconds": time.perf_counter() - start, "encoded": report.encoded,
                     "skipped": len(report.skipped)})
        encoder = indexer._encoder
    meter.stop = True
    meter.join()
    out = {"runs": runs, "tree_peak": meter.peak, "tree_peak_pss": meter.peak_pss}
    if device == "cuda":
        out["gpu_peak"] = torch.cuda.max_memory_allocated()
    return out


def index_path_figures(tmp: Path, env: dict, args: argparse.Namespace, photos: list[Path]) -> None:
    paths = [("clip-vit-b32 (pixels, no detector)", "clip-vit-b32", None, args.images)]
    if args.region_images:
        paths.append(("region path (BUTD detector + LightningDOT)", "bench", "bench-det", args.region_images))
    print(f"`ldot index`, {args.size} JPEGs, {args.workers} decode workers, {args.threads} torch threads, "
          f"device {args.device}; two folders per path (the second with the model loaded)")
    rates = {}
    for label, model, detector, n in paths:
        folders = []
        for half in range(2):
            folder = tmp / f"{model}-{half}"
            folder.mkdir()
            for src in photos[half * n:(half + 1) * n]:
                os.link(src, folder / src.name)
            folders.append(str(folder))
        cmd = [sys.executable, __file__, "--measure", model, detector or "", *folders, "--workers", str(args.workers),
               "--threads", str(args.threads), "--device", args.device]
        home = tmp / f"home-{model}"  # each path its own index: a fresh `ldot index`
        result = subprocess.run(cmd, check=True, env={**env, "LDOT_HOME": str(home)}, capture_output=True, text=True)
        data = json.loads(result.stdout.strip().splitlines()[-1])
        cold, warm = data["runs"]
        rates[model] = warm["encoded"] / warm["seconds"]
        gpu = f", GPU peak {data['gpu_peak'] / 1e9:.2f} GB" if "gpu_peak" in data else ""
        print(f"  {label:44s} first folder {cold['encoded']} photos in {cold['seconds']:.1f} s "
              f"({cold['encoded'] / cold['seconds']:.2f} photos/s, model loading included); second {warm['encoded']} "
              f"in {warm['seconds']:.1f} s ({rates[model]:.2f} photos/s); process tree peak: PSS "
              f"{data['tree_peak_pss'] / 1e9:.2f} GB (RSS summed {data['tree_peak'] / 1e9:.2f} GB){gpu}")
    if "bench" in rates:
        print(f"  ratio (model loaded): clip-vit-b32 indexes {rates['clip-vit-b32'] / rates['bench']:.0f}x as many "
              "photos per second as the region path")


# -------------------------------------------------------------------------------------------- queries
def query_figures(home: Path, env: dict, args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from benchmarks.search import clustered, fake_index, p50

    torch.set_num_threads(args.threads)
    os.environ["LDOT_HOME"] = str(home)
    from ldot_cli.index.search import Searcher

    vectors = clustered(args.vectors, 512, clusters=max(100, args.vectors // 1000), seed=1)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    fake_index("q", vectors, "clip-vit-b32")
    searcher = Searcher("q")
    kind = searcher.store.vector_file_set().kind
    start = time.perf_counter()
    searcher.encoder  # noqa: B018 - load it
    print(f"\nqueries over {args.vectors:,} synthetic 512-d vectors ({kind} index), clip-vit-b32 text tower on the "
          f"CPU, {args.threads} threads (model load: {time.perf_counter() - start:.1f} s)")
    qi = 0

    def one() -> None:
        nonlocal qi
        searcher.search(QUERIES[qi % len(QUERIES)], k=10)
        qi += 1

    total = p50(one, repeat=40)
    encode = p50(lambda: searcher.encoder.encode_text([QUERIES[0]]), repeat=40)
    tokens = searcher.encoder.text_tokens(QUERIES[0])[0]
    print(f"  warm text query in process: p50 {total:.1f} ms (encoding the query alone: p50 {encode:.1f} ms; "
          f"{tokens} tokens)")
    searcher.close()
    os.environ["LDOT_QUERY_PRECISION"] = "int8"  # the same, with the query encoder's linear layers in int8
    searcher = Searcher("q")
    searcher.encoder  # noqa: B018 - load (and quantise) it
    total8 = p50(one, repeat=40)
    encode8 = p50(lambda: searcher.encoder.encode_text([QUERIES[0]]), repeat=40)
    print(f"  the same with LDOT_QUERY_PRECISION=int8: p50 {total8:.1f} ms (encoding alone: p50 {encode8:.1f} ms)")
    searcher.close()
    del os.environ["LDOT_QUERY_PRECISION"]
    serve = subprocess.Popen([sys.executable, "-c", "from ldot_cli.main import run; run()", "serve", "--name", "q",
                              "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**env, "LDOT_HOME": str(home)})
    try:
        import httpx

        base = serve.stdout.readline().strip().split("?")[0].rstrip("/")
        httpx.get(f"{base}/api/info", timeout=300)

        def http() -> None:
            nonlocal qi
            httpx.post(f"{base}/api/search", json={"q": QUERIES[qi % len(QUERIES)], "k": 10}, timeout=60)
            qi += 1

        print(f"  through a running `ldot serve`: HTTP round trip p50 {p50(http, repeat=40):.1f} ms")
        runs = []
        cmd = [sys.executable, "-c", "from ldot_cli.main import run; run()", "search", "a dog on a beach", "--name",
               "q", "--paths"]
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env={**env, "LDOT_HOME": str(home)})
            runs.append(time.perf_counter() - start)
        print(f"  the `ldot search` command through that server, process start to printed paths: median "
              f"{1000 * statistics.median(runs):.0f} ms (runs: {', '.join(f'{1000 * r:.0f}' for r in runs)} ms)")
        from benchmarks.serve import installed_python

        python = installed_python(home)
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run([python, *cmd[1:]], check=True, capture_output=True, env={**env, "LDOT_HOME": str(home)})
            runs.append(time.perf_counter() - start)
        print(f"  the same as installed (.pyc files, no editable-install finder): median "
              f"{1000 * statistics.median(runs):.0f} ms (runs: {', '.join(f'{1000 * r:.0f}' for r in runs)} ms)")
    finally:
        serve.terminate()
        serve.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60, help="photos per folder for clip-vit-b32 (two folders)")
    parser.add_argument("--region-images", type=int, default=2, help="photos per folder for the region path (0: "
                        "skip it; it takes 10-60 s a photo on a CPU)")
    parser.add_argument("--size", default="600x800", help="HxW of the synthetic photos")
    parser.add_argument("--workers", type=int, default=2, help="`ldot index --workers`")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vectors", type=int, default=100_000, help="index size for the query timings (0: skip)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models run")
    parser.add_argument("--setup", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    if args.setup:
        count = 2 * max(args.images, args.region_images)
        setup(Path(args.setup[0]), Path(args.setup[1]), count, (h, w), args.region_images > 0)
        return
    if args.measure:
        model, detector, *folders = args.measure
        print(json.dumps(measure(folders, model, detector or None, args.workers, args.threads, args.device)))
        return
    import torch

    print(f"machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; "
          f"device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    with tempfile.TemporaryDirectory(prefix="ldot-live-") as tmp_name:
        tmp = Path(tmp_name)
        home, photos = tmp / "home", tmp / "photos"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "LDOT_NO_PROGRESS": "1",
               "LDOT_NO_SERVER": "1", "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--setup", str(home), str(photos), "--images", str(args.images),
                        "--region-images", str(args.region_images), "--size", args.size], check=True,
                       env={**env, "LDOT_HOME": str(home)})
        print(f"set-up (random full-size weights, photos): {time.perf_counter() - start:.0f} s")
        all_photos = sorted(photos.iterdir())
        for model in ("clip-vit-b32", "bench", "bench-det"):  # every path's home has the models (hard links)
            if (home / "models" / model).is_dir():
                for sub in ("home-clip-vit-b32", "home-bench"):
                    target = tmp / sub / "models"
                    target.mkdir(parents=True, exist_ok=True)
                    subprocess.run(["cp", "-al", str(home / "models" / model), str(target / model)], check=True)
        for sub in ("home-clip-vit-b32", "home-bench"):
            for extra in ("known_hashes.json",):
                if (home / extra).is_file():
                    subprocess.run(["cp", str(home / extra), str(tmp / sub / extra)], check=True)
        index_path_figures(tmp, env, args, all_photos)
        if args.vectors:
            env.pop("LDOT_NO_SERVER")
            query_figures(home, env, args)


if __name__ == "__main__":
    main()
