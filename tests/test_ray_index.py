"""`ldot index --ray` on a local Ray cluster this session starts (2 CPUs, 127.0.0.1): the same vectors and
file rows as plain `ldot index`, over a folder and over webdataset tar shards (and the index kept in step
when shards are changed, damaged or gone and a file list shrinks); a worker process killed
mid-run (Ray restarts it and retries its batch: counts exact); a driver killed mid-run (a re-run completes).
Drivers are real `ldot` subprocesses joining the cluster; models are tiny and random."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from ldot_testing import hooked_env, install_tiny_detector, install_tiny_model, make_photos

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one local Ray instance: one worker

HOOK_VARIABLES = ("PYTHONPATH", "LDOT_RAY_PID_DIR", "LDOT_RAY_BATCH_DELAY_S")
ARGS = ["--model", "tiny", "--detector", "tiny-det", "--batch-size", "2", "--workers", "1"]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """One local Ray instance for the session; yields (its address, the folder actors write their pids to)."""
    pids = tmp_path_factory.mktemp("ray-pids")
    # inherited by the worker processes Ray starts (and the drivers): the hooks write each actor's pid to `pids`
    # and keep work in flight long enough to kill a worker mid-run
    hooked = hooked_env(LDOT_RAY_PID_DIR=pids, LDOT_RAY_BATCH_DELAY_S=0.5)
    before = {name: os.environ.get(name) for name in HOOK_VARIABLES}
    os.environ.update({name: hooked[name] for name in HOOK_VARIABLES})
    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 2**20,
                       log_to_driver=False, logging_level="ERROR")
    try:
        yield context.address_info["gcs_address"], pids
    finally:
        ray.shutdown()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def models(vocab_dir):
    _, dim = install_tiny_detector()
    install_tiny_model("tiny", vocab_dir, img_dim=dim)


def ldot(*args: str, check: bool = True, timeout: float = 400) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", "from ldot_cli.main import run; run()", *args],
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from ldot_cli.main import run; run()", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def rows_and_vectors(name: str) -> tuple[dict, dict]:
    """{path: (root, size, mtime, hash, status)} and {content hash: vector} of an index."""
    from ldot_cli.index.layout import index_path
    from ldot_cli.index.store import IndexStore

    with IndexStore(index_path(name)) as store:
        rows = {r.path: (r.root, r.size, r.mtime_ns, r.content_hash, r.status) for r in store.file_rows()}
        ids, vectors = store.vectors()
        hashes = store.content_hashes(ids.tolist())
        return rows, {hashes[i]: v for i, v in zip(ids.tolist(), vectors)}


def same_vectors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:  # shards carry fp16 vectors: equal to fp16 rounding
        assert np.allclose(a[key], b[key], rtol=2e-3, atol=2e-3), key


def merged_shards(name: str) -> int:
    from ldot_cli.index.layout import DB_FILE, index_path

    path = index_path(name) / DB_FILE
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_folder_and_webdataset_shards_match_the_single_machine_path(cluster, models, tmp_path):
    from ldot_cli.index.ray_inputs import tar_bytes

    address, _ = cluster
    photos = tmp_path / "photos"
    files = make_photos(photos, 6, size=(64, 48))
    ldot("index", str(photos), "--name", "single", *ARGS)
    first = ldot("index", str(photos), "--name", "dist", *ARGS, "--ray-address", address, "--ray-shard-size", "4")
    assert "6 encoded" in " ".join(first.stderr.split())
    single_rows, single_vectors = rows_and_vectors("single")
    dist_rows, dist_vectors = rows_and_vectors("dist")
    assert dist_rows == single_rows and len(dist_rows) == 6
    same_vectors(single_vectors, dist_vectors)

    shards = tmp_path / "shards"
    shards.mkdir()
    members = {}  # shard -> {member: bytes}
    for number, group in enumerate((files[:3], files[3:5], files[5:])):
        members[number] = {f"{number:05d}{i:03d}.png": p.read_bytes() for i, p in enumerate(group)}
        (shards / f"{number:05d}.tar").write_bytes(tar_bytes(members[number]))
    listed = tmp_path / "list.txt"  # a file list over the same photos: same contents, so no new vectors
    listed.write_text("".join(f"{p}\n" for p in files[:3]))
    source = str(shards / "{00000..00002}.tar")
    ldot("index", source, str(listed), "--name", "web", *ARGS, "--ray-address", address)
    web_rows, web_vectors = rows_and_vectors("web")
    assert sorted(os.path.basename(p.decode()) for p in web_rows if b"#" in p) == \
        ["00000.tar#00000000.png", "00000.tar#00000001.png", "00000.tar#00000002.png", "00001.tar#00001000.png",
         "00001.tar#00001001.png", "00002.tar#00002000.png"]
    assert sorted(p for p in web_rows if b"#" not in p) == sorted(os.fsencode(p) for p in files[:3])
    assert all(row[4] == "indexed" for row in web_rows.values())
    same_vectors(single_vectors, web_vectors)
    again = ldot("index", source, str(listed), "--name", "web", *ARGS, "--ray-address", address)  # not read again
    assert "0 encoded" in again.stderr and "9 unchanged" in " ".join(again.stderr.split())

    # the source changes: shard 0 loses a member and gains a new photo, shard 1 is damaged, shard 2 is gone,
    # the list loses two entries
    new_photo = make_photos(tmp_path / "new", 1, start=50, size=(64, 48))[0]
    del members[0]["00000002.png"]
    members[0]["00000009.png"] = new_photo.read_bytes()
    (shards / "00000.tar").write_bytes(tar_bytes(members[0]))
    (shards / "00001.tar").write_bytes(b"not a tar file " * 100)
    (shards / "00002.tar").unlink()
    listed.write_text(f"{files[0]}\n")
    third = ldot("index", source, str(listed), "--name", "web", *ARGS, "--ray-address", address)
    text = " ".join(third.stderr.split())
    # found: shard 0's 3 members (2 unchanged by hash, 1 new), shard 1 (failed), the list's 1 entry (unchanged)
    assert "5 images found; 1 encoded, 0 reused (same content), 3 unchanged, 4 removed, 1 skipped;" in text, text
    assert "warning:" in text and "00001.tar could not be read" in text, text  # one line naming the shard
    rows, vectors = rows_and_vectors("web")
    names = sorted(os.path.basename(p.decode()) for p in rows)
    assert names == ["00000.tar#00000000.png", "00000.tar#00000001.png", "00000.tar#00000009.png", "00001.tar",
                     "00001.tar#00001000.png", "00001.tar#00001001.png", os.path.basename(str(files[0]))]
    assert [r[4] for p, r in rows.items() if p.endswith(b"00001.tar")] == ["skipped"]  # its members' rows stay
    assert len(vectors) == 5  # photos 0, 1, 3, 4 and the new one; 2 and 5 were dropped with their last rows
    status = json.loads(ldot("status", "--name", "web", "--json").stdout)
    assert status["indexed"] == 6 and status["skipped"] == 1, status
    assert sorted(f["path"] for f in status["folders"]) == sorted([source, str(listed)])
    assert status["shards"] >= 1 and status["index_type"] == "exact" and status["bytes_per_image"] > 0


def test_a_worker_killed_mid_run_is_restarted_and_counts_stay_exact(cluster, models, tmp_path):
    address, pids = cluster
    photos = tmp_path / "photos"
    make_photos(photos, 16, size=(64, 48))
    for old in pids.iterdir():
        old.unlink()
    driver = spawn("index", str(photos), "--name", "kw", *ARGS, "--ray-address", address, "--ray-shard-size", "2")
    deadline = time.monotonic() + 300
    killed = None
    from ldot_cli.index.layout import index_path

    committed_at_kill = 0
    while time.monotonic() < deadline and driver.poll() is None:
        actors = [p for p in pids.iterdir() if p.name.startswith("actor-")]
        committed = list((index_path("kw") / "shards").glob("*.sha256")) if actors else []
        if actors and (committed or merged_shards("kw")):
            killed = int(actors[0].read_text())
            os.kill(killed, signal.SIGKILL)
            committed_at_kill = len(committed) + merged_shards("kw")
            break
        time.sleep(0.05)
    assert killed is not None and driver.poll() is None, "the run ended before a worker could be killed"
    assert committed_at_kill < 8, "every batch was done before the kill: nothing was in flight"
    _, err = driver.communicate(timeout=400)
    assert driver.returncode == 0, err[-3000:]
    assert len([p for p in pids.iterdir() if p.name.startswith("actor-")]) >= 2  # Ray started a new one
    rows, vectors = rows_and_vectors("kw")
    assert len(rows) == 16 and all(r[4] == "indexed" for r in rows.values()) and len(vectors) == 16


def test_a_driver_killed_mid_run_leaves_an_index_a_rerun_completes(cluster, models, tmp_path):
    address, _ = cluster
    photos = tmp_path / "photos"
    make_photos(photos, 12, size=(64, 48))
    args = ["index", str(photos), "--name", "kd", *ARGS, "--ray-address", address, "--ray-shard-size", "2"]
    paused = tmp_path / "paused"  # the driver stops itself once 2 images are merged: killed at a known point
    driver = spawn(*args, env=hooked_env(LDOT_TEST_PAUSE_AFTER=2, LDOT_TEST_PAUSE_FILE=paused))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None and not paused.exists():
        time.sleep(0.1)
    assert driver.poll() is None and paused.exists(), "the driver did not reach its pause point"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert 1 <= merged_shards("kd") < 6
    rerun = ldot(*args)
    summary = " ".join(rerun.stderr.split())
    assert "12 images found" in summary
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (encoded|reused|unchanged)", summary)}
    assert sum(counts.values()) == 12, summary  # the killed run's merged files are counted once (as unchanged)
    rows, vectors = rows_and_vectors("kd")
    assert len(rows) == 12 and all(r[4] == "indexed" for r in rows.values()) and len(vectors) == 12


def test_a_dual_encoder_index_on_ray_matches_the_single_machine_path(cluster, tmp_path):
    """A model that reads pixels (CLIP): the decoding tasks run its own preprocessing, the actors no detector."""
    from dual_fixtures import install_tiny_dual

    address, _ = cluster
    install_tiny_dual("clip-vit-b32", "clip")
    photos = tmp_path / "photos"
    make_photos(photos, 5, size=(64, 48))
    args = ["--model", "clip-vit-b32", "--workers", "1"]
    ldot("index", str(photos), "--name", "single", *args)
    result = ldot("index", str(photos), "--name", "dist", *args, "--ray-address", address, "--ray-shard-size", "2")
    assert "5 encoded" in " ".join(result.stderr.split())
    single_rows, single_vectors = rows_and_vectors("single")
    dist_rows, dist_vectors = rows_and_vectors("dist")
    assert dist_rows == single_rows and len(dist_rows) == 5
    same_vectors(single_vectors, dist_vectors)
    from ldot_cli.index.layout import index_path
    from ldot_cli.index.store import IndexStore

    with IndexStore(index_path("dist")) as store:
        assert store.meta_rows().get("detector") is None and store.meta_rows().get("regions") == "none"
