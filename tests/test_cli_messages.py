"""Messages that say what is wrong: each bad input gets one line naming the real problem."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from fakes import FakeDetector
from ldot_testing import install_tiny_model, make_photos
from typer.testing import CliRunner

from ldot_cli.index.indexer import Indexer
from ldot_cli.index.options import IndexOptions
from ldot_cli.main import app
from models.core.errors import LdotWarning

runner = CliRunner()


def one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return " ".join(lines[0].split())


@pytest.fixture
def indexed(tmp_path, vocab_dir):
    install_tiny_model("tiny", vocab_dir)
    make_photos(tmp_path / "photos", 3)
    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([tmp_path / "photos"])
    return tmp_path


def test_importing_a_text_file_says_it_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("my notes about models\n")
    line = one_error_line(runner.invoke(app, ["models", "import", str(tmp_path / "notes.txt"), "--as", "mine"]))
    assert "notes.txt is not a model checkpoint" in line and "needs more than tensors" not in line


def test_a_bad_index_name_is_called_an_index_name():
    line = one_error_line(runner.invoke(app, ["search", "a dog", "--name", "../../etc"]))
    assert "invalid index name '../../etc'" in line


def test_ldot_home_that_is_a_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("")
    for home in (tmp_path / "file", tmp_path / "file" / "sub"):
        line = one_error_line(runner.invoke(app, ["status"], env={"LDOT_HOME": str(home)}))
        assert f"LDOT_HOME={home}" in line and "not a folder" in line


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a /proc that refuses new folders")
def test_ldot_home_that_cannot_be_created_is_one_clear_line(tmp_path):
    (tmp_path / "w.pkl").write_bytes(b"\x80\x02}q\x00.")
    result = runner.invoke(app, ["models", "import", str(tmp_path / "w.pkl"), "--as", "x"],
                           env={"LDOT_HOME": "/proc/ldot-home-test"})
    line = one_error_line(result)
    assert "cannot write in LDOT_HOME (/proc/ldot-home-test)" in line and "unexpected" not in line


def test_train_checks_its_data_before_asking_for_a_model(tmp_path):
    result = runner.invoke(app, ["train", "finetune", "--data", str(tmp_path / "nope"), "--out", "mine"])
    line = one_error_line(result)
    assert "nope is not a folder" in line and "bert" not in line
    (tmp_path / "empty").mkdir()
    line = one_error_line(runner.invoke(app, ["train", "finetune", "--data", str(tmp_path / "empty"), "--out", "m"]))
    assert "no training captions" in line and "bert" not in line


def test_rerank_k_below_one_is_refused_not_skipped():
    line = one_error_line(runner.invoke(app, ["search", "a dog", "--rerank", "--rerank-k", "0"]))
    assert "--rerank-k must be at least 1 (got 0)" in line


def test_a_query_longer_than_the_model_reads_says_so(indexed):
    from ldot_cli.index.search import Searcher

    searcher = Searcher("default")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(searcher.search("a dog " * 2000, k=2)) == 2
        assert len(searcher.search("a dog", k=2)) == 2
    said = [str(w.message) for w in caught if issubclass(w.category, LdotWarning)]
    assert len(said) == 1 and "4000 word-pieces" in said[0] and "only its first" in said[0]
    searcher.close()
    result = runner.invoke(app, ["search", "a dog " * 2000, "-k", "1", "--json"])
    assert result.exit_code == 0 and "warning: the query is 4000 word-pieces" in result.stderr


def test_image_query_on_a_special_file_is_not_called_a_disk_problem(indexed, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo.jpg")
    for path in ("/proc/self/mem", tmp_path / "empty.jpg", tmp_path / "fifo.jpg"):
        line = one_error_line(runner.invoke(app, ["search", "--image", str(path)]))
        assert "is not a regular image file" in line and "disk" not in line, line


def test_unknown_preset_is_refused_before_anything_is_created(tmp_path):
    make_photos(tmp_path / "photos", 1)
    for args in (["index", str(tmp_path / "photos")], ["extract", str(tmp_path / "photos"), "--out",
                                                         str(tmp_path / "db")]):
        line = one_error_line(runner.invoke(app, [*args, "--preset", "bogus"]))
        assert "unknown preset 'bogus': choose uniter or lxmert36" in line
    from models.core.home import indexes_dir

    assert not (indexes_dir() / "default").exists() and not (tmp_path / "db").exists()


def test_removing_a_model_an_index_uses_asks_for_force(indexed):
    from models.core.home import models_dir

    line = one_error_line(runner.invoke(app, ["models", "rm", "tiny", "--yes"]))
    assert "used by index 'default'" in line and "--force" in line
    assert (models_dir() / "tiny").is_dir()
    forced = runner.invoke(app, ["models", "rm", "tiny", "--yes", "--force"])
    assert forced.exit_code == 0 and "will need model 'tiny' again" in " ".join(forced.stderr.split())
    assert not Path(models_dir() / "tiny").exists()
