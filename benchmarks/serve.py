"""`ldot search` through a running `ldot serve` against a plain `ldot search` process, at 100k images.

    python benchmarks/serve.py                  # 100,000 images
    python benchmarks/serve.py --size 20000     # quicker

Both are timed the same way: process start to printed results (`--paths`), the median of several runs, on a
synthetic index built through the real store (benchmarks/search.py's clustered vectors and base-size text
tower with random weights: speed does not depend on the weights' values). The outputs are compared too.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

QUERIES = ["a dog on a beach", "two people sitting on a bench in a park", "a red car parked on the street",
           "a child playing with a ball", "snow on the mountains under a blue sky"]


def ldot(*args: str) -> list[str]:
    return [sys.executable, "-c", "from ldot_cli.main import run; run()", *args]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, bytes]:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, env=env, check=True)
    return time.perf_counter() - start, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="ldot-bench-serve-"))
    os.environ["LDOT_HOME"] = str(home)
    from search import base_text_encoder, clustered, fake_index  # benchmarks/search.py

    print(f"machine: {os.cpu_count()} CPUs visible, {args.threads} threads; LDOT_HOME={home}")
    base_text_encoder(home)
    name = f"n{args.size}"
    start = time.perf_counter()
    fake_index(name, clustered(args.size, 768, clusters=max(100, args.size // 1000), seed=1))
    print(f"[{args.size:,} images] synthetic index built in {time.perf_counter() - start:.1f} s")

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "LDOT_NO_PROGRESS": "1"}
    plain_env = {**env, "LDOT_NO_SERVER": "1"}
    plain, plain_out = [], {}
    for i in range(args.runs):
        query = QUERIES[i % len(QUERIES)]
        seconds, stdout = timed(ldot("search", query, "--name", name, "--paths"), plain_env)
        plain.append(seconds)
        plain_out[query] = stdout
    print(f"  plain `ldot search` process, start to printed results: median {statistics.median(plain):.2f} s "
          f"(runs: {', '.join(f'{r:.2f}' for r in plain)})")

    start = time.perf_counter()
    server = subprocess.Popen(ldot("serve", "--name", name, "--port", "0"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, text=True)
    try:
        url = server.stdout.readline().strip()
        if not url.startswith("http"):
            raise SystemExit(f"ldot serve did not start: {server.stderr.read()}")
        print(f"  `ldot serve` ready (index and text tower loaded) in {time.perf_counter() - start:.1f} s: {url}")
        through, same = [], True
        for i in range(args.runs):
            query = QUERIES[i % len(QUERIES)]
            seconds, stdout = timed(ldot("search", query, "--name", name, "--paths"), env)
            through.append(seconds)
            same &= stdout == plain_out[query]
        print(f"  `ldot search` through the server, start to printed results: median {statistics.median(through):.2f} s "
              f"(runs: {', '.join(f'{r:.2f}' for r in through)}); same output as the plain process: {same}")
        print(f"  ratio plain / through the server: {statistics.median(plain) / statistics.median(through):.1f}x")
        api = []
        for i in range(20):
            body = json.dumps({"q": QUERIES[i % len(QUERIES)], "k": 10}).encode()
            request = urllib.request.Request(url.rstrip("/") + "/api/search", body,
                                             {"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.loads(response.read())
            api.append(time.perf_counter() - start)
        t = answer["timings"]
        print(f"  one query over HTTP (no process start): median {1000 * statistics.median(api):.0f} ms "
              f"(server side, last query: encode {t['encode_ms']:.0f} ms + search {t['search_ms']:.1f} ms)")
        start = time.perf_counter()
        importing = subprocess.run([sys.executable, "-c", "import ldot_cli.main"], env=env, check=True)
        print(f"  for scale: a Python process importing ldot's CLI and exiting: "
              f"{time.perf_counter() - start:.2f} s (returncode {importing.returncode})")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
