"""Help, usage errors, shell completion and `ldot models list` layout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from ldot_cli.main import app

runner = CliRunner()


def _command_paths(command, prefix=()):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*prefix, name))


ALL_COMMANDS = list(_command_paths(typer.main.get_command(app)))


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "ldot")
def test_help_shows_click_style_metavars_not_python_types(path):
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    python_types = re.findall(r"<(?:bool|str|int|float|path|list\[[^>]*\])>|\{[a-z_]+\}", result.output)
    assert not python_types, (path, python_types)


def test_arguments_and_options_read_as_in_other_tools():
    index = runner.invoke(app, ["index", "--help"], env={"COLUMNS": "200"}).output
    assert "Usage: " in index and "[OPTIONS] PATHS..." in index
    assert re.search(r"--batch-size\s+INTEGER", index) and re.search(r"--name\s+-n\s+TEXT", index)
    assert re.search(r"--reindex\s+Start the index over", index)  # a flag takes no value: no type shown
    search = runner.invoke(app, ["search", "--help"], env={"COLUMNS": "200"}).output
    assert "[QUERY]" in search and re.search(r"--image\s+PATH", search)
    evaluation = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output
    assert "flickr30k|coco|multi30k" in evaluation.replace(" ", "") or "DATASET" in evaluation


def test_train_help_shows_the_official_defaults():
    from ldot_cli.commands.train import (
        DECOMPOSE_DEFAULTS,
        FINETUNE_DEFAULTS,
        PRETRAIN_DEFAULTS,
    )
    from models.training.loop import decompose_config, finetune_config, pretrain_config

    for shown, config in ((FINETUNE_DEFAULTS, finetune_config("flickr30k")), (PRETRAIN_DEFAULTS, pretrain_config()),
                          (DECOMPOSE_DEFAULTS, decompose_config())):
        for key, text in shown.items():
            value = getattr(config, key)
            assert (text == value) if isinstance(value, str) else float(text) == value, (key, text, value)
    assert finetune_config("coco").epochs == 20 and finetune_config("flickr30k").epochs == 15
    finetune = " ".join(runner.invoke(app, ["train", "finetune", "--help"], env={"COLUMNS": "200"}).output.split())
    for text in ("[default: 96]", "[default: 2e-5]", "[default: 0.1]", "[default: 2.0]", "[default: 42]",
                 "[default: 15 for flickr30k, 20 for coco]"):
        assert text in finetune, text
    pretrain = " ".join(runner.invoke(app, ["train", "pretrain", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "[default: 5e-5]" in pretrain and "[default: 300000]" in pretrain


@pytest.mark.parametrize("args, words", [
    (["search", "--no-such-flag"], "No such option: --no-such-flag"),
    (["index"], "Missing argument 'PATHS...'"),
    (["search", "a dog", "-k", "many"], "'-k'"),
    (["eval", "imagenet"], "imagenet"),
    (["models", "frobnicate"], "No such command"),
])
def test_usage_errors_are_one_line_with_exit_2(args, words):
    result = subprocess.run([sys.executable, "-c", "from ldot_cli.main import run; run()", *args],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert "--help`" in lines[0] and "╭" not in result.stderr and not result.stdout


def test_no_arguments_show_the_help_and_a_declined_confirmation_exits_1():
    assert runner.invoke(app, []).exit_code == 0 and "Usage" in runner.invoke(app, []).output
    declined = runner.invoke(app, ["models", "rm", "nope"], input="n\n")
    assert declined.exit_code == 1 and "unexpected" not in declined.output


def test_shell_completion_is_offered_and_answers(monkeypatch):
    # typer finds the shell from the process's parents (none when pytest runs detached, as under `nohup`): the
    # script asked for here is bash's wherever the tests run
    monkeypatch.setattr("typer.completion._get_shell_name", lambda: "bash")
    shown = runner.invoke(app, ["--show-completion"], prog_name="ldot")
    assert shown.exit_code == 0 and "_LDOT_COMPLETE=complete_bash" in shown.output, (shown.output, shown.exc_info)
    assert "--install-completion" in runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    answer = runner.invoke(app, [], prog_name="ldot",
                           env={"_LDOT_COMPLETE": "complete_bash", "COMP_WORDS": "ldot sea", "COMP_CWORD": "1"})
    assert answer.exit_code == 0 and answer.output.split() == ["search"]
    sub = runner.invoke(app, [], prog_name="ldot",
                        env={"_LDOT_COMPLETE": "complete_bash", "COMP_WORDS": "ldot models ve", "COMP_CWORD": "2"})
    assert sub.output.split() == ["verify"]


def test_models_list_never_breaks_a_name_at_80_columns_and_has_json():
    from models.hub.catalogue import list_pretrained

    result = runner.invoke(app, ["models", "list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert max(len(row) for row in table.splitlines()) <= 80
    for entry in list_pretrained():
        assert re.search(rf"(^|\s){re.escape(entry.name)}(\s|$)", table, re.M), entry.name  # whole, on one line
    rows = json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)
    assert [r["name"] for r in rows] == [e.name for e in list_pretrained()]
    assert {"name", "kind", "present", "size", "bytes", "licence", "source", "path"} <= set(rows[0])
    assert all(r["present"] == "no" for r in rows)
