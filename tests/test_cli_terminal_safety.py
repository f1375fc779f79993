"""Terminal safety: user data is never read as rich markup, and control characters,
C1 codes and bidi overrides in file names reach a terminal only as visible escapes; JSON, --paths and -0 stay
byte-exact."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from fakes import FakeDetector
from ldot_testing import (
    install_tiny_detector,
    install_tiny_model,
    make_photos,
    official_finetuned,
)
from typer.testing import CliRunner

from ldot_cli.commands.console import cell, line, safe
from ldot_cli.index.indexer import Indexer
from ldot_cli.index.options import IndexOptions
from ldot_cli.main import app

runner = CliRunner()

# what must never reach a terminal raw: ESC (CSI, OSC 52 clipboard writes, ESC[2J), BEL, CR, BS, C1 CSI, bidi
RAW = ("\x1b", "\x07", "\r", "\x08", "\x9b", "\u202e", "\u2066")
HOSTILE = [  # (file name, the visible form it must take)
    "osc52\x1b]52;c;cHduZWQ=\x07.png",
    "clear\x1b[2J\x1b[H.png",
    "cr\rfake-line.png",
    "c1\x9b31m.png",
    "bidi\u202egnp.exe.png",
    "[red]markup[bold] [link=https:x]x.png",
]


def _assert_terminal_safe(text: str) -> None:
    for raw in RAW:
        assert raw not in text, (raw, text[-400:])


def test_safe_escapes_every_control_and_bidi_character_and_keeps_the_rest():
    assert safe("a\x1b]52;c;aGk=\x07b") == "a\\x1b]52;c;aGk=\\x07b"
    assert safe("x\u202ey\u2066z") == "x\\u202ey\\u2066z"
    assert safe("c1\x9b31m\x85") == "c1\\x9b31m\\x85"
    assert safe("one\ntwo\tthree\r") == "one\\x0atwo\\x09three\\x0d"
    assert safe(b"latin1-\xe9.png") == "latin1-\\xe9.png"  # undecodable bytes
    assert safe(os.fsdecode(b"latin1-\xe9.png")) == "latin1-\\xe9.png"  # and their surrogate-escaped form
    assert safe("caf\u00e9 \U0001F415 [bold]x[/] \u4e2d") == "caf\u00e9 \U0001F415 [bold]x[/] \u4e2d"
    assert line(("[red]", "bold"), "\x1b[2J").plain == "[red]\\x1b[2J"
    assert cell(None).plain == "-"


@pytest.fixture
def hostile_index(tmp_path, vocab_dir):
    install_tiny_model("tiny", vocab_dir)
    folder = tmp_path / "photos"
    make_photos(folder, 2)
    for i, name in enumerate(HOSTILE):
        make_photos(tmp_path / "tmp", 1, start=20 + i)[0].rename(folder / name)
    nested = folder / "x["  # a folder `x[` holding `]bad.jpg` (a rich MarkupError before)
    nested.mkdir()
    (nested / "]bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "broken\x1b[2J\x1b]52;c;aGk=\x07.jpg").write_bytes(b"not an image")
    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([folder])
    return folder


def test_status_errors_with_markup_and_escape_sequences_in_names(hostile_index):
    result = runner.invoke(app, ["status", "--name", "default", "--errors"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "x[/]bad.jpg" in result.output  # shown literally
    assert "broken\\x1b[2J\\x1b]52;c;aGk=\\x07.jpg" in result.output
    _assert_terminal_safe(result.output)
    listed = runner.invoke(app, ["status"], env={"COLUMNS": "300"})
    assert listed.exit_code == 0 and "default" in listed.output


def test_search_table_escapes_names_while_machine_outputs_stay_exact(hostile_index):
    k = str(len(HOSTILE) + 2)
    table = runner.invoke(app, ["search", "a dog", "-k", k], env={"COLUMNS": "300"})
    assert table.exit_code == 0, table.output
    _assert_terminal_safe(table.output)
    for visible in ("osc52\\x1b]52;c;cHduZWQ=\\x07.png", "bidi\\u202egnp.exe.png", "c1\\x9b31m.png",
                    "cr\\x0dfake-line.png", "[red]markup[bold] [link=https:x]x.png"):
        assert visible in table.output
    hits = json.loads(runner.invoke(app, ["search", "a dog", "-k", k, "--json"]).stdout)
    assert {Path(h["path"]).name for h in hits} >= set(HOSTILE)
    nul = runner.invoke(app, ["search", "a dog", "-k", k, "-0"]).stdout_bytes.split(b"\0")[:-1]
    assert {os.path.basename(p) for p in nul} >= {os.fsencode(n) for n in HOSTILE}


def test_errors_and_warnings_quoting_user_data_are_escaped(tmp_path):
    evil = tmp_path / "x[" / "]\x1b]52;c;aGk=\x07missing.pt"
    result = runner.invoke(app, ["models", "import", str(evil), "--as", "x"])
    assert result.exit_code == 2, result.output
    assert "]\\x1b]52;c;aGk=\\x07missing.pt" in result.output and "error:" in result.output
    _assert_terminal_safe(result.output)


def test_models_import_with_markup_in_the_file_name(tmp_path, tiny_model):
    folder = tmp_path / "x["
    folder.mkdir()
    torch.save(official_finetuned(tiny_model), folder / "]m\x1b[2J.pt")
    result = runner.invoke(app, ["models", "import", str(folder / "]m\x1b[2J.pt"), "--as", "mine"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "x[/]m\\x1b[2J.pt" in " ".join(result.output.split())
    _assert_terminal_safe(result.output)
    listed = runner.invoke(app, ["models", "list"], env={"COLUMNS": "300"})
    assert listed.exit_code == 0 and "mine" in listed.output
    _assert_terminal_safe(listed.output)


def test_extract_failures_with_markup_and_escapes_in_names(tmp_path):
    install_tiny_detector()
    photos = tmp_path / "photos"
    make_photos(photos, 1, size=(64, 48))
    (photos / "x[").mkdir()
    (photos / "x[" / "]bad\x1b]52;c;aGk=\x07.jpg").write_bytes(b"\xff\xd8 truncated")
    result = runner.invoke(app, ["extract", str(photos), "--out", str(tmp_path / "db"), "--detector", "tiny-det",
                                 "--workers", "0", "--device", "cpu"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "x[/]bad\\x1b]52;c;aGk=\\x07.jpg" in result.output and "1 failed" in result.output
    _assert_terminal_safe(result.output)


def _print_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "print":
            yield node


def test_no_console_print_builds_markup_from_strings():
    """The class guard: every console print in the commands takes a `line(...)`/`cell(...)`/table or a constant,
    never an f-string, concatenation or format call (where user data would be pasted into text), and nothing
    turns markup back on."""
    root = Path(__file__).resolve().parents[1] / "ldot_cli"
    files = [*sorted((root / "commands").glob("*.py")), root / "main.py"]
    offenders = []
    for path in files:
        tree = ast.parse(path.read_text())
        for call in _print_calls(tree):
            for arg in call.args:
                if isinstance(arg, ast.JoinedStr | ast.BinOp) or (
                        isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute)
                        and arg.func.attr in ("format", "join")):
                    offenders.append(f"{path.name}:{call.lineno}")
            if any(kw.arg in ("markup", "highlight") and not (isinstance(kw.value, ast.Constant) and
                                                               kw.value.value is False) for kw in call.keywords):
                offenders.append(f"{path.name}:{call.lineno} (markup/highlight on)")
        for node in ast.walk(tree):  # the consoles themselves keep markup and highlighting off
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Console":
                kws = {kw.arg: getattr(kw.value, "value", None) for kw in node.keywords}
                if kws.get("markup") is not False or kws.get("highlight") is not False:
                    offenders.append(f"{path.name}:{node.lineno} (Console with markup or highlighting)")
    assert not offenders, offenders
