"""Downloads from a local 127.0.0.1 server: valid, corrupted, truncated, resumed, offline, trust on first use."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from ldot_testing import (
    ServedFile,
    closed_port_url,
    http_server,
    hub_online,
    hub_repo_files,
    official_finetuned,
)

from models.core.errors import DownloadError
from models.hub import catalogue as registry
from models.hub.catalogue import ModelEntry, RemoteFile
from models.hub.fetch import download_entry, download_file, known_hash
from models.hub.installed import is_present, verify_dir

DATA = os.urandom(3 * (1 << 20) + 12345)  # a bit over 3 chunks
SHA = hashlib.sha256(DATA).hexdigest()


def test_valid_download_is_verified_and_renamed(tmp_path):
    with http_server({"/f.bin": ServedFile(DATA)}) as srv:
        digest = download_file([srv.url + "/f.bin"], tmp_path / "f.bin", sha256=SHA, size=len(DATA))
    assert digest == SHA and (tmp_path / "f.bin").read_bytes() == DATA
    assert not (tmp_path / "f.bin.part").exists()


def test_corrupted_download_leaves_nothing_at_the_final_path(tmp_path):
    bad = bytearray(DATA)
    bad[1000] ^= 0xFF
    with http_server({"/f.bin": ServedFile(bytes(bad))}) as srv:
        with pytest.raises(DownloadError, match="sha256"):
            download_file([srv.url + "/f.bin"], tmp_path / "f.bin", sha256=SHA)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_wrong_size_is_rejected(tmp_path):
    with http_server({"/f.bin": ServedFile(DATA + b"extra")}) as srv:
        with pytest.raises(DownloadError, match="expected"):
            download_file([srv.url + "/f.bin"], tmp_path / "f.bin", size=len(DATA))
    assert not (tmp_path / "f.bin").exists()


def test_truncated_download_keeps_the_part_and_resumes_with_a_range_request(tmp_path):
    cut = len(DATA) // 3
    with http_server({"/f.bin": ServedFile(DATA, cut_after=cut)}) as srv:
        with pytest.raises(DownloadError, match="run the same command again to resume"):
            download_file([srv.url + "/f.bin"], tmp_path / "f.bin", sha256=SHA, retries=0)
        assert not (tmp_path / "f.bin").exists()
        assert (tmp_path / "f.bin.part").stat().st_size == cut
        srv.files["/f.bin"] = ServedFile(DATA)  # the network is back
        download_file([srv.url + "/f.bin"], tmp_path / "f.bin", sha256=SHA)
        assert srv.requests[-1] == ("/f.bin", f"bytes={cut}-")
    assert (tmp_path / "f.bin").read_bytes() == DATA


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(DATA[:5000])
    with http_server({"/f.bin": ServedFile(DATA, ignore_range=True)}) as srv:
        download_file([srv.url + "/f.bin"], tmp_path / "f.bin", sha256=SHA)
    assert (tmp_path / "f.bin").read_bytes() == DATA


def test_second_mirror_is_tried_when_the_first_is_down(tmp_path):
    with http_server({"/f.bin": ServedFile(DATA)}) as srv:
        download_file([closed_port_url() + "/f.bin", srv.url + "/f.bin"], tmp_path / "f.bin", sha256=SHA)
    assert (tmp_path / "f.bin").read_bytes() == DATA


def test_first_verified_download_records_the_hash_and_later_ones_check_it(tmp_path):
    with http_server({"/f.bin": ServedFile(DATA)}) as srv:
        download_file([srv.url + "/f.bin"], tmp_path / "a.bin", hash_key="x/f.bin")
        assert known_hash("x/f.bin") == SHA
        srv.files["/f.bin"] = ServedFile(DATA[:-1] + b"!")  # the mirror now serves other bytes
        with pytest.raises(DownloadError, match="sha256"):
            download_file([srv.url + "/f.bin"], tmp_path / "b.bin", hash_key="x/f.bin")
    assert not (tmp_path / "b.bin").exists()


def _entry(monkeypatch, entry: ModelEntry) -> None:
    monkeypatch.setattr(registry, "REGISTRY", (*registry.REGISTRY, entry))


def test_offline_names_the_urls_and_the_import_command(monkeypatch):
    url = closed_port_url()
    _entry(monkeypatch, ModelEntry("test-ft", "bi-encoder", "t", "MIT",
                                   (RemoteFile("test-ft.pt", (url + "/a/test-ft.pt", url + "/b/test-ft.pt")),),
                                   convert=True))
    with pytest.raises(DownloadError) as info:
        download_entry("test-ft")
    message = str(info.value)
    assert url + "/a/test-ft.pt" in message and url + "/b/test-ft.pt" in message
    assert "connection refused" in message
    assert "ldot models import test-ft.pt --as test-ft" in message
    assert "ldot train finetune" in message and "--model NAME" in message  # as the README says


def test_offline_reranker_names_the_live_alternative(monkeypatch):
    url = closed_port_url()
    _entry(monkeypatch, ModelEntry("test-itm", "uniter-itm", "t", "MIT",
                                   (RemoteFile("test-itm.pt", (url + "/a/test-itm.pt",)),), convert=True))
    with pytest.raises(DownloadError) as info:
        download_entry("test-itm")
    assert "--reranker lxmert-base-uncased" in str(info.value)


def test_official_checkpoint_download_is_converted_once(monkeypatch, tmp_path, tiny_model, ldot_home):
    torch.save(official_finetuned(tiny_model), tmp_path / "x.pt")
    payload = (tmp_path / "x.pt").read_bytes()
    with http_server({"/x.pt": ServedFile(payload)}) as srv:
        _entry(monkeypatch, ModelEntry("test-ft", "bi-encoder", "t", "MIT", (RemoteFile("x.pt", (srv.url + "/x.pt",)),),
                                       convert=True))
        path = download_entry("test-ft")
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "ldot-manifest.json"}
    assert not (ldot_home / "models" / ".downloads" / "test-ft").exists()  # the raw pickle is not kept
    assert verify_dir(path) == []
    assert is_present("test-ft")
    import models

    enc = models.load_bi_encoder("test-ft")
    feat, bb = torch.rand(1, 3, 32), torch.rand(1, 3, 6)
    assert torch.allclose(enc.encode_regions(feat, bb), tiny_model.encode_regions(feat, bb))


def test_hub_entry_downloads_files_skips_missing_optional_ones_and_verify_detects_damage(monkeypatch):
    files = hub_repo_files("org/m", {"config.json": b'{"model_type": "bert"}',
                                     "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n"})
    with http_server(files) as srv:
        hub_online(monkeypatch, srv.url)
        _entry(monkeypatch, ModelEntry("test-bert", "text-encoder", "t", "MIT", registry._hub(
            "org/m", "config.json", "vocab.txt", optional=("tokenizer.json",))))
        path = download_entry("test-bert")
        assert is_present("test-bert")
        assert not (path / "tokenizer.json").exists()
        n = len(srv.requests)
        download_entry("test-bert")  # present files are not fetched again
        assert [r for r in srv.requests[n:] if "tokenizer.json" not in r[0]] == []
    (path / "vocab.txt").write_bytes(b"tampered")
    assert any("vocab.txt" in p for p in verify_dir(path))


def test_a_404_on_a_required_file_is_an_error(monkeypatch):
    with http_server({}) as srv:
        hub_online(monkeypatch, srv.url)
        _entry(monkeypatch, ModelEntry("test-x", "text-encoder", "t", "MIT", registry._hub("org/x", "config.json",
                                                                                              "vocab.txt")))
        with pytest.raises(DownloadError, match="404"):
            download_entry("test-x")
    assert not is_present("test-x")


def test_truncated_transfers_are_resumed_within_the_run_after_a_back_off(tmp_path):
    cut = len(DATA) // 3
    events = []
    with http_server({"/f.bin": ServedFile(DATA, cut_after=cut)}) as srv:
        download_file([srv.url + "/f.bin"], tmp_path / "f.bin", sha256=SHA, retries=4, backoff=0.01,
                      progress=events.append)
        ranges = [r for _, r in srv.requests]
    assert ranges == [None, f"bytes={cut}-", f"bytes={2 * cut}-"]  # 3 cuts make the whole file
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert events[-1].done == len(DATA) and events[-1].total == len(DATA) and events[-1].unit == "bytes"


def test_flaky_server_is_retried_and_a_slow_one_times_out_to_the_next_mirror(tmp_path):
    with http_server({"/f.bin": ServedFile(DATA, fail_first=2), "/slow.bin": ServedFile(DATA, delay=3)}) as srv:
        download_file([srv.url + "/f.bin"], tmp_path / "a.bin", sha256=SHA, retries=2, backoff=0.01)
        assert [p for p, _ in srv.requests].count("/f.bin") == 3
        download_file([srv.url + "/slow.bin", srv.url + "/f.bin"], tmp_path / "b.bin", sha256=SHA, retries=0,
                      timeout=0.5)
    assert (tmp_path / "a.bin").read_bytes() == DATA == (tmp_path / "b.bin").read_bytes()


def test_a_corrupt_mirror_is_skipped_for_a_good_one(tmp_path):
    bad = DATA[:-1] + b"!"
    with http_server({"/bad.bin": ServedFile(bad), "/good.bin": ServedFile(DATA)}) as srv:
        download_file([srv.url + "/bad.bin", srv.url + "/good.bin"], tmp_path / "f.bin", sha256=SHA)
    assert (tmp_path / "f.bin").read_bytes() == DATA


def test_an_interrupted_model_download_is_not_a_model_and_resumes(monkeypatch, tmp_path, ldot_home):
    """A half download leaves no model folder, the next run resumes, import is not refused."""
    from typer.testing import CliRunner

    from ldot_cli.main import app
    from models.hub.fetch import ensure_model, staging_dir
    from models.hub.load import resolve_source

    weights = os.urandom(300_000)
    files = {"/w/config.json": ServedFile(b'{"model_type": "bert"}'),
             "/w/model.safetensors": ServedFile(weights, cut_after=50_000)}  # 4 tries: 200 kB
    with http_server(files) as srv:
        _entry(monkeypatch, ModelEntry("test-w", "text-encoder", "t", "MIT", tuple(
            RemoteFile(f, (srv.url + "/w/" + f,)) for f in ("config.json", "model.safetensors"))))
        monkeypatch.setattr("models.core.download.time.sleep", lambda s: None)
        with pytest.raises(DownloadError, match="run the same command again to resume"):
            ensure_model("test-w")
        assert not (ldot_home / "models" / "test-w").exists() and not is_present("test-w")
        assert (staging_dir("test-w") / "model.safetensors.part").stat().st_size == 200_000
        listed = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "300"})
        assert "downloaded: `ldot models download test-w` resumes" in " ".join(listed.output.split())
        with pytest.raises(Exception, match="not downloaded .*ldot models download test-w"):
            resolve_source("test-w")
        srv.files["/w/model.safetensors"] = ServedFile(weights)
        n = len(srv.requests)
        ensure_model("test-w")  # the next run resumes from the kept bytes
        assert ("/w/model.safetensors", "bytes=200000-") in srv.requests[n:]
    assert is_present("test-w") and (ldot_home / "models" / "test-w" / "model.safetensors").read_bytes() == weights
    assert not staging_dir("test-w").exists()


def test_import_replaces_a_folder_an_old_interrupted_download_left(monkeypatch, tmp_path, ldot_home):
    from models.hub.convert import import_model

    _entry(monkeypatch, ModelEntry("test-t", "text-encoder", "t", "MIT", registry._hub("org/t", "vocab.txt")))
    (ldot_home / "models" / "test-t").mkdir(parents=True)  # what older versions left behind
    (ldot_home / "models" / "test-t" / "vocab.txt.part").write_bytes(b"[PAD]")
    src = tmp_path / "mine"
    src.mkdir()
    (src / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    model = import_model(src, "test-t")
    assert model.complete and is_present("test-t") and not (model.path / "vocab.txt.part").exists()


def test_a_206_from_another_offset_is_not_appended_the_file_restarts_from_zero(tmp_path):
    """Before the fix: a resume answered from byte 0 (of the asked length: the right total size) was appended,
    and the wrong file installed with its sha256 recorded as trusted."""
    (tmp_path / "f.bin.part").write_bytes(DATA[:5000])
    with http_server({"/f.bin": ServedFile(DATA, range_from_zero=True)}) as srv:
        digest = download_file([srv.url + "/f.bin"], tmp_path / "f.bin", hash_key="x/f.bin", retries=1,
                               backoff=0.01)
        assert [r for _, r in srv.requests] == ["bytes=5000-", None]  # refused, then the whole file from zero
    assert (tmp_path / "f.bin").read_bytes() == DATA and digest == SHA and known_hash("x/f.bin") == SHA


def test_a_206_announcing_another_total_than_the_published_size_is_refused(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(DATA[:5000])
    with http_server({"/f.bin": ServedFile(DATA + b"more")}) as srv:
        with pytest.raises(DownloadError, match=f"{len(DATA) + 4:,} bytes, expected {len(DATA):,}"):
            download_file([srv.url + "/f.bin"], tmp_path / "f.bin", size=len(DATA), retries=0)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_a_body_without_content_length_is_bounded(tmp_path):
    from models.core.download import Limits

    with http_server({"/f.bin": ServedFile(DATA, no_length=True)}) as srv:
        with pytest.raises(DownloadError, match="more than 1,000 bytes"):  # bounded by the published size
            download_file([srv.url + "/f.bin"], tmp_path / "a.bin", size=1000, retries=0)
        with pytest.raises(DownloadError, match="more than 4,096 bytes"):  # no size known: the cap
            download_file([srv.url + "/f.bin"], tmp_path / "b.bin", retries=0, limits=Limits(max_unknown_bytes=4096))
        assert not list(tmp_path.iterdir())  # nothing installed, no part kept
        download_file([srv.url + "/f.bin"], tmp_path / "c.bin", sha256=SHA, retries=0)  # within the limits: fine
    assert (tmp_path / "c.bin").read_bytes() == DATA


def test_a_trickling_server_is_given_up_by_the_minimum_rate_and_the_deadline(tmp_path):
    import time

    from models.core.download import Limits

    small = DATA[:400]
    with http_server({"/slow.bin": ServedFile(small, trickle=0.05), "/f.bin": ServedFile(small)}) as srv:
        start = time.monotonic()
        with pytest.raises(DownloadError, match="too slow"):  # ~20 bytes/s, under 100 bytes/s
            download_file([srv.url + "/slow.bin"], tmp_path / "a.bin", retries=0,
                          limits=Limits(min_bytes_per_s=100, rate_window_s=0.5))
        assert time.monotonic() - start < 5  # not the 20 s the whole file takes
        start = time.monotonic()
        with pytest.raises(DownloadError, match="deadline"):  # fast enough for the rate, past the deadline
            download_file([srv.url + "/slow.bin"], tmp_path / "b.bin", retries=3, backoff=0.01,
                          limits=Limits(min_bytes_per_s=1, rate_window_s=0.5, deadline_s=1.0))
        assert time.monotonic() - start < 5
        download_file([srv.url + "/slow.bin", srv.url + "/f.bin"], tmp_path / "c.bin", retries=0,  # next mirror
                      limits=Limits(min_bytes_per_s=100, rate_window_s=0.5))
    assert (tmp_path / "c.bin").read_bytes() == small


def test_a_416_for_a_part_file_that_is_not_the_whole_file_restarts_it(tmp_path):
    """A `.part` longer than the file (a changed file, a bad earlier answer) is answered 416; it was installed as
    whole and its hash recorded."""
    (tmp_path / "f.bin.part").write_bytes(DATA + b"junk")
    with http_server({"/f.bin": ServedFile(DATA)}) as srv:
        download_file([srv.url + "/f.bin"], tmp_path / "f.bin", hash_key="x/g.bin", retries=1, backoff=0.01)
        assert [r for _, r in srv.requests] == [f"bytes={len(DATA) + 4}-", None]
    assert (tmp_path / "f.bin").read_bytes() == DATA and known_hash("x/g.bin") == SHA
