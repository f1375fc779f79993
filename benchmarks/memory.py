"""Peak resident memory of `ldot index` per stage, for folders of different sizes.

Full-size models with seeded random weights (memory and time do not depend on their values): the BUTD R101-C4
detector (300 proposals) and a base-size bi-encoder, installed in a temporary $LDOT_HOME. Synthetic 600x800 JPEGs.
For each folder size a fresh process runs the indexer exactly as `ldot index` does (same defaults: batch 8, two
decode workers) and records, for each stage, the peak resident memory of that process while the stage ran (Linux
VmHWM, reset between stages through /proc/self/clear_refs), plus the decode workers' resident memory (sampled) and
the seconds per image. The goal: a peak under 3 GB on a CPU for any folder size.

    PYTHONPATH=. python benchmarks/memory.py [--images 2 8] [--batch-size 8] [--workers 2] [--threads 2]
    PYTHONPATH=. python benchmarks/memory.py --speed --images 2 [--rounds 3]   # speed now vs whole-batch stages

On a shared machine the seconds are noisy; the memory figures are not. Needs psutil: pip install '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# -------------------------------------------------------------------------------------------- measuring
def _status(field: str, pid: str = "self") -> int:
    """A /proc/<pid>/status field in bytes (0 when unreadable)."""
    try:
        for text in Path(f"/proc/{pid}/status").read_text().splitlines():
            if text.startswith(field + ":"):
                return int(text.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Meter:
    """Peak resident memory per stage: ``end(name)`` books the peak since the previous mark under ``name``."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.can_reset = self._reset()
        self.last = time.perf_counter()

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            return True
        except OSError:
            return False

    def end(self, name: str) -> None:
        self.peaks[name] = max(self.peaks[name], _status("VmHWM"))
        now = time.perf_counter()
        self.seconds[name] += now - self.last
        self.last = now
        self._reset()


class Workers(threading.Thread):
    """Samples the summed resident memory of this process's children (the decode workers)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = False

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop:
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)


def measure(folder: str, batch_size: int, workers: int, threads: int) -> dict:
    """Index ``folder`` in this process with stage hooks; returns the peaks (bytes) and timings."""
    import torch

    torch.set_num_threads(threads)
    from feature_extraction.detector.network import StageTimes
    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions

    meter = Meter()
    meter.end("start (python, torch, ldot imported)")

    class Hooked(StageTimes):
        def add(self, name: str, start: float) -> float:
            meter.end(f"detector: {name}")
            return super().add(name, start)

    class MeteredIndexer(Indexer):
        @property
        def detector(self):  # type: ignore[override]
            if self._detector is None:
                meter.end("walk, hash, decode, store")
                det = Indexer.detector.fget(self)
                meter.end("load detector")
                plain = det.extract

                def extract(batch, preset, with_soft_labels=False):
                    meter.end("walk, hash, decode, store")
                    out = plain(batch, preset, with_soft_labels, timings=Hooked())
                    meter.end("detector: selection")
                    return out

                det.extract = extract
            return self._detector

        @property
        def encoder(self):  # type: ignore[override]
            if self._encoder is None:
                meter.end("walk, hash, decode, store")
                enc = Indexer.encoder.fget(self)
                meter.end("load image tower")
                plain = enc.encode_images

                def encode_images(records):
                    meter.end("walk, hash, decode, store")
                    out = plain(records)
                    meter.end("image tower: encode")
                    return out

                enc.encode_images = encode_images
            return self._encoder

    sampler = Workers()
    sampler.start()
    started = time.perf_counter()
    indexer = MeteredIndexer("bench", IndexOptions(model="bench", detector="bench-det", batch_size=batch_size,
                                                   num_workers=workers, device="cpu"))
    report = indexer.run([folder])
    elapsed = time.perf_counter() - started
    meter.end("walk, hash, decode, store")
    sampler.stop = True
    return {"peaks": dict(meter.peaks), "seconds": dict(meter.seconds), "workers_peak": sampler.peak,
            "encoded": report.encoded, "elapsed_s": elapsed, "hwm_reset": meter.can_reset}


def speed(images: int, rounds: int, threads: int) -> None:
    """Seconds per image of the detector as it runs now (head one image at a time, backbone capped in pixels)
    against the whole batch through every stage (how it ran before), interleaved round by round in one process."""
    import statistics

    import torch

    from feature_extraction.detector.config import DetectorConfig
    from feature_extraction.detector.preprocess import preprocess
    from feature_extraction.detector.weights import load_detector
    from tests.detector_fixtures import random_hub_state_dict, synthetic_image

    torch.set_num_threads(threads)
    cfg = DetectorConfig()
    model = load_detector(random_hub_state_dict(cfg, seed=0), cfg)
    batch = [preprocess(synthetic_image(600, 800, 300 + i), cfg) for i in range(images)]

    @torch.inference_mode()
    def whole_batch() -> None:  # every stage on the whole batch at once (the code before per-image stages)
        res4 = model.backbone_features([im.tensor for im in batch])
        props = [model.propose(f, im.scale.resized_size)[0] for f, im in zip(res4, batch)]
        feats = model.res5_features(model.pool(res4, props)).float()
        model.roi_heads.box_predictor(feats)

    def now() -> None:
        model.detect(batch)

    now()  # warm-up: oneDNN primitive creation
    times: dict[str, list[float]] = {"whole batch per stage (before)": [], "one image per head call (now)": []}
    for r in range(rounds):
        order = list(times.items()) if r % 2 == 0 else list(times.items())[::-1]
        for name, record in order:
            fn = whole_batch if name.endswith("(before)") else now
            start = time.perf_counter()
            fn()
            record.append((time.perf_counter() - start) / images)
    print(f"detector seconds per image, {images} images 600x800 per call, median of {rounds} interleaved rounds "
          f"({threads} threads):")
    for name, record in times.items():
        print(f"  {name:34s} {statistics.median(record):7.2f} s/image  (rounds: "
              + ", ".join(f"{t:.1f}" for t in record) + ")")


# -------------------------------------------------------------------------------------------- setting up
def setup(home: Path, photos: Path, count: int, size: tuple[int, int]) -> None:
    """Full-size random detector + base bi-encoder in ``home``; ``count`` synthetic JPEGs in ``photos``."""
    import torch
    from PIL import Image

    from benchmarks.search import base_text_encoder
    from feature_extraction.detector.config import DetectorConfig
    from feature_extraction.detector.weights import load_detector, save_detector
    from models.hub.installed import record_model
    from tests.detector_fixtures import random_hub_state_dict, synthetic_image

    os.environ["LDOT_HOME"] = str(home)
    base_text_encoder(home)  # installs 'bench'
    torch.manual_seed(0)
    det = load_detector(random_hub_state_dict(DetectorConfig(), seed=0), DetectorConfig())
    record_model(save_detector(det, home / "models" / "bench-det"), "bench-det", "detector", "benchmark")
    photos.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(synthetic_image(size[0], size[1], 300 + i)).save(photos / f"photo_{i:03d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[2, 8], help="folder sizes to index")
    parser.add_argument("--batch-size", type=int, default=8, help="`ldot index --batch-size` (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="`ldot index --workers` (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="600x800", help="HxW of the synthetic photos")
    parser.add_argument("--speed", action="store_true", help="instead: detector seconds per image, now against "
                        "the whole batch per stage (before), interleaved (uses --images' first value, --rounds)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setup", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    if args.setup:
        setup(Path(args.setup[0]), Path(args.setup[1]), max(args.images), (h, w))
        return
    if args.speed:
        speed(args.images[0], args.rounds, args.threads)
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.batch_size, args.workers, args.threads)))
        return
    with tempfile.TemporaryDirectory(prefix="ldot-memory-") as tmp:
        home, photos = Path(tmp) / "home", Path(tmp) / "photos"
        env = {**os.environ, "LDOT_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run([sys.executable, __file__, "--setup", str(home), str(photos), "--images",
                        *map(str, args.images), "--size", args.size], check=True, env=env)
        all_photos = sorted(photos.iterdir())
        results = {}
        for n in args.images:
            folder = Path(tmp) / f"photos_{n}"
            folder.mkdir()
            for src in all_photos[:n]:
                os.link(src, folder / src.name)
            cmd = [sys.executable, __file__, "--measure", str(folder), "--batch-size", str(args.batch_size),
                   "--workers", str(args.workers), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
            results[n] = json.loads(out.strip().splitlines()[-1])
    print(f"`ldot index` peak resident memory per stage (GB = 1e9 bytes), {h}x{w} JPEGs, full-size random weights, "
          f"CPU, {args.threads} threads, batch {args.batch_size}, {args.workers} decode workers")
    stages: list[str] = []
    for r in results.values():
        stages += [s for s in r["peaks"] if s not in stages]
    head = "".join(f"{f'{n} images':>12s}" for n in results)
    print(f"{'stage':40s}{head}")
    for stage in stages:
        print(f"{stage:40s}" + "".join(f"{r['peaks'].get(stage, 0) / 1e9:12.2f}" for r in results.values()))
    print(f"{'peak of the indexing process':40s}" + "".join(f"{max(r['peaks'].values()) / 1e9:12.2f}"
                                                           for r in results.values()))
    print(f"{'decode workers (sum, sampled)':40s}" + "".join(f"{r['workers_peak'] / 1e9:12.2f}"
                                                            for r in results.values()))
    print(f"{'seconds per image (whole run)':40s}" + "".join(f"{r['elapsed_s'] / max(r['encoded'], 1):12.1f}"
                                                            for r in results.values()))
    det = [k for k in stages if k.startswith("detector:")]
    print(f"{'detector seconds per image':40s}" + "".join(
        f"{sum(r['seconds'].get(k, 0) for k in det) / max(r['encoded'], 1):12.1f}" for r in results.values()))
    if not all(r["hwm_reset"] for r in results.values()):
        print("note: /proc/self/clear_refs is not writable here: each stage shows the peak so far, not its own")


if __name__ == "__main__":
    main()
