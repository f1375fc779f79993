"""Public datasets fetched from a 127.0.0.1 copy of their hosts: resumed, verified, extracted safely, checked on
the data; `ldot data` and `ldot eval` with no --data."""

from __future__ import annotations

import io
import json
import stat
import zipfile

import pytest
from datasets_fixtures import (
    COCO_IDS,
    FLICKR_IDS,
    flickr_zip,
    miniature,
    point_catalogue_at,
)
from ldot_testing import ServedFile, closed_port_url, http_server
from typer.testing import CliRunner

from ldot_cli.data import datasets
from ldot_cli.data.errors import DatasetError
from ldot_cli.data.retrieval_sets import locate
from ldot_cli.main import app
from models.core.errors import DownloadError, LdotWarning

runner = CliRunner()
FAST = dict(retries=0, backoff=0.01, timeout=5)


@pytest.fixture
def in_process_extraction(monkeypatch):
    """Feature extraction without decode worker processes (their start-up is most of a tiny run's time)."""
    from ldot_cli.data import features

    extract = features._extract
    monkeypatch.setattr(features, "_extract", lambda paths, keys, out, det, progress, workers:
                        extract(paths, keys, out, det, progress, 0))


@pytest.fixture
def mini(monkeypatch):
    m = miniature()
    with http_server(m.files) as srv:
        point_catalogue_at(monkeypatch, srv.url)
        srv.mini = m
        yield srv


def _path(srv, suffix: str) -> str:
    return next(p for p in srv.files if p.endswith(suffix))


def test_flickr_test_split_is_fetched_assembled_and_checked(mini, ldot_home):
    events = []
    folder = datasets.fetch("flickr30k", "test", progress=events.append)
    assert folder == ldot_home / "datasets" / "flickr30k"
    assert sorted(p.name for p in (folder / "flickr30k-images").iterdir()) == sorted(f"{i}.jpg" for i in FLICKR_IDS)
    marker = json.loads((folder / "ldot-data-test.json").read_text())
    assert marker["complete"] and marker["images"] == 4 and marker["captions"] == 20
    rset = locate("flickr30k", datasets.eval_paths("flickr30k"))
    assert [im.file for im in rset.images] == [f"{i}.jpg" for i in FLICKR_IDS] and len(rset.captions) == 20
    assert rset.captions[0].text == "a dog on the beach 0"
    byte_events = [e for e in events if e.unit == "bytes"]
    assert byte_events and {e.stage for e in byte_events} == {"flickr30k test"}  # one bar for the whole fetch
    assert byte_events[-1].done == sum(len(mini.files[_path(mini, n)].data) for n in (".zip", ".csv"))
    n = len(mini.requests)
    datasets.fetch("flickr30k", "test")
    assert len(mini.requests) == n  # present: nothing fetched again
    assert datasets.verify() == {"flickr30k/test": []}
    (folder / "downloads" / "test_1k_flickr.csv").write_bytes(b"tampered")
    assert datasets.verify(["flickr30k"]) == {"flickr30k/test": ["downloads/test_1k_flickr.csv: 8 bytes, expected "
                                                                f"{len(mini.files[_path(mini, '.csv')].data)}"]}


def test_an_interrupted_fetch_is_not_complete_and_the_next_run_resumes(mini, ldot_home):
    zip_path = _path(mini, ".zip")
    whole = mini.files[zip_path]
    mini.files[zip_path] = ServedFile(whole.data, cut_after=len(whole.data) // 2)
    with pytest.raises(DatasetError, match="run the same command again to resume"):
        datasets.fetch("flickr30k", "test", **FAST)
    assert not datasets.is_fetched("flickr30k", "test")
    assert not (ldot_home / "datasets" / "flickr30k" / "dataset_flickr30k.json").exists()
    listed = runner.invoke(app, ["data", "list"], env={"COLUMNS": "250"})
    assert "partial" in listed.output
    mini.files[zip_path] = whole
    n = len(mini.requests)
    datasets.fetch("flickr30k", "test", **FAST)
    assert (zip_path, f"bytes={len(whole.data) // 2}-") in mini.requests[n:]
    assert datasets.is_fetched("flickr30k", "test")


def test_a_changed_file_fails_the_recorded_hash(mini, ldot_home):
    datasets.fetch("flickr30k", "test", **FAST)
    datasets.remove("flickr30k")
    zip_path = _path(mini, ".zip")
    mini.files[zip_path] = ServedFile(flickr_zip(FLICKR_IDS[::-1]))  # other bytes than the first verified fetch
    with pytest.raises(DownloadError, match="sha256"):
        datasets.fetch("flickr30k", "test", **FAST)
    assert not datasets.is_fetched("flickr30k", "test")
    assert not (ldot_home / "datasets" / "flickr30k" / "downloads" / "images_flickr_1k_test.zip").exists()


def _symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("images_flickr_1k_test/link.jpg")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize("payload, why", [
    (flickr_zip(FLICKR_IDS, {"../../evil.jpg": b"x"}), "a path outside the folder"),
    (flickr_zip(FLICKR_IDS, {"/abs/evil.jpg": b"x"}), "a path outside the folder"),
    (_symlink_zip(), "a symbolic link"),
])
def test_unsafe_zips_are_refused_whole(mini, ldot_home, payload, why):
    mini.files[_path(mini, ".zip")] = ServedFile(payload)
    with pytest.raises(DatasetError, match=why):
        datasets.fetch("flickr30k", "test", **FAST)
    folder = ldot_home / "datasets" / "flickr30k"
    assert not (folder / "flickr30k-images").exists() and not datasets.is_fetched("flickr30k", "test")
    assert not list(ldot_home.rglob("evil.jpg")) and not list(ldot_home.rglob("link.jpg"))


def test_a_zip_bomb_is_refused(tmp_path):
    from ldot_cli.data.archive import safe_extract

    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.jpg", b"\0" * (8 << 20))
    with pytest.raises(DatasetError, match="zip bomb"):
        safe_extract(path, tmp_path / "out")
    with pytest.raises(DatasetError, match="limit"):
        safe_extract(path, tmp_path / "out", max_entry_bytes=1 << 20)
    assert not (tmp_path / "out").exists()


def test_coco_test_images_come_one_by_one_from_a_mirror_when_the_first_host_is_down(monkeypatch, ldot_home):
    m = miniature()
    first = f"/coco/val2014/COCO_val2014_{COCO_IDS[0]:012d}.jpg"
    m.files[first] = ServedFile(m.files[first].data, fail_first=1)  # flaky: retried
    with http_server(m.files) as srv:
        point_catalogue_at(monkeypatch, srv.url, coco_hosts=(closed_port_url() + "/", srv.url + "/coco/"))
        datasets.fetch("coco", "test", workers=3, retries=2, backoff=0.01, timeout=5)
    folder = ldot_home / "datasets" / "coco"
    for cid in COCO_IDS:
        assert (folder / "val2014" / f"COCO_val2014_{cid:012d}.jpg").read_bytes() == m.coco_images[cid]
    rset = locate("coco", datasets.eval_paths("coco"))
    assert len(rset.images) == 5 and len(rset.captions) == 28
    marker = json.loads((folder / "ldot-data-test.json").read_text())
    assert len([k for k in marker["files"] if k.startswith("val2014/")]) == 5
    status = {s.entry.key: s for s in datasets.status()}  # the test parquet is the train split's too: not "partial"
    assert status["coco/test"].present and not status["coco/train"].present and status["coco/train"].partial_bytes == 0


def test_coco_counts_are_checked_on_the_data(mini, monkeypatch):
    import dataclasses

    from ldot_cli.data import catalogue

    splits = tuple(dataclasses.replace(s, captions=25010) if s.key == "coco/test" else s for s in catalogue.SPLITS)
    monkeypatch.setattr(catalogue, "SPLITS", splits)
    with pytest.raises(DatasetError, match="has 5 images and 28 captions, expected 5 images and 25,010 captions"):
        datasets.fetch("coco", "test", **FAST)
    assert not datasets.is_fetched("coco", "test")


def test_a_bad_image_response_is_deleted_and_the_rest_kept(mini, ldot_home):
    bad = f"/coco/val2014/COCO_val2014_{COCO_IDS[2]:012d}.jpg"
    good = mini.files[bad]
    mini.files[bad] = ServedFile(b"<html>rate limited</html>")
    with pytest.raises(DatasetError, match="not JPEG/PNG"):
        datasets.fetch("coco", "test", **FAST)
    assert not datasets.is_fetched("coco", "test")
    mini.files[bad] = good
    n = len(mini.requests)
    datasets.fetch("coco", "test", **FAST)
    assert [p for p, _ in mini.requests[n:] if p.startswith("/coco/")] == [bad]  # only the bad one again


def test_offline_says_the_url_the_mirror_and_the_manual_steps(monkeypatch, ldot_home):
    down = closed_port_url()
    point_catalogue_at(monkeypatch, down)
    from ldot_cli.data import catalogue

    entry = catalogue.find_split("flickr30k", "test")
    mirrored = (catalogue.DataFile(entry.files[0].name, (entry.files[0].urls[0], down + "/mirror/x.zip"),
                                   approx=1, extract_to="flickr30k-images"), *entry.files[1:])
    import dataclasses

    splits = tuple(dataclasses.replace(s, files=mirrored) if s.key == "flickr30k/test" else s for s in catalogue.SPLITS)
    monkeypatch.setattr(catalogue, "SPLITS", splits)
    result = runner.invoke(app, ["data", "get", "flickr30k", "--yes"])
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: could not fetch images_flickr_1k_test.zip")
    zip_url = f"{down}/datasets/nlphuji/flickr_1k_test_image_text_retrieval/resolve/"
    assert f"tried {zip_url}" in line and "connection refused" in line
    assert f"then the mirror {down}/mirror/x.zip (connection refused)" in line
    dest = ldot_home / "datasets" / "flickr30k" / "downloads" / "images_flickr_1k_test.zip"
    assert f"download {zip_url}" in line and f" as {dest};" in line  # which file goes where
    assert f"test_1k_flickr.csv as {dest.parent / 'test_1k_flickr.csv'}" in line
    assert "then the fallback " in line and "wds_flickr30k" in line and "ldot data get flickr30k --split test" in line


def test_the_webdataset_copy_is_the_fallback_for_the_flickr_test(monkeypatch, ldot_home):
    from datasets_fixtures import wds_flickr

    with http_server(wds_flickr()) as srv:  # the nlphuji files are gone (404): only the CLIP_benchmark shards
        point_catalogue_at(monkeypatch, srv.url)
        with pytest.warns(LdotWarning, match="images_flickr_1k_test.zip .*HTTP 404.* trying the fallback"):
            datasets.fetch("flickr30k", "test", **FAST)
    marker = json.loads((ldot_home / "datasets" / "flickr30k" / "ldot-data-test.json").read_text())
    assert marker["source"] == "wds" and marker["images"] == 4 and marker["captions"] == 20
    rset = locate("flickr30k", datasets.eval_paths("flickr30k"))
    assert [im.file for im in rset.images] == [f"s{i:07d}.jpg" for i in range(4)]
    assert rset.captions[5].text == "two people sitting on a bench 0"  # image 1's first caption
    assert datasets.verify() == {"flickr30k/test": []}


def test_nlphujis_zip_is_the_fallback_for_the_coco_test(monkeypatch, ldot_home):
    from datasets_fixtures import coco_5k_files

    with http_server(coco_5k_files()) as srv:  # the parquet is gone (404), and so are the per-image requests
        point_catalogue_at(monkeypatch, srv.url)
        with pytest.warns(LdotWarning, match="test-00000-of-00001.parquet .*HTTP 404.* trying the fallback"):
            datasets.fetch("coco", "test", **FAST)
        assert not [p for p, _ in srv.requests if p.startswith("/coco/")]
    marker = json.loads((ldot_home / "datasets" / "coco" / "ldot-data-test.json").read_text())
    assert marker["source"] == "nlphuji-5k" and marker["images"] == 5 and marker["captions"] == 28
    rset = locate("coco", datasets.eval_paths("coco"))
    assert [im.file for im in rset.images] == [f"val2014/COCO_val2014_{c:012d}.jpg" for c in COCO_IDS]
    assert datasets.verify(["coco"]) == {"coco/test": []}


def test_a_webdataset_shard_with_a_link_is_refused(tmp_path):
    import tarfile

    from datasets_fixtures import wds_shard

    from ldot_cli.data.datasets import read_wds

    path = tmp_path / "0.tar"
    path.write_bytes(wds_shard([("s1", b"\xff\xd8\xff", ["a"])]))
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo("s2.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DatasetError, match="link or device"):
        read_wds(path, tmp_path / "out")
    path.write_bytes(wds_shard([], extra={"../evil.jpg": b"x"}))
    with pytest.raises(DatasetError, match="outside the folder"):
        read_wds(path, tmp_path / "out2")
    assert not (tmp_path / "evil.jpg").exists()


def test_files_put_in_place_by_hand_are_used_offline(monkeypatch, ldot_home):
    m = miniature()
    folder = ldot_home / "datasets" / "flickr30k" / "downloads"
    folder.mkdir(parents=True)
    for path, served in m.files.items():
        if "flickr_1k" in path:
            (folder / path.rsplit("/", 1)[1]).write_bytes(served.data)
    point_catalogue_at(monkeypatch, closed_port_url())
    datasets.fetch("flickr30k", "test", **FAST)
    assert datasets.is_fetched("flickr30k", "test")


def test_multi30k_checks_its_images_against_the_karpathy_test(monkeypatch, ldot_home):
    m = miniature()
    with http_server(m.files) as srv:
        point_catalogue_at(monkeypatch, srv.url)
        datasets.fetch("multi30k", "test", lang="de", **FAST)  # fetches the Flickr30k test images first
        assert datasets.is_fetched("flickr30k", "test") and datasets.is_fetched("multi30k", "test", "de")
        marker = json.loads((ldot_home / "datasets" / "multi30k" / "ldot-data-test-de.json").read_text())
        assert marker["same_images_as_karpathy_test"] is True
        rset = locate("multi30k", datasets.eval_paths("multi30k", "de"), lang="de")
        assert len(rset.images) == 4 and rset.captions[0].text == "ein Hund 0"
    other = miniature(multi30k_ids=FLICKR_IDS[:3] + ["999.jpg"[:-4]])
    datasets.remove("multi30k")
    (ldot_home / "known_hashes.json").unlink()  # else the changed list fails the hash its first fetch recorded
    with http_server(other.files) as srv:
        point_catalogue_at(monkeypatch, srv.url)
        with pytest.warns(LdotWarning, match="not the Karpathy Flickr30k test images: 1 only in Multi30K"):
            with pytest.raises(DatasetError, match="missing"):
                datasets.fetch("multi30k", "test", lang="de", **FAST)


def test_eval_refuses_a_missing_model_before_fetching_anything(mini, ldot_home):
    result = runner.invoke(app, ["eval", "coco", "--yes"])
    assert result.exit_code == 2 and "ldot models download coco-ft" in result.output
    result = runner.invoke(app, ["eval", "multi30k", "--yes"])
    assert result.exit_code == 2 and "pass --model" in result.output
    assert mini.requests == [] and not (ldot_home / "datasets").exists()


def test_cli_asks_before_a_large_download_and_says_size_terms_and_place(mini, ldot_home):
    result = runner.invoke(app, ["data", "get", "flickr30k"])
    assert result.exit_code == 2 and "add --yes" in result.output
    assert "non-commercial research and education" in result.output and "142.1 MB" in result.output
    assert not datasets.is_fetched("flickr30k", "test")
    result = runner.invoke(app, ["data", "get", "flickr30k"], input="y\n")  # CliRunner's stdin is no tty
    assert result.exit_code == 2
    result = runner.invoke(app, ["data", "get", "flickr30k", "--yes"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert str(ldot_home / "datasets" / "flickr30k") in " ".join(result.output.split())
    listed = runner.invoke(app, ["data", "list", "--json"])
    rows = {(r["dataset"], r["split"]): r for r in json.loads(listed.stdout)}
    assert rows[("flickr30k", "test")]["present"] == "yes" and rows[("coco", "test")]["present"] == "no"
    assert rows[("flickr30k", "test")]["folder"] == str(ldot_home / "datasets" / "flickr30k")
    assert "non-commercial research" in runner.invoke(app, ["data", "list"], env={"COLUMNS": "80"}).output
    assert runner.invoke(app, ["data", "verify"]).exit_code == 0
    (ldot_home / "datasets" / "flickr30k" / "downloads" / "test_1k_flickr.csv").write_bytes(b"x")
    bad = runner.invoke(app, ["data", "verify", "flickr30k"])
    assert bad.exit_code == 1 and "FAILED" in bad.output
    assert runner.invoke(app, ["data", "rm", "flickr30k", "--yes"]).exit_code == 0
    assert not (ldot_home / "datasets" / "flickr30k").exists()
    assert runner.invoke(app, ["data", "rm", "../x", "--yes"]).exit_code == 2


@pytest.mark.slow
def test_eval_flickr30k_with_no_data_runs_end_to_end(mini, ldot_home, vocab_dir, in_process_extraction):
    """`ldot eval flickr30k --yes` with nothing prepared: fetch, extract (tiny detector), evaluate (tiny model)."""
    from ldot_testing import install_tiny_detector, install_tiny_model

    _, dim = install_tiny_detector("butd-r101-vg")
    install_tiny_model("flickr-ft", vocab_dir, img_dim=dim)
    result = runner.invoke(app, ["eval", "flickr30k", "--json", "--yes", "--device", "cpu", "--cross-sample", "0"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["num_images"] == 4 and rep["num_captions"] == 20
    assert rep["sources"]["captions"] == str(ldot_home / "datasets" / "flickr30k" / "dataset_flickr30k.json")
    assert 0 <= rep["recall"]["text_to_image"]["r1"] <= 100 and rep["recall"]["text_to_image"]["r10"] == 100
    assert list((ldot_home / "features").iterdir())  # features extracted once into the cache
    n = len(mini.requests)
    again = runner.invoke(app, ["eval", "flickr30k", "--json", "--device", "cpu", "--cross-sample", "0"])
    assert again.exit_code == 0 and len(mini.requests) == n  # present: no network, no question
    assert json.loads(again.stdout)["recall"] == rep["recall"]


@pytest.mark.slow
def test_finetune_with_no_data_fetches_the_training_set_and_extracts_its_features(mini, ldot_home,
                                                                                 in_process_extraction):
    """`ldot train finetune --dataset flickr30k --yes` with nothing prepared: fetch, extract (tiny detector), train."""
    import torch
    from ldot_testing import install_tiny_detector, write_tiny_hf_bert

    install_tiny_detector("butd-r101-vg")
    write_tiny_hf_bert(ldot_home / "models" / "bert-base-cased")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = runner.invoke(app, ["train", "finetune", "--dataset", "flickr30k", "--yes", "--out", "mine",
                                     "--epochs", "1", "--batch-size", "4", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert datasets.is_fetched("flickr30k", "train")
    assert "non-commercial research and education" in result.output
    assert (ldot_home / "models" / "mine" / "model.safetensors").is_file()
    karpathy = json.loads((ldot_home / "datasets" / "flickr30k" / "dataset_flickr30k.json").read_text())
    assert sorted(im["split"] for im in karpathy["images"]) == ["train"] * 4 + ["val"] * 2


def _flickr_csv_naming(name: str) -> bytes:
    """The Flickr test CSV with its second row's ``filename`` replaced by ``name`` (hostile network data)."""
    import csv
    import io as _io

    rows = list(csv.reader(_io.StringIO(miniature().files[next(p for p in miniature().files
                                                                 if p.endswith("test_1k_flickr.csv"))].data.decode())))
    rows[2][rows[0].index("filename")] = name
    out = _io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode()


@pytest.mark.parametrize("how", ["absolute", "dotdot", "nested"])
def test_a_captions_file_naming_files_outside_the_dataset_is_refused_and_nothing_is_deleted(mini, ldot_home, tmp_path,
                                                                                           how):
    victim = tmp_path / "outside" / "thesis.txt"
    victim.parent.mkdir()
    victim.write_text("years of work")
    folder = ldot_home / "datasets" / "flickr30k" / "flickr30k-images"
    name = {"absolute": str(victim), "dotdot": "../" * len(folder.parts) + str(victim).lstrip("/"),
            "nested": "sub/1009434119.jpg"}[how]
    mini.files[_path(mini, ".csv")] = ServedFile(_flickr_csv_naming(name))
    with pytest.raises(DatasetError, match="not a plain file name") as caught:
        datasets.fetch("flickr30k", "test", **FAST)
    assert "\n" not in str(caught.value) and "test_1k_flickr.csv" in str(caught.value)
    assert victim.read_text() == "years of work"
    assert not datasets.is_fetched("flickr30k", "test")


def test_a_coco_parquet_naming_files_outside_val2014_writes_nothing_there(mini, ldot_home, tmp_path):
    from datasets_fixtures import coco_parquet

    from ldot_cli.data import catalogue

    evil = "../../../../planted/.bashrc"
    good = coco_parquet(COCO_IDS)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(good)).to_pylist()
    table[1]["filename"] = evil
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(table), buf)
    path = f"/datasets/{catalogue.COCO_KARPATHY_REPO}/resolve/{catalogue.COCO_KARPATHY_REV}/data/" \
           "test-00000-of-00001.parquet"
    mini.files[path] = ServedFile(buf.getvalue())
    mini.files["/coco/val2014/" + evil] = ServedFile(b"\xff\xd8\xff planted")  # served, were it ever asked for
    mini.files["/planted/.bashrc"] = ServedFile(b"\xff\xd8\xff planted")
    with pytest.raises(DatasetError, match="not a plain file name"):
        datasets.fetch("coco", "test", **FAST)
    assert not list(tmp_path.rglob(".bashrc")) and not list(tmp_path.rglob("planted"))
    assert not [p for p, _ in mini.requests if p.startswith("/coco/")]  # refused before any image is asked for


def test_a_multi30k_image_list_naming_files_outside_is_refused(monkeypatch, ldot_home, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    m = miniature()
    gh = next(p for p in m.files if p.endswith("test_2016_flickr.txt"))
    m.files[gh] = ServedFile(("\n".join([f"{i}.jpg" for i in FLICKR_IDS[:3]] + [str(victim)]) + "\n").encode())
    with http_server(m.files) as srv:
        point_catalogue_at(monkeypatch, srv.url)
        with pytest.raises(DatasetError, match="not a plain file name"):
            datasets.fetch("multi30k", "test", lang="de", **FAST)
    assert victim.read_text() == "keep me"


def _overlapping_zip(path) -> None:
    """A zip whose entries share bytes: ``a.jpg`` (stored) holds the local header and data of ``b.jpg``, whose
    central-directory entry points inside it. Python 3.11's zipfile extracts both: the same bytes counted twice
    (repeated, the overlapped-entry zip bomb)."""
    import zlib

    inner = io.BytesIO()
    payload = bytes(range(256)) * 400
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_STORED) as z:
        z.writestr("b.jpg", payload)
    chunk = inner.getvalue()[: zipfile.ZipFile(inner).start_dir]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("a.jpg", chunk)
    with zipfile.ZipFile(path, "a") as z:  # a central-directory entry only: no bytes of its own
        info = zipfile.ZipInfo("b.jpg")
        info.compress_type, info.file_size, info.compress_size = zipfile.ZIP_STORED, len(payload), len(payload)
        info.CRC, info.header_offset = zlib.crc32(payload), z.getinfo("a.jpg").header_offset + 30 + len("a.jpg")
        z.filelist.append(info)
        z._didModify = True


def test_a_zip_with_overlapping_entries_is_refused(tmp_path):
    from ldot_cli.data.archive import safe_extract

    path = tmp_path / "overlap.zip"
    _overlapping_zip(path)
    with zipfile.ZipFile(path) as z:  # the crafted zip is one Python's zipfile reads without complaint
        assert [len(z.read(i)) for i in z.infolist()] and len(z.infolist()) == 2
    with pytest.raises(DatasetError, match="overlap") as caught:
        safe_extract(path, tmp_path / "out")
    assert "\n" not in str(caught.value) and "nothing extracted" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_many_small_highly_compressed_entries_are_refused_by_the_total_ratio(tmp_path):
    from ldot_cli.data.archive import safe_extract

    path = tmp_path / "small-bombs.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:  # each entry under 1 MiB: no ratio check of its own
        for n in range(12):
            z.writestr(f"{n}.jpg", b"\0" * ((1 << 20) - 1))
    assert path.stat().st_size < 100_000
    with pytest.raises(DatasetError, match="zip bomb"):
        safe_extract(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
