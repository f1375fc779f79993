"""`ldot models …` and the CLI's error boundary, through typer's CliRunner and as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from ldot_testing import MaliciousPayload, official_finetuned
from typer.testing import CliRunner

from ldot_cli import __version__
from ldot_cli.main import app

runner = CliRunner()


def ldot(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the installed console entry point (or the module, when testing from a checkout)."""
    cmd = [sys.executable, "-c", "from ldot_cli.main import run; run()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ldot {__version__}"


def test_models_list_shows_every_registry_entry():
    result = runner.invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("lightningdot", "flickr-ft", "coco-ft", "uniter-base", "bert-base-cased", "butd-r101-vg",
                 "lxmert-base-uncased"):
        assert name in result.output
    assert "MIT" in result.output and "hub:unc-nlp/frcnn-vg-finetuned" in result.output


def test_import_verify_rm_round_trip(tmp_path, tiny_model, ldot_home):
    torch.save(official_finetuned(tiny_model), tmp_path / "flickr-ft.pt")
    result = runner.invoke(app, ["models", "import", str(tmp_path / "flickr-ft.pt"), "--as", "flickr-ft"])
    assert result.exit_code == 0, result.output
    model_dir = ldot_home / "models" / "flickr-ft"
    assert (model_dir / "model.safetensors").is_file()
    listed = runner.invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert "yes" in listed.output.split("flickr-ft", 1)[1].splitlines()[0]
    assert runner.invoke(app, ["models", "verify"]).exit_code == 0
    # flip one byte of the weights: verify must notice
    data = bytearray((model_dir / "model.safetensors").read_bytes())
    data[-10] ^= 0x01
    (model_dir / "model.safetensors").write_bytes(bytes(data))
    result = runner.invoke(app, ["models", "verify", "flickr-ft"])
    assert result.exit_code == 1 and "sha256 mismatch" in result.output
    assert runner.invoke(app, ["models", "rm", "flickr-ft", "--yes"]).exit_code == 0
    assert not model_dir.exists()


def test_import_refuses_to_overwrite_and_to_mislabel(tmp_path, tiny_model):
    torch.save(official_finetuned(tiny_model), tmp_path / "a.pt")
    assert runner.invoke(app, ["models", "import", str(tmp_path / "a.pt"), "--as", "mine"]).exit_code == 0
    again = runner.invoke(app, ["models", "import", str(tmp_path / "a.pt"), "--as", "mine"])
    assert again.exit_code == 2 and "--force" in again.output
    wrong = runner.invoke(app, ["models", "import", str(tmp_path / "a.pt"), "--as", "uniter-base"])
    assert wrong.exit_code == 2 and "bi-encoder" in wrong.output


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    result = ldot("models", "import", str(tmp_path / "missing.pt"), "--as", "x")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "missing.pt" in result.stderr and "Traceback" not in result.stderr


def test_malicious_checkpoint_import_is_refused_as_a_subprocess(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model_dict": MaliciousPayload(marker)}, tmp_path / "evil.pt")
    result = ldot("models", "import", str(tmp_path / "evil.pt"), "--as", "evil")
    assert result.returncode == 2 and "refused" in result.stderr
    assert not marker.exists()


def test_offline_download_is_one_clear_line():
    result = ldot("models", "download", "flickr-ft")
    assert result.returncode == 2
    assert "flickr-ft.pt" in result.stderr and "ldot models import flickr-ft.pt --as flickr-ft" in result.stderr
    assert "Traceback" not in result.stderr


def test_rm_unknown_model_is_an_error():
    result = runner.invoke(app, ["models", "rm", "nope", "--yes"])
    assert result.exit_code == 2 and "nope" in result.output


@pytest.mark.parametrize("name", ["../escape", "a/b", ""])
def test_invalid_import_names(tmp_path, tiny_model, name):
    torch.save(official_finetuned(tiny_model), tmp_path / "a.pt")
    result = runner.invoke(app, ["models", "import", str(tmp_path / "a.pt"), "--as", name])
    assert result.exit_code == 2 and "invalid model name" in result.output
