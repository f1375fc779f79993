"""Dual encoders from the hub (served from 127.0.0.1 as the hub serves them) and from `save_pretrained` folders."""

from __future__ import annotations

import json

import pytest
from dual_fixtures import hub_files, write_tiny_dual
from ldot_testing import (
    HUB_COMMIT,
    http_server,
    hub_online,
    hub_repo_files,
    make_photos,
)
from typer.testing import CliRunner

from ldot_cli.main import app
from models.core.download import known_hash
from models.hub.installed import is_present, local_models


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return write_tiny_dual(tmp_path_factory.mktemp("clip") / "model", "clip", seed=5)


def _served(repo: str, folder) -> dict:
    files = hub_files(folder)
    return hub_repo_files(repo, files, lfs=("model.safetensors",))


def _gets(srv):
    return [p for p, _ in srv.requests if not p.startswith("HEAD ")]


def test_models_download_clip_from_the_hub_then_index_offline(tmp_path, monkeypatch, tiny_clip_dir, one_thread):
    runner = CliRunner()
    with http_server(_served("openai/clip-vit-base-patch32", tiny_clip_dir)) as srv:
        hub_online(monkeypatch, srv.url)
        result = runner.invoke(app, ["models", "download", "clip-vit-b32"])
        assert result.exit_code == 0, result.output
        assert any(p.endswith("/model.safetensors") or p.startswith("/cdn/") for p in _gets(srv))
    assert is_present("clip-vit-b32") and known_hash("clip-vit-b32@commit") == HUB_COMMIT  # pinned
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from now on, nothing is fetched
    monkeypatch.setenv("LDOT_NO_SERVER", "1")
    make_photos(tmp_path / "photos", 4, size=(48, 48))
    result = runner.invoke(app, ["index", str(tmp_path / "photos"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "4 encoded" in result.output
    result = runner.invoke(app, ["search", "a dog", "--paths", "-k", "2"])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2


def test_hf_repo_id_indexes_with_any_clip_repository(tmp_path, monkeypatch, tiny_clip_dir, one_thread):
    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions
    from models.hub.fetch import ensure_model

    with http_server(_served("someone/my-clip", tiny_clip_dir)) as srv:
        hub_online(monkeypatch, srv.url)
        ensure_model("hf:someone/my-clip")
        assert srv.requests
    assert [m.name for m in local_models()] == ["hf--someone--my-clip"]
    make_photos(tmp_path / "photos", 3, size=(48, 48))
    report = Indexer("default", IndexOptions(model="hf:someone/my-clip", num_workers=0)).run([tmp_path / "photos"])
    assert report.encoded == 3


def test_hf_repo_of_another_architecture_is_refused_before_its_weights(monkeypatch):
    files = {"config.json": json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}).encode(),
             "model.safetensors": b"\0" * 1000, "preprocessor_config.json": b"{}"}
    with http_server(hub_repo_files("org/bert", files, lfs=("model.safetensors",))) as srv:
        hub_online(monkeypatch, srv.url)
        result = CliRunner().invoke(app, ["models", "download", "hf:org/bert"])
        gets = _gets(srv)
    assert result.exit_code != 0
    text = " ".join(result.output.split())
    assert "hf:org/bert is a BertForMaskedLM model, not a dual encoder ldot reads" in text
    assert not any("model.safetensors" in p or p.startswith("/cdn/") for p in gets)
    assert not is_present("hf:org/bert")


def test_a_repo_id_that_is_not_one_is_refused(tmp_path):
    make_photos(tmp_path / "photos", 1)
    result = CliRunner().invoke(app, ["index", str(tmp_path / "photos"), "--model", "hf:../../etc"])
    assert result.exit_code != 0 and "is not a hub repository id" in result.output


def test_import_a_save_pretrained_folder_as_clip(tiny_clip_dir, one_thread):
    from models.hub.load import load_bi_encoder, model_inputs

    result = CliRunner().invoke(app, ["models", "import", str(tiny_clip_dir), "--as", "clip-vit-b32"])
    assert result.exit_code == 0, result.output
    assert "dual-encoder" in result.output and is_present("clip-vit-b32")
    assert model_inputs("clip-vit-b32") == "pixels"
    assert load_bi_encoder("clip-vit-b32").encode_text(["a dog"]).shape == (1, 16)


def test_import_refuses_a_folder_it_could_not_use(tmp_path, tiny_clip_dir):
    import shutil

    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    result = CliRunner().invoke(app, ["models", "import", str(broken), "--as", "clip-vit-b32"])
    assert result.exit_code != 0 and "no model.safetensors" in result.output and not is_present("clip-vit-b32")
    (broken / "pytorch_model.bin").unlink()
    shutil.copy(tiny_clip_dir / "model.safetensors", broken)
    for name in ("tokenizer.json", "vocab.json"):
        (broken / name).unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["models", "import", str(broken), "--as", "clip-vit-b32"])
    assert result.exit_code != 0 and "no tokenizer" in result.output
