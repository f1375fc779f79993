"""What a new user (or an attacker) broke in `ldot index`, each as a class of defect.

Counts that add up, every skipped file its own row, region records collected from the source of truth,
the index's own model, --retry-failed, inputs checked first, a damaged database named, the lock holder
named, and removing an index or a folder."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from fakes import FakeDetector
from ldot_testing import install_tiny_model, make_photos

from ldot_cli.index import encoding
from ldot_cli.index import indexer as indexer_mod
from ldot_cli.index.indexer import Indexer, remove_folder, remove_index
from ldot_cli.index.layout import LOCK_INFO_FILE, REGIONS_DIR, IndexStoreError, index_path
from ldot_cli.index.lock import writer_lock
from ldot_cli.index.options import IndexOptions
from ldot_cli.index.status import describe_index
from ldot_cli.index.store import IndexStore
from models.core.errors import LdotError, LdotWarning


@pytest.fixture
def tiny(vocab_dir):
    install_tiny_model("tiny", vocab_dir)
    return "tiny"


def run_index(folder, name="default", **kw):
    indexer = Indexer(name, IndexOptions(model=kw.pop("model", "tiny"), num_workers=0, batch_size=4), detector=kw.pop("detector", None) or FakeDetector())
    return indexer.run([folder], **kw)


def region_keys(name="default") -> set[str]:
    from feature_extraction.uniter_db import UniterImageDB

    with UniterImageDB(index_path(name) / REGIONS_DIR, "uniter") as db:
        return set(db.keys())


def adds_up(report) -> bool:
    return report.found == report.encoded + report.reused + report.unchanged + report.skipped_total


# -- counts that add up, images not vectors ----------------------------------------------------------
def test_summary_counts_add_up_and_count_images(tmp_path, tiny):
    photos = make_photos(tmp_path / "photos", 4)
    (tmp_path / "photos" / "copy.png").write_bytes(photos[0].read_bytes())  # same bytes, same run
    (tmp_path / "photos" / "bad.png").write_text("not an image")
    first = run_index(tmp_path / "photos")
    assert (first.found, first.encoded, first.reused, first.skipped_total) == (6, 4, 1, 1) and adds_up(first)
    assert (first.images, first.vectors) == (5, 4)  # images, not vectors
    make_photos(tmp_path / "photos", 1, start=10)
    second = run_index(tmp_path / "photos")
    # the earlier skip is a skip, not "unchanged"
    assert (second.found, second.encoded, second.unchanged, second.skipped_before) == (7, 1, 5, 1)
    assert second.skipped == [] and adds_up(second) and second.images == 6


# -- same failing bytes: a row per copy, hashed once -------------------------------------------------
def test_every_failing_copy_gets_its_own_row_and_is_not_hashed_again(tmp_path, tiny, monkeypatch):
    folder = tmp_path / "photos"
    make_photos(folder, 2)
    for i in range(5):
        (folder / f"empty_{i}.jpg").write_bytes(b"")
    for i in range(3):
        (folder / f"junk_{i}.png").write_bytes(b"the same junk bytes")
    report = run_index(folder)
    reasons = {os.path.basename(p): r for p, r in report.skipped}
    assert set(reasons) == {*(f"empty_{i}.jpg" for i in range(5)), *(f"junk_{i}.png" for i in range(3))}
    assert all(reasons.values()) and adds_up(report)
    with IndexStore(index_path("default")) as store:
        assert len(store.file_rows("skipped")) == 8
    hashed = []
    real = encoding.sha256_file
    monkeypatch.setattr(encoding, "sha256_file", lambda p: hashed.append(p) or real(p))
    again = run_index(folder)
    assert hashed == [] and again.skipped_before == 8 and adds_up(again)


# -- region records collected from the source of truth -----------------------------------------------
def test_region_records_left_by_a_killed_run_are_collected_next_time(tmp_path, tiny, monkeypatch):
    photos = make_photos(tmp_path / "photos", 4)
    run_index(tmp_path / "photos")
    assert len(region_keys()) == 4
    photos[0].unlink()

    def killed(*args, **kwargs):  # as a kill -9 after SQLite dropped the vector, before LMDB did
        raise KeyboardInterrupt

    collect = indexer_mod.collect_regions
    monkeypatch.setattr(indexer_mod, "collect_regions", killed)
    with pytest.raises(KeyboardInterrupt):
        run_index(tmp_path / "photos")
    with IndexStore(index_path("default")) as store:
        live = store.content_hash_set()
    assert len(live) == 3 and len(region_keys()) == 4  # an orphan record no vector references
    monkeypatch.setattr(indexer_mod, "collect_regions", collect)
    report = run_index(tmp_path / "photos")
    assert report.encoded == 0 and region_keys() == live


# -- the index's own model and detector ---------------------------------------------------------------
def test_reindexing_uses_the_models_the_index_was_built_with(tmp_path, vocab_dir):
    install_tiny_model("mine", vocab_dir, seed=3)
    make_photos(tmp_path / "photos", 2)
    run_index(tmp_path / "photos", model="mine")
    plain = Indexer("default")  # no --model, no --detector
    assert plain.choices() == ("mine", "FakeDetector", "uniter")
    assert plain.needed_models() == ["FakeDetector", "mine"]  # never the defaults (which would be downloaded)
    again = Indexer("default", IndexOptions(num_workers=0), detector=FakeDetector()).run([tmp_path / "photos"])
    assert again.unchanged == 2
    with IndexStore(index_path("default")) as store:
        assert store.meta_rows().get("model") == "mine"


# -- inputs checked first -----------------------------------------------------------------------------
def test_a_missing_or_empty_folder_fails_before_anything_is_created(tmp_path, tiny):
    with pytest.raises(LdotError, match="no_such_dir does not exist"):
        Indexer("default", IndexOptions(model="tiny")).scan([tmp_path / "no_such_dir"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LdotError, match="no images found under"):
        run_index(tmp_path / "empty")
    assert not index_path("default").exists()
    make_photos(tmp_path / "photos", 1)
    run_index(tmp_path / "photos")
    with pytest.warns(LdotWarning, match="no images found under"):  # an existing index: said, and run
        run_index(tmp_path / "empty")


def test_cli_checks_the_folder_before_downloading(tmp_path):
    from typer.testing import CliRunner

    from ldot_cli.main import app

    result = CliRunner().invoke(app, ["index", str(tmp_path / "no_such_dir")])  # fresh cache: defaults absent
    assert result.exit_code == 2 and "does not exist" in result.output and "download" not in result.output.lower()
    assert not index_path("default").exists()


# -- --retry-failed -----------------------------------------------------------------------------------
def test_retry_failed_tries_unchanged_skipped_files_again(tmp_path, tiny):
    folder = tmp_path / "photos"
    good = make_photos(tmp_path / "src", 1)[0].read_bytes()
    make_photos(folder, 1)
    bad = folder / "later.png"
    bad.write_bytes(b"\0" * (len(good) + 16))
    stamp = os.stat(bad)
    assert len(run_index(folder).skipped) == 1
    bad.write_bytes(good + b"\0" * 16)  # fixed in place: same size, same mtime (PNG ignores trailing bytes)
    os.utime(bad, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert run_index(folder).skipped_before == 1  # unchanged: not tried again ...
    retried = run_index(folder, retry_failed=True)  # ... unless asked
    assert (retried.encoded, retried.skipped_total, retried.images) == (1, 0, 2)


# -- a damaged database -------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [0, 16, 18, 21, 47])
def test_damaged_database_header_names_the_file_and_the_rebuild(tmp_path, tiny, offset):
    make_photos(tmp_path / "photos", 2)
    run_index(tmp_path / "photos")
    path = index_path("default") / "index.sqlite"
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexStoreError) as caught:
        IndexStore(index_path("default"))
    assert str(path) in str(caught.value) and "--reindex" in str(caught.value)
    report = run_index(tmp_path / "photos", reindex=True)  # the way out works
    assert report.encoded == 2


@pytest.mark.parametrize("key", ["format_version", "dim"])
def test_non_numeric_meta_values_are_a_clear_error(tmp_path, tiny, key):
    from ldot_cli.index.search import Searcher

    make_photos(tmp_path / "photos", 1)
    run_index(tmp_path / "photos")
    with sqlite3.connect(index_path("default") / "index.sqlite") as db:
        db.execute("UPDATE meta SET value = 'one' WHERE key = ?", (key,))
    with pytest.raises(IndexStoreError, match=f"{key} 'one' is not a number.*--reindex"):
        Searcher("default").search("a dog", k=1)


def test_non_numeric_vector_file_meta_is_repaired(tmp_path, tiny):
    from ldot_cli.index.search import Searcher

    make_photos(tmp_path / "photos", 2)
    run_index(tmp_path / "photos")
    with sqlite3.connect(index_path("default") / "index.sqlite") as db:
        db.execute("UPDATE meta SET value = 'one' WHERE key = 'faiss_rows'")
    with pytest.warns(LdotWarning, match="rebuilt"):
        assert len(Searcher("default").search("a dog", k=2)) == 2


# -- who holds the lock -------------------------------------------------------------------------------
def test_a_waiting_writer_says_whom_it_waits_for(tmp_path):
    directory = index_path("default")
    directory.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from ldot_cli.index.lock import writer_lock
        with writer_lock(Path({str(directory)!r})):
            time.sleep(1.5)
    """)], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 60
    while not (directory / LOCK_INFO_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.warns(LdotWarning, match=rf"being updated by pid {holder.pid} on .*waiting"):
        with writer_lock(directory):
            assert f'"pid": {os.getpid()}' in (directory / LOCK_INFO_FILE).read_text()  # now it says who we are
    assert holder.wait(timeout=60) == 0
    assert not (directory / LOCK_INFO_FILE).exists()


# -- remove an index, drop a folder, list the folders ------------------------------------------------
def test_remove_a_folder_then_the_index(tmp_path, tiny):
    make_photos(tmp_path / "a", 3)
    b = make_photos(tmp_path / "b", 2, start=10)
    (tmp_path / "b" / "bad.png").write_text("no")
    run_index(tmp_path / "a")
    run_index(tmp_path / "b")
    folders = {f["path"]: (f["indexed"], f["skipped"]) for f in describe_index("default")["folders"]}
    assert folders == {str(tmp_path / "a"): (3, 0), str(tmp_path / "b"): (2, 1)}
    with pytest.raises(IndexStoreError, match="holds no files under"):
        remove_folder("default", tmp_path / "c")
    assert remove_folder("default", tmp_path / "b") == 3
    info = describe_index("default")
    assert [f["path"] for f in info["folders"]] == [str(tmp_path / "a")]
    assert (info["indexed"], info["vectors"], info["skipped"]) == (3, 3, 0)
    assert len(region_keys()) == 3
    with IndexStore(index_path("default")) as store:
        index, _ = store.read_faiss()
        assert index.ntotal == 3
    assert b[0].exists()  # the photos themselves are never touched
    remove_index("default")
    assert not index_path("default").exists()
    with pytest.raises(IndexStoreError, match="no index named"):
        remove_index("default")


def test_index_rm_at_the_command_line(tmp_path, tiny):
    from typer.testing import CliRunner

    from ldot_cli.main import app

    make_photos(tmp_path / "a", 2)
    make_photos(tmp_path / "b", 1, start=5)
    run_index(tmp_path / "a", name="trip")
    run_index(tmp_path / "b", name="trip")
    runner = CliRunner()
    status = runner.invoke(app, ["status", "--name", "trip"], env={"COLUMNS": "300"})
    assert status.exit_code == 0 and str(tmp_path / "a") in status.output and str(tmp_path / "b") in status.output
    dropped = runner.invoke(app, ["index", "rm", "trip", "--folder", str(tmp_path / "b")])
    assert dropped.exit_code == 0, dropped.output
    assert describe_index("trip")["indexed"] == 2
    removed = runner.invoke(app, ["index", "rm", "trip"])
    assert removed.exit_code == 0 and "removed index 'trip'" in removed.output
    assert not index_path("trip").exists()


# -- a damaged region store ---------------------------------------------------------------------------
def _damage_regions(how: str) -> None:
    data = index_path("default") / REGIONS_DIR / "feat_th0.2_max100_min10" / "data.mdb"
    raw = bytearray(data.read_bytes())
    if how == "truncated":
        data.write_bytes(bytes(raw[: len(raw) // 2]))
    elif how == "empty":
        data.write_bytes(b"")
    else:  # every page header past the two meta pages flipped
        page = int.from_bytes(raw[40:44], "little")
        for start in range(2 * page, len(raw), page):
            raw[start:start + 16] = bytes(b ^ 0xFF for b in raw[start:start + 16])
        data.write_bytes(bytes(raw))


RUN_AND_REPORT = textwrap.dedent("""
    import sys
    sys.path[:0] = {paths!r}
    from fakes import FakeDetector
    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions
    from models.core.errors import LdotError
    try:
        Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([{folder!r}])
    except LdotError as exc:
        print(exc)
        sys.exit(2)
""")


@pytest.mark.parametrize("how", [pytest.param("truncated", marks=pytest.mark.slow), "empty", "flipped"])
def test_damaged_region_store_is_named_with_the_way_out(tmp_path, tiny, how):
    make_photos(tmp_path / "photos", 6)
    run_index(tmp_path / "photos")
    _damage_regions(how)
    make_photos(tmp_path / "photos", 1, start=20)
    if how == "truncated":  # in a subprocess: mapping a truncated LMDB file used to kill it with SIGBUS
        code = RUN_AND_REPORT.format(paths=sys.path, folder=str(tmp_path / "photos"))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        message = result.stdout.strip()
    else:
        with pytest.raises(IndexStoreError) as caught:
            run_index(tmp_path / "photos")
        message = str(caught.value)
    assert "data.mdb is damaged" in message and "--reindex" in message and len(message.splitlines()) == 1
    if how == "flipped":
        report = run_index(tmp_path / "photos", reindex=True)
        assert report.encoded == 7 and len(region_keys()) == 7


# -- LMDB map sized from the data --------------------------------------------------------------------
def test_region_store_works_under_a_virtual_memory_limit(tmp_path):
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path[:0] = {sys.path!r}
        import numpy as np
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # as `ulimit -v 3000000`
        from feature_extraction.uniter_db import FeatureStore, UniterImageDBWriter
        record = {{"features": np.ones((10, 8), np.float16), "norm_bb": np.ones((10, 6), np.float16),
                   "conf": np.ones((10, 1), np.float16)}}
        for round in range(2):  # create, then reopen and grow
            with UniterImageDBWriter({str(tmp_path)!r}, "uniter") as writer:
                for i in range(200):
                    writer.put(f"k{{round}}-{{i}}", record)
                writer.commit()
        store = FeatureStore({str(tmp_path)!r})
        print(len(store.db.keys()), store.get("k1-7").features.shape)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["400", "(10,", "8)"]


def test_region_store_map_grows_from_a_small_start(tmp_path, monkeypatch):
    import numpy as np

    from feature_extraction import uniter_db

    monkeypatch.setattr(uniter_db, "MIN_MAP_SIZE", 256 << 10)
    record = {"features": np.ones((100, 2048), np.float16), "norm_bb": np.ones((100, 6), np.float16),
              "conf": np.ones((100, 1), np.float16)}  # 400 kB each: the first commit overflows the map
    with uniter_db.UniterImageDBWriter(tmp_path, "uniter") as writer:
        for i in range(8):
            writer.put(f"k{i}", record)
            writer.commit()
    with uniter_db.UniterImageDB(tmp_path, "uniter") as reader:
        assert len(reader.keys()) == 8 and reader["k5"].features.shape == (100, 2048)


# -- valid JSON of the wrong shape --------------------------------------------------------------------
@pytest.mark.parametrize("manifest", ["[1, 2]", '{"kind": 3}', '{"files": ["model.safetensors"]}',
                                      '{"files": {"model.safetensors": {"sha256": 1}}}', '{"complete": "yes"}'])
def test_a_bad_manifest_is_listed_as_damaged_and_the_others_still_list(tiny, manifest):
    from typer.testing import CliRunner

    from ldot_cli.main import app
    from models.core.home import models_dir
    from models.hub.catalogue import MANIFEST
    from models.hub.installed import is_present, local_models, verify_models

    (models_dir() / "broken").mkdir()
    (models_dir() / "broken" / MANIFEST).write_text(manifest)
    listed = {m.name: m for m in local_models()}
    assert listed["tiny"].complete and listed["tiny"].problem is None
    assert "broken" in listed and listed["broken"].problem and not is_present("broken")
    problems = verify_models()
    assert problems["tiny"] == [] and "re-download" in problems["broken"][0]
    result = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "damaged" in result.output and "tiny" in result.output


HEAD = '{"format": "ldot-model", "format_version": 1, "kind": "bi-encoder"'


@pytest.mark.parametrize("config", ["[]", HEAD + "}",
                                    '{"format": "ldot-model", "format_version": "1", "kind": "bi-encoder", "config": {}}',
                                    HEAD + ', "config": {"text": [1]}}', HEAD + ', "config": {"img_dim": "big"}}',
                                    HEAD + ', "config": {"hidden": 3}}'])
def test_a_model_config_of_the_wrong_shape_is_a_clear_error(tiny, config):
    from models.core.errors import LdotError
    from models.core.home import models_dir
    from models.hub.load import load_bi_encoder

    (models_dir() / "tiny" / "config.json").write_text(config)
    with pytest.raises(LdotError) as caught:
        load_bi_encoder("tiny")
    assert "config.json" in str(caught.value)


def test_detector_and_training_configs_follow_the_one_policy(tmp_path):
    import json

    from feature_extraction.detector.config import DetectorConfig, tiny_config
    from feature_extraction.detector.weights import read_config
    from models.core.errors import ConfigError
    from models.training.loop import TrainConfig, finetune_config

    assert TrainConfig.from_dict(json.loads(json.dumps(finetune_config().to_dict()))) == finetune_config()
    with pytest.raises(ConfigError, match="unknown TrainConfig key.*'lr_typo'"):
        TrainConfig.from_dict({**finetune_config().to_dict(), "lr_typo": 1})
    with pytest.raises(ConfigError, match="'betas'"):
        TrainConfig.from_dict({"betas": "0.9"})
    assert DetectorConfig.from_dict(json.loads(json.dumps(tiny_config().to_dict()))) == tiny_config()
    (tmp_path / "config.json").write_text(json.dumps({"format": "ldot-butd-detector", "format_version": 1,
                                                      "config": {"stage_blocks": 3}}))
    from models.core.errors import LdotError

    with pytest.raises(LdotError, match="stage_blocks"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(LdotError, match="not an"):
        read_config(tmp_path)


# -- damaged weights are refused before use ------------------------------------------------------------
def test_bit_flipped_weights_are_detected_before_use(tiny, monkeypatch):
    from models.core.home import models_dir
    from models.hub import installed
    from models.hub.installed import DamagedModelError
    from models.hub.load import load_bi_encoder

    hashed = []
    real = installed.sha256_file
    monkeypatch.setattr(installed, "sha256_file", lambda p: hashed.append(os.path.basename(p)) or real(p))
    load_bi_encoder("tiny")
    assert hashed == []  # hashed when installed, unchanged since: no re-hash
    weights = models_dir() / "tiny" / "model.safetensors"
    os.utime(weights)  # touched, not changed: hashed once, then remembered
    load_bi_encoder("tiny")
    load_bi_encoder("tiny")
    assert hashed == ["model.safetensors"]
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(raw))
    with pytest.raises(DamagedModelError, match=r"model.safetensors is damaged.*ldot models verify tiny"):
        load_bi_encoder("tiny")
    weights.write_bytes(bytes(raw[:-10]))  # truncated: caught by the size alone
    hashed.clear()
    with pytest.raises(DamagedModelError, match="bytes, .* recorded"):
        load_bi_encoder("tiny")
    assert hashed == []


def test_a_full_disk_in_the_region_store_is_a_storage_error_not_damage(tmp_path, monkeypatch):
    import lmdb
    import numpy as np

    from feature_extraction import uniter_db
    from models.core.errors import StorageError

    record = {"features": np.ones((10, 8), np.float16), "norm_bb": np.ones((10, 6), np.float16),
              "conf": np.ones((10, 1), np.float16)}
    with uniter_db.UniterImageDBWriter(tmp_path, "uniter") as writer:
        writer.put("a", record)

        def full() -> None:
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")

        monkeypatch.setattr(writer, "_write_staged", full)
        with pytest.raises(StorageError, match="run the same command again"):
            writer.commit()
        monkeypatch.undo()
