"""The command line as a new user meets it: flags that parse wherever they stand, help text shown as
written, confirmations, and one-line errors that name what exists."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from ldot_cli.main import app

runner = CliRunner()


def _index_params(*args: str) -> dict:
    command = typer.main.get_command(app).commands["index"]
    return command.make_context("index", list(args)).params


@pytest.mark.parametrize("args, address, actors", [
    (["photos", "--ray"], None, None),  # last on the line
    (["--ray", "photos"], None, None),  # before PATHS: not taken for an address
    (["photos", "--ray", "--ray-actors", "1"], None, 1),
    (["photos", "--ray", "--ray-actors=1"], None, 1),
    (["photos", "--ray-actors", "1", "--ray"], None, 1),
    (["photos", "--ray", "--ray-address", "auto"], "auto", None),
    (["photos", "--ray-address=10.0.0.1:6379", "--ray-actors", "2"], "10.0.0.1:6379", 2),
])
def test_ray_is_a_flag_wherever_it_stands(args, address, actors):
    params = _index_params(*args)
    assert params["paths"] == ["photos"]
    assert params["ray"] or params["ray_address"]
    assert params["ray_address"] == address and params["ray_actors"] == actors


def test_without_ray_nothing_is_distributed():
    params = _index_params("photos", "--workers", "1")
    assert not params["ray"] and params["ray_address"] is None


def test_ray_address_is_documented_in_help():
    got = runner.invoke(app, ["index", "--help"], env={"COLUMNS": "200"})
    assert got.exit_code == 0 and "--ray-address" in got.output and "ADDRESS" in got.output


def test_data_get_offline_names_only_options_that_exist(monkeypatch, ldot_home):
    """`ldot data get --yes` offline said "(or pass --data ...)": `data get` has no --data. A setting the running
    command lacks is named with the commands that have it."""
    from datasets_fixtures import point_catalogue_at
    from ldot_testing import closed_port_url

    point_catalogue_at(monkeypatch, closed_port_url())
    result = runner.invoke(app, ["data", "get", "flickr30k", "--yes"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: could not fetch")
    assert "pass --data" not in message and "`ldot eval --data`" in message
    asked = runner.invoke(app, ["data", "get", "flickr30k"], env={"COLUMNS": "300"})  # no tty, no --yes
    assert asked.exit_code == 2 and "add --yes" in asked.output and "--data" not in asked.output


# -- help text is shown as written -----------------------------------------------------------------------------
@pytest.mark.parametrize("args, shown", [
    (["search", "--help"], "regions: [[x1,y1,x2,y2,weight],...] in pixels"),
    (["eval", "--help"], "the [plot] extra"),
    (["serve", "--help"], "Requests may name only it or a catalogue one"),
    (["train", "finetune", "--help"], "Peak learning rate. [default: 2e-5]"),
])
def test_bracketed_help_text_is_not_eaten_as_markup(args, shown):
    got = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert got.exit_code == 0
    assert shown in " ".join(got.output.replace("│", " ").split()), got.output
    assert "\\[" not in got.output


# -- a small index for the commands below ----------------------------------------------------------------------
@pytest.fixture
def indexed(tmp_path, vocab_dir, monkeypatch):
    from fakes import FakeDetector
    from ldot_testing import install_tiny_model, make_photos

    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions

    monkeypatch.setenv("LDOT_NO_SERVER", "1")
    install_tiny_model("tiny", vocab_dir)
    folder = tmp_path / "photos"
    make_photos(folder, 6, size=(96, 64))
    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([folder])
    return folder


QUERY = "a dog on the beach"


def test_search_regions_shows_the_boxes_in_the_table(indexed):
    plain = runner.invoke(app, ["search", QUERY, "-k", "3"], env={"COLUMNS": "300"})
    boxed = runner.invoke(app, ["search", QUERY, "-k", "3", "--regions"], env={"COLUMNS": "300"})
    assert plain.exit_code == 0 and boxed.exit_code == 0, boxed.output
    assert "boxes" not in plain.output and "boxes (x1,y1-x2,y2: score drop)" in boxed.output
    import json
    import re

    regions = json.loads(runner.invoke(app, ["search", QUERY, "-k", "3", "--regions", "--json"]).stdout)
    first = regions[0]["regions"][0]
    want = f"{first[0]:.0f},{first[1]:.0f}-{first[2]:.0f},{first[3]:.0f}: {first[4]:.3f}"
    assert want in boxed.output
    assert len(re.findall(r"\d+,\d+-\d+,\d+: -?\d+\.\d{3}", boxed.output)) >= 3


def test_index_rm_asks_in_a_terminal_and_takes_yes(indexed, ldot_home, monkeypatch):
    from ldot_cli.commands import index as index_command

    where = ldot_home / "indexes" / "default"
    monkeypatch.setattr(index_command, "interactive", lambda: True)
    declined = runner.invoke(app, ["index", "rm", "default"], input="n\n")
    assert declined.exit_code == 1 and where.is_dir()
    assert "delete index 'default' (6 images" in declined.output
    accepted = runner.invoke(app, ["index", "rm", "default"], input="y\n")
    assert accepted.exit_code == 0 and not where.exists()
    from fakes import FakeDetector

    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions

    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([indexed])
    told = runner.invoke(app, ["index", "rm", "default", "--yes"], input="")
    assert told.exit_code == 0 and not where.exists() and "delete index" not in told.output


def test_min_score_auto_without_calibration_suggests_from_the_index_spread(indexed):
    import json
    import re

    failed = runner.invoke(app, ["search", QUERY, "--min-score", "auto"], env={"COLUMNS": "400"})
    assert failed.exit_code == 2
    message = " ".join(failed.output.split())
    assert "no score calibration" in message and "keeps about the top 10%" in message
    suggested = float(re.search(r"e\.g\. --min-score (\S+) keeps", message).group(1))
    scores = [h["score"] for h in json.loads(runner.invoke(app, ["search", QUERY, "-k", "6", "--json"]).stdout)]
    assert min(scores) <= suggested <= max(scores)  # taken from how this index scores, whatever the scale
    kept = json.loads(runner.invoke(app, ["search", QUERY, "-k", "6", "--json", "--min-score",
                                          f"{suggested:.3g}"]).stdout)
    assert 1 <= len(kept) < len(scores)


def test_rerank_finds_the_re_ranker_before_its_estimate_and_counts_the_index(indexed, vocab_dir):
    from ldot_testing import install_tiny_reranker

    missing = runner.invoke(app, ["search", QUERY, "--rerank", "--device", "cpu"], env={"COLUMNS": "400"})
    assert missing.exit_code == 2 and "no re-ranker" in missing.output
    assert "re-ranking" not in missing.output  # no estimate for a re-ranker that is not there
    install_tiny_reranker("uniter-base", vocab_dir)
    ran = runner.invoke(app, ["search", QUERY, "--rerank", "--device", "cpu"], env={"COLUMNS": "400"})
    assert ran.exit_code == 0, ran.output
    assert "re-ranking 6 images" in ran.output  # the index holds 6, not --rerank-k's 50


def test_models_import_of_an_unknown_folder_names_every_layout(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    got = runner.invoke(app, ["models", "import", str(folder), "--as", "mine"], env={"COLUMNS": "400"})
    assert got.exit_code == 2
    message = " ".join(got.output.split())
    for layout in ("ldot model", "LXMERT", "BERT", "detector", "pytorch_model.bin", ".pkl"):
        assert layout in message, layout


def test_index_of_a_file_that_is_no_image_is_an_error(tmp_path, ldot_home):
    readme = tmp_path / "README.md"
    readme.write_text("# not a photo\n")
    got = runner.invoke(app, ["index", str(readme)], env={"COLUMNS": "400"})
    assert got.exit_code == 2
    assert "is a file but not an image" in " ".join(got.output.split())
    assert not (ldot_home / "indexes" / "default").exists()  # no empty index left behind
