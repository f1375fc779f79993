"""Download figures, against a 127.0.0.1 server (no network here):

1. Does huggingface_hub resume an interrupted download? Within one call (a transfer cut mid-way) and across runs
   (the call fails, the next run starts): the Range header of the next request, and whether a partial file is
   left in the cache. The same for ldot's downloader.
2. Per-image fetching (COCO test): files/s of `download_many` on small files with 1 and 8 workers, and the time
   of the COCO 5K test fetch at 10 and 100 MB/s, ESTIMATED from the sizes (0.8 GB of images + 1.07 MB of
   captions, per the data-sources sheet) and a per-request latency.

    PYTHONPATH=. python benchmarks/downloads.py [--images 400] [--latency-ms 80]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def hub_resume(tmp: Path) -> None:
    from huggingface_hub import constants, hf_hub_download
    from ldot_testing import ServedFile, http_server, hub_repo_files

    constants.HF_HUB_OFFLINE = False
    os.environ.pop("HF_HUB_OFFLINE", None)
    data = os.urandom(20 << 20)
    sha = hashlib.sha256(data).hexdigest()
    files = hub_repo_files("org/m", {"model.safetensors": data}, lfs=("model.safetensors",))
    cdn = f"/cdn/{sha}"
    with http_server(files) as srv:
        # (a) one call, the transfer cut after 8 MB each time
        srv.files[cdn] = ServedFile(data, cut_after=8 << 20)
        cache = tmp / "hf1"
        try:
            hf_hub_download("org/m", "model.safetensors", cache_dir=str(cache), endpoint=srv.url)
            ok = "completed"
        except Exception as exc:  # noqa: BLE001 - a figure, whatever it raises
            ok = f"failed ({type(exc).__name__})"
        ranges = [r for p, r in srv.requests if p == cdn]
        print(f"huggingface_hub {__import__('huggingface_hub').__version__}, one call, transfer cut every 8 MB: {ok}; "
              f"requests' Range headers: {ranges}")
        # (b) across runs: the first run dies after 8 MB (then the CDN answers 503), the second run is healthy
        srv.requests.clear()
        srv.files[cdn] = ServedFile(data, cut_after=8 << 20, fail_first=0)
        cache = tmp / "hf2"

        def break_after_first(served: ServedFile) -> None:
            served.fail_first = 100

        try:
            import threading

            timer = threading.Timer(0.5, break_after_first, args=(srv.files[cdn],))
            timer.start()
            hf_hub_download("org/m", "model.safetensors", cache_dir=str(cache), endpoint=srv.url)
        except Exception:  # noqa: BLE001
            pass
        left = [p.name for p in cache.rglob("*") if p.is_file() and "incomplete" in p.name]
        srv.files[cdn] = ServedFile(data)
        srv.requests.clear()
        hf_hub_download("org/m", "model.safetensors", cache_dir=str(cache), endpoint=srv.url)
        first = next(r for p, r in srv.requests if p == cdn)
        print(f"huggingface_hub across runs: partial files left after the failed run: {left or 'none'}; "
              f"the next run's first Range header: {first} ({'resumed' if first else 'started over'})")
        # ldot's downloader, same scenario
        from models.core.download import download_file

        srv.requests.clear()
        srv.files[cdn] = ServedFile(data, cut_after=8 << 20)
        dest = tmp / "ldot" / "blob"
        try:
            download_file([srv.url + cdn], dest, sha256=sha, retries=0)
        except Exception:  # noqa: BLE001
            pass
        kept = (dest.parent / "blob.part").stat().st_size
        srv.files[cdn] = ServedFile(data)
        srv.requests.clear()
        download_file([srv.url + cdn], dest, sha256=sha, retries=0)
        print(f"ldot across runs: {kept:,} bytes kept in blob.part; the next run's Range header: {srv.requests[0][1]}")


def per_image(tmp: Path, n: int, latency_ms: float) -> None:
    from ldot_testing import ServedFile, http_server

    from models.core.download import Job, download_many

    size = 160_000  # a COCO val2014 JPEG is ~160 kB on average (0.8 GB / 5,000)
    files = {f"/img/{i}.jpg": ServedFile(os.urandom(size), delay=latency_ms / 1000) for i in range(n)}
    with http_server(files) as srv:
        for workers in (1, 8):
            out = tmp / f"w{workers}"
            jobs = [Job((f"{srv.url}/img/{i}.jpg",), out / f"{i}.jpg") for i in range(n)]
            start = time.perf_counter()
            result = download_many(jobs, workers=workers)
            seconds = time.perf_counter() - start
            assert not result.failures
            print(f"download_many, {n} files of {size // 1000} kB, {latency_ms:.0f} ms server latency, {workers} "
                  f"worker(s): {n / seconds:.1f} files/s ({n * size / seconds / 1e6:.1f} MB/s)")
            if workers == 8:
                rate8 = n / seconds
    total = 800e6 + 1.07e6
    for mbps in (10, 100):
        bandwidth_s = total / (mbps * 1e6)
        request_s = 5000 / rate8
        print(f"COCO 5K test at {mbps} MB/s (ESTIMATE from sizes): {bandwidth_s:.0f} s for the bytes; the 5,000 "
              f"requests at the rate measured above take >= {request_s:.0f} s; so about "
              f"{max(bandwidth_s, request_s):.0f} s ({max(bandwidth_s, request_s) / 60:.1f} min)")


def main() -> None:
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.CRITICAL)  # its retry chatter
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--latency-ms", type=float, default=80.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hub_resume(Path(tmp))
        per_image(Path(tmp), args.images, args.latency_ms)


if __name__ == "__main__":
    main()
