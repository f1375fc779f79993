"""Where a user waits: `ldot search` from the shell (plain process, background server, fast path against the
full command line), one query over HTTP, and the interactive prompt, all measured in one run.

    python benchmarks/serve.py                  # 100,000 images
    python benchmarks/serve.py --size 20000     # quicker

Process timings are process start to printed results, the median of several runs, on a synthetic index built
through the real store (benchmarks/search.py's clustered vectors and base-size text tower with random weights:
speed does not depend on the weights' values). Outputs are compared too. Each figure is printed with the load
average of the moment: on a shared machine the ratios are the figures, not the absolute times.

Before/after pairs measured in the same run:
- the fast path (`ldot_cli.main.run` answering a plain query before typer loads) against the full command line
  (`ldot_cli.main.app`), both through the same running server;
- the prompt with OpenMP threads that spin (OMP_WAIT_POLICY=ACTIVE: torch's default before ldot set PASSIVE)
  against threads that sleep, and the query encoder in fp32 (the default) against int8 (LDOT_QUERY_PRECISION).
  Its first query waits for the models, which load while it is typed (sent at once here: that wait shows).

Measured (2 shared cores, AVX2, no GPU, load average 9-10, 100,000 images, medians): plain process 20.0 s; first
search, starting the background server, 11.0 s; later searches 0.55 s through the fast path against 1.38 s through
the full command line (same server); the query over HTTP 0.33 s (encode 0.27 + search 0.05); Python's start
0.09 s, + the fast path's imports 0.16 s, + the full command line's 0.54 s; the prompt 2.1 s per query with
spinning threads, 0.41 s with sleeping ones, 0.20 s with LDOT_QUERY_PRECISION=int8.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

QUERIES = ["a dog on a beach", "two people sitting on a bench in a park", "a red car parked on the street",
           "a child playing with a ball", "snow on the mountains under a blue sky"]
FAST = "from ldot_cli.main import run; run()"  # what the `ldot` script runs
FULL = "from ldot_cli.main import app; app()"  # the full command line, without the fast path


def load() -> str:
    with open("/proc/loadavg") as handle:
        return "load " + " ".join(handle.read().split()[:3])


def ldot(*args: str, code: str = FAST) -> list[str]:
    return [sys.executable, "-c", code, *args]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, bytes]:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, env=env, check=True)
    return time.perf_counter() - start, result.stdout


def runs(values: list[float], unit: str = "s") -> str:
    if unit == "ms":
        return f"median {1000 * statistics.median(values):.0f} ms (runs: {', '.join(f'{1000 * v:.0f}' for v in values)})"
    return f"median {statistics.median(values):.2f} s (runs: {', '.join(f'{v:.2f}' for v in values)})"


def prompt_session(env: dict[str, str], name: str, queries: list[str]) -> tuple[float, list[float]]:
    """`ldot search` with no query on a pseudo-terminal: (seconds to the first prompt, seconds per query from
    Enter to the next prompt, the first query included)."""
    import pty
    import select

    leader, follower = pty.openpty()
    start = time.perf_counter()
    proc = subprocess.Popen(ldot("search", "--name", name, "-k", "10"), stdin=follower, stdout=follower,
                            stderr=follower, close_fds=True, env={**env, "COLUMNS": "120", "TERM": "dumb"})
    os.close(follower)
    seen = b""

    def until_prompt(count: int) -> None:
        nonlocal seen
        deadline = time.monotonic() + 600
        while seen.count(b"ldot> ") < count and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    seen += os.read(leader, 65536)
                except OSError:
                    break
        if seen.count(b"ldot> ") < count:
            raise SystemExit(f"the prompt did not answer: {seen[-500:]!r}")

    until_prompt(1)
    ready = time.perf_counter() - start
    per_query = []
    for i, query in enumerate(queries, 2):
        start = time.perf_counter()
        os.write(leader, query.encode() + b"\n")
        until_prompt(i)
        per_query.append(time.perf_counter() - start)
    os.write(leader, b"\n")
    proc.wait(timeout=60)
    os.close(leader)
    return ready, per_query


def installed_python(home: Path) -> str:
    """A Python as a user's install starts it: ldot's modules byte-compiled (pip compiles them when it installs;
    this machine sets PYTHONDONTWRITEBYTECODE, so a checkout never gets its .pyc files) and no editable-install
    finder on the path (this checkout's venv has one, ~20 ms of every start). The fast path needs only the
    standard library and ldot_cli, so a bare venv with the checkout on PYTHONPATH runs it as installed."""
    import compileall

    for package in ("ldot_cli", "models", "feature_extraction"):
        compileall.compile_dir(str(ROOT / package), quiet=1)
    venv = home / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return str(venv / "bin" / "python")


def page_grid(server: dict, queries: list[str], k: int = 20) -> tuple[list[float], list[float], list[float]]:
    """What the page does for a query: POST /api/search as its form sends it (top ``k``, no re-ranking, no
    boxes), then the ``k`` thumbnails, six at a time as a browser fetches them. Returns per query: the search
    round trip, the grid with thumbnails made now (first view) and the grid again (thumbnails cached), in s."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from ldot_cli.serve.client import post

    headers = {"Host": f"127.0.0.1:{server['port']}", "X-Ldot-Token": str(server.get("token") or ""),
               "X-Ldot-Index": str(server.get("index") or "")}

    def thumb(vector_id: int) -> int:
        url = f"http://{server['connect']}:{server['port']}/thumb/{vector_id}"
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as answer:
            return len(answer.read())

    searched, first, again = [], [], []
    with ThreadPoolExecutor(6) as pool:
        for query in queries:
            for out in (first, again):
                start = time.perf_counter()
                answer = post(server, "/api/search", {"q": query, "k": k, "rerank": False, "min_score": None})
                if out is first:
                    searched.append(time.perf_counter() - start)
                sizes = list(pool.map(thumb, [hit["id"] for hit in answer["hits"]]))
                assert len(sizes) == k and all(sizes), sizes
                out.append(time.perf_counter() - start)
    return searched, first, again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-photos", action="store_true", help="rows without image files (no page-grid figure; "
                                                                   "the quicker set-up at 1M images)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="ldot-bench-serve-"))
    os.environ["LDOT_HOME"] = str(home)
    from search import base_text_encoder, clustered, fake_index  # benchmarks/search.py

    print(f"machine: {os.cpu_count()} CPUs visible, {args.threads} threads; LDOT_HOME={home}; {load()}")
    base_text_encoder(home)
    name = f"n{args.size}"
    start = time.perf_counter()
    photos = None if args.no_photos else home / "photos"
    if photos is not None:
        photos.mkdir()
    fake_index(name, clustered(args.size, 768, clusters=max(100, args.size // 1000), seed=1), photos=photos)
    print(f"[{args.size:,} images] synthetic index built in {time.perf_counter() - start:.1f} s")

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "LDOT_NO_PROGRESS": "1",
           "LDOT_AUTO_SERVER": "1", "COLUMNS": "120"}
    plain_env = {**env, "LDOT_NO_SERVER": "1"}
    from ldot_cli.serve.client import find_server, post, stop_server

    try:
        plain, plain_out = [], {}
        for i in range(min(args.runs, 3)):
            query = QUERIES[i % len(QUERIES)]
            seconds, stdout = timed(ldot("search", query, "--name", name, "--paths"), plain_env)
            plain.append(seconds)
            plain_out[query] = stdout
        print(f"  plain `ldot search` process (LDOT_NO_SERVER=1): {runs(plain)}; {load()}")

        seconds, stdout = timed(ldot("search", QUERIES[0], "--name", name, "--paths"), env)
        server = find_server(name)
        print(f"  first `ldot search` with no server: starts one in the background and asks it: {seconds:.2f} s "
              f"(a server now runs: {server is not None}; same output: {stdout == plain_out[QUERIES[0]]}); {load()}")
        if server is None:
            raise SystemExit("no background server came up")

        fast, full, same = [], [], True
        for i in range(args.runs):  # interleaved, so that both see the same load
            query = QUERIES[i % len(QUERIES)]
            seconds, stdout = timed(ldot("search", query, "--name", name, "--paths"), env)
            fast.append(seconds)
            same &= stdout == plain_out.get(query, stdout)
            seconds, stdout = timed(ldot("search", query, "--name", name, "--paths", code=FULL), env)
            full.append(seconds)
            same &= stdout == plain_out.get(query, stdout)
        print(f"  through the server, --paths, fast path (before typer loads): {runs(fast, 'ms')}; {load()}")
        python = installed_python(home)
        installed = [timed([python, "-c", FAST, "search", QUERIES[i % 5], "--name", name, "--paths"], env)[0]
                     for i in range(args.runs)]
        print(f"  the same, as installed (.pyc files, no editable-install finder): {runs(installed, 'ms')}; {load()}")
        print(f"  through the server, --paths, full command line:             {runs(full, 'ms')}; {load()}")
        table = [timed(ldot("search", QUERIES[i % 5], "--name", name), env)[0] for i in range(args.runs)]
        print(f"  through the server, the table (rich), fast path:            {runs(table, 'ms')}; {load()}")
        print(f"  same output as the plain process: {same}; plain / fast path: "
              f"{statistics.median(plain) / statistics.median(fast):.0f}x")

        api, server_side = [], []
        for i in range(20):
            start = time.perf_counter()
            answer = post(server, "/api/search", {"q": QUERIES[i % len(QUERIES)], "k": 10})
            api.append(time.perf_counter() - start)
            server_side.append(answer["timings"])
        enc = statistics.median(t["encode_ms"] for t in server_side)
        found = statistics.median(t["search_ms"] for t in server_side)
        print(f"  one query over HTTP (no process start): median {1000 * statistics.median(api):.0f} ms "
              f"(server side medians: encode {enc:.0f} ms + search {found:.1f} ms); {load()}")

        if photos is not None:
            searched, first, again = page_grid(server, [f"{q} {i}" for i, q in enumerate(QUERIES * 2)])
            print(f"  the page's grid (POST /api/search k=20 as its form sends it, then 20 thumbnails, 6 at a time): "
                  f"search {runs(searched, 'ms')}; grid with thumbnails made now {runs(first, 'ms')}; grid again "
                  f"(thumbnails cached) {runs(again, 'ms')}; {load()}")

        bare = [timed([sys.executable, "-c", "pass"], env)[0] for _ in range(5)]
        bare_installed = [timed([python, "-c", "pass"], env)[0] for _ in range(5)]
        light = [timed([sys.executable, "-c", "import ldot_cli.commands.quick, ldot_cli.serve.client"], env)[0]
                 for _ in range(5)]
        heavy = [timed([sys.executable, "-c", "from ldot_cli.main import app"], env)[0] for _ in range(3)]
        print(f"  for scale, processes that only start: Python {runs(bare, 'ms')} (as installed "
              f"{runs(bare_installed, 'ms')}); + the fast path's imports "
              f"{runs(light, 'ms')}; + the full command line's imports {runs(heavy, 'ms')}; {load()}")
    finally:
        pid = stop_server(name)
        print(f"  (stopped the background server, pid {pid})")

    print("\n  the prompt (`ldot search` with no query, on a pseudo-terminal), 8 queries each:")
    for label, extra in (("threads spin (OMP_WAIT_POLICY=ACTIVE, torch's default, before)", {"OMP_WAIT_POLICY": "ACTIVE"}),
                         ("threads sleep (PASSIVE, ldot's default now)", {}),
                         ("threads sleep, LDOT_QUERY_PRECISION=int8", {"LDOT_QUERY_PRECISION": "int8"})):
        ready, per_query = prompt_session({**plain_env, **extra}, name, [QUERIES[i % 5] for i in range(8)])
        print(f"  {label}: ready in {ready:.2f} s; per query {runs(per_query, 'ms')}; {load()}")


if __name__ == "__main__":
    main()
