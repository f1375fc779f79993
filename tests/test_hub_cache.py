"""Hub files kept as the hub's own tools keep them (the shared Hugging Face cache), served by a 127.0.0.1 copy of
the hub: HEAD with X-Repo-Commit / ETag / X-Linked-Etag / X-Linked-Size, a CDN redirect for LFS files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from ldot_testing import HUB_COMMIT, ServedFile, http_server, hub_online, hub_repo_files
from typer.testing import CliRunner

from ldot_cli.main import app
from models.core.errors import DownloadError
from models.hub import catalogue as registry
from models.hub.catalogue import ModelEntry
from models.hub.fetch import download_entry, ensure_model
from models.hub.hf_cache import hub_cache_dir
from models.hub.installed import is_present, verify_dir

WEIGHTS = os.urandom(400_000)
SHA = hashlib.sha256(WEIGHTS).hexdigest()
FILES = {"config.json": b'{"model_type": "bert"}', "vocab.txt": b"[PAD]\n[UNK]\n", "model.safetensors": WEIGHTS}


@pytest.fixture
def hub(monkeypatch):
    files = hub_repo_files("org/bert", FILES, lfs=("model.safetensors",))
    with http_server(files) as srv:
        hub_online(monkeypatch, srv.url)
        monkeypatch.setattr(registry, "REGISTRY", (*registry.REGISTRY, ModelEntry(
            "test-bert", "text-encoder", "t", "MIT", registry._hub("org/bert", *FILES, optional=("tokenizer.json",)))))
        yield srv


def _gets(srv, since=0):
    return [p for p, _ in srv.requests[since:] if not p.startswith("HEAD ")]


def test_files_land_in_the_shared_cache_as_the_hub_tools_lay_them_out(hub, ldot_home):
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    path = download_entry("test-bert")
    storage = hub_cache_dir() / "models--org--bert"
    assert (storage / "blobs" / SHA).read_bytes() == WEIGHTS  # an LFS blob is named by its sha256
    assert (storage / "refs" / "main").read_text() == HUB_COMMIT
    snapshot = storage / "snapshots" / HUB_COMMIT / "model.safetensors"
    assert snapshot.is_symlink() and snapshot.resolve() == (storage / "blobs" / SHA).resolve()
    assert (path / "model.safetensors").is_symlink() and (path / "model.safetensors").read_bytes() == WEIGHTS
    assert is_present("test-bert") and verify_dir(path) == []
    # huggingface_hub itself finds every file, offline
    for name in FILES:
        assert try_to_load_from_cache("org/bert", name, cache_dir=str(hub_cache_dir())) == str(
            storage / "snapshots" / HUB_COMMIT / name)
        assert hf_hub_download("org/bert", name, cache_dir=str(hub_cache_dir()), local_files_only=True)
    assert f"/cdn/{SHA}" in _gets(hub)  # the bytes came through the CDN redirect
    listed = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "400"})
    row = next(line for line in listed.output.splitlines() if "test-bert" in line)
    assert "hub cache" in row and f"the shared Hugging Face cache {hub_cache_dir()}" in listed.output


def test_files_already_in_the_shared_cache_are_not_downloaded_again(hub, ldot_home):
    from huggingface_hub import hf_hub_download

    for name in FILES:  # the hub's own tool fetched them before ldot ever ran
        hf_hub_download("org/bert", name, cache_dir=str(hub_cache_dir()), endpoint=hub.url)
    n = len(hub.requests)
    path = download_entry("test-bert")
    assert _gets(hub, n) == [] or all("tokenizer.json" in p for p in _gets(hub, n))
    assert (path / "model.safetensors").read_bytes() == WEIGHTS and is_present("test-bert")


def test_an_interrupted_hub_download_resumes_from_the_shared_cache(hub, ldot_home, monkeypatch):
    monkeypatch.setattr("models.core.download.time.sleep", lambda s: None)
    hub.files[f"/cdn/{SHA}"] = ServedFile(WEIGHTS, cut_after=50_000)  # 4 tries: 200 kB
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        ensure_model("test-bert")
    assert not is_present("test-bert") and not (ldot_home / "models" / "test-bert").exists()
    part = hub_cache_dir() / "models--org--bert" / "blobs" / f"{SHA}.part"
    assert part.stat().st_size == 200_000
    listed = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "400"})
    assert "`ldot models download test-bert` resumes" in " ".join(listed.output.split())
    hub.files[f"/cdn/{SHA}"] = ServedFile(WEIGHTS)
    n = len(hub.requests)
    ensure_model("test-bert")
    assert (f"/cdn/{SHA}", "bytes=200000-") in hub.requests[n:]
    assert is_present("test-bert") and not part.exists()


def test_bytes_that_do_not_match_the_hubs_sha256_are_refused(hub, ldot_home):
    hub.files[f"/cdn/{SHA}"] = ServedFile(WEIGHTS[:-1] + b"!")
    with pytest.raises(DownloadError, match="sha256"):
        download_entry("test-bert")
    blobs = hub_cache_dir() / "models--org--bert" / "blobs"
    assert not (blobs / SHA).exists() and not (blobs / f"{SHA}.part").exists() and not is_present("test-bert")


def test_a_small_file_is_checked_against_its_git_hash(hub, ldot_home):
    for rev in ("main", HUB_COMMIT):
        path = f"/org/bert/resolve/{rev}/vocab.txt"
        hub.files[path] = ServedFile(b"[PAD]\n[XXX]\n", headers=hub.files[path].headers)  # same length, other bytes
    with pytest.raises(DownloadError, match="git hash"):
        download_entry("test-bert")
    assert not is_present("test-bert")


def test_offline_mode_uses_the_cache_and_never_the_network(hub, ldot_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set .*ldot models import FOLDER --as test-bert"):
        download_entry("test-bert")
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    download_entry("test-bert")
    from models.hub.installed import remove_model

    remove_model("test-bert")  # ldot's links go; the shared cache keeps the files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    path = download_entry("test-bert")  # the optional tokenizer.json is not in the cache: not an error
    assert hub.requests[n:] == [] and is_present("test-bert") and verify_dir(path) == []


def test_hf_token_goes_to_the_hub(hub, ldot_home, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    download_entry("test-bert")
    assert {a for p, a in hub.auth if p.startswith("/org/bert/resolve/")} == {"Bearer hf_secret"}


def test_the_first_downloads_commit_pins_later_downloads(hub, ldot_home):
    from models.core.download import known_hash
    from models.hub.installed import remove_model

    download_entry("test-bert")
    assert known_hash("test-bert@commit") == HUB_COMMIT
    remove_model("test-bert")
    import shutil

    shutil.rmtree(hub_cache_dir())  # a fresh machine with the same ldot home
    n = len(hub.requests)
    download_entry("test-bert")
    asked = [p for p, _ in hub.requests[n:] if "/resolve/" in p]
    assert asked and all(f"/resolve/{HUB_COMMIT}/" in p for p in asked)  # never `main` again


def test_an_entry_mixing_hub_files_and_another_host(hub, ldot_home, monkeypatch):
    """The detector's way: weights from the hub (shared cache), its object names from GitHub (ldot's folder)."""
    from models.hub.catalogue import RemoteFile

    hub.files["/gh/objects_vocab.txt"] = ServedFile(b"person\ndog\n")
    entry = ModelEntry("test-det", "detector", "t", "MIT", registry._hub("org/bert", "model.safetensors")
                       + (RemoteFile("objects_vocab.txt", (hub.url + "/gh/objects_vocab.txt",), optional=True),))
    monkeypatch.setattr(registry, "REGISTRY", (*registry.REGISTRY, entry))
    path = download_entry("test-det")
    assert (path / "model.safetensors").is_symlink() and (path / "model.safetensors").read_bytes() == WEIGHTS
    assert not (path / "objects_vocab.txt").is_symlink() and (path / "objects_vocab.txt").read_bytes() == b"person\ndog\n"
    assert is_present("test-det") and verify_dir(path) == []
    n = len(hub.requests)
    download_entry("test-det")  # again: nothing fetched, nothing copied out of the shared cache
    assert _gets(hub, n) == [] and (ldot_home / "models" / "test-det" / "model.safetensors").is_symlink()


def _blob(name: bytes) -> Path:
    storage = hub_cache_dir() / "models--org--bert"
    return next(p for p in (storage / "blobs").iterdir() if p.read_bytes() == name)


def test_a_tampered_small_blob_in_the_shared_cache_is_refused_and_fetched_again(hub, ldot_home):
    """Before the fix: a small blob (named by its git sha1) changed in the shared cache was linked, recorded with
    its new sha256, and `ldot models verify` said ok."""
    from huggingface_hub import hf_hub_download

    for name in FILES:
        hf_hub_download("org/bert", name, cache_dir=str(hub_cache_dir()), endpoint=hub.url)
    vocab = _blob(FILES["vocab.txt"])
    vocab.chmod(0o644)
    vocab.write_bytes(b"[PAD]\n[XXX]\n")  # same size, other bytes
    path = download_entry("test-bert")
    assert (path / "vocab.txt").read_bytes() == FILES["vocab.txt"] and verify_dir(path) == []
    assert len([p for p in _gets(hub) if p.endswith("/vocab.txt")]) == 2  # by the hub's tool, then again by ldot


def test_verify_checks_a_hub_blob_against_its_name(hub, ldot_home):
    import json

    from models.hub.catalogue import MANIFEST

    path = download_entry("test-bert")
    vocab = (path / "vocab.txt").resolve()
    vocab.chmod(0o644)
    vocab.write_bytes(b"[PAD]\n[XXX]\n")
    manifest = json.loads((path / MANIFEST).read_text())  # recorded as the old code did: the tampered bytes' hash
    manifest["files"]["vocab.txt"]["sha256"] = hashlib.sha256(b"[PAD]\n[XXX]\n").hexdigest()
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert verify_dir(path) == ["vocab.txt: does not match its hub blob name (git sha1): changed in the shared cache"]
    result = CliRunner().invoke(app, ["models", "verify", "test-bert"])
    assert result.exit_code != 0 and "blob" in result.output


def test_the_advised_repair_of_a_damaged_lfs_blob_repairs_it(hub, ldot_home):
    """A tampered LFS blob: every use says "damaged ... re-download"; the re-download must fetch it again rather
    than link the same blob forever."""
    from models.hub.installed import DamagedModelError, check_model_files

    path = download_entry("test-bert")
    blob = (path / "model.safetensors").resolve()
    blob.chmod(0o644)
    blob.write_bytes(WEIGHTS[:-1] + b"!")
    with pytest.raises(DamagedModelError, match="re-download"):
        check_model_files(path)
    n = len(hub.requests)
    result = CliRunner().invoke(app, ["models", "download", "test-bert"])
    assert result.exit_code == 0, result.output
    assert f"/cdn/{SHA}" in _gets(hub, n)
    assert (path / "model.safetensors").read_bytes() == WEIGHTS
    check_model_files(path)
    assert verify_dir(path) == []
