"""`ldot search` extras with a tiny model on generated images: --min-score (a number and the calibrated `auto`),
--regions (and their faithfulness), --html, --preview, and thumbnails that leave with their image."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import FakeDetector
from ldot_testing import install_tiny_model, make_photos
from typer.testing import CliRunner

from ldot_cli.index.indexer import Indexer
from ldot_cli.index.options import IndexOptions
from ldot_cli.main import app

runner = CliRunner()
QUERIES = ["a dog on the beach", "two people sitting on a bench", "a red car", "a child playing with a ball"]


@pytest.fixture
def indexed(tmp_path, vocab_dir):
    install_tiny_model("tiny", vocab_dir)
    folder = tmp_path / "photos"
    make_photos(folder, 10, size=(96, 64))
    odd = folder / "<b>bold<i> & \x1b[31mred.png"  # markup, HTML and a terminal escape in a file name
    make_photos(tmp_path / "tmp", 1, start=30, size=(96, 64))[0].rename(odd)
    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([folder])
    return folder


def search_json(*args: str) -> list[dict]:
    result = runner.invoke(app, ["search", *args, "--json"], env={"LDOT_NO_SERVER": "1"})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def calibrate_tiny(threshold: float) -> None:
    from models.hub.installed import model_path
    from models.training.calibration import save_calibration, summarize

    rng = np.random.default_rng(0)
    negatives = threshold + rng.normal(-10, 3, 5000)
    negatives = negatives - (np.quantile(negatives, 0.999) - threshold)  # its 99.9% quantile is the threshold
    save_calibration(model_path("tiny"), summarize(threshold + rng.normal(8, 3, 500), negatives, "test"))


def test_min_score_number_and_auto(indexed):
    hits = search_json(QUERIES[0], "-k", "8")
    level = hits[3]["score"]
    kept = search_json(QUERIES[0], "-k", "8", "--min-score", str(level))
    assert [h["path"] for h in kept] == [h["path"] for h in hits[:4]]
    with pytest.raises(AssertionError):  # no calibration yet: a clear error
        search_json(QUERIES[0], "--min-score", "auto")
    failed = runner.invoke(app, ["search", QUERIES[0], "--min-score", "auto"], env={"LDOT_NO_SERVER": "1"})
    assert failed.exit_code == 2 and "no score calibration" in failed.output
    calibrate_tiny(level)
    from models.hub.installed import model_path
    from models.training.calibration import load_calibration

    assert load_calibration(model_path("tiny"))["auto"]["threshold"] == pytest.approx(level)
    auto = search_json(QUERIES[0], "-k", "8", "--min-score", "auto")
    assert [h["path"] for h in auto] == [h["path"] for h in hits if h["score"] > level - 1e-6][:8]
    calibrate_tiny(hits[0]["score"] + 1.0)  # nothing passes: "no good match", exit 0, [] in JSON
    assert search_json(QUERIES[0], "--min-score", "auto") == []
    table = runner.invoke(app, ["search", QUERIES[0], "--min-score", "auto"], env={"LDOT_NO_SERVER": "1"})
    assert table.exit_code == 0 and "no good match" in table.stdout
    bad = runner.invoke(app, ["search", QUERIES[0], "--min-score", "lots"], env={"LDOT_NO_SERVER": "1"})
    assert bad.exit_code == 2 and "--min-score must be a number or 'auto'" in bad.output


@pytest.mark.slow
def test_regions_are_the_boxes_whose_removal_lowers_the_score_most(indexed):
    """The faithfulness check: removing the chosen box lowers the score more than removing a random other box,
    on most results; and each weight is the measured score drop."""
    from ldot_cli.index.search import Request, Searcher
    from models.nn.attribution import prepare, removal_scores

    searcher = Searcher("default")
    rng = np.random.default_rng(0)
    wins = total = explained = 0
    try:
        for query in QUERIES[:3]:
            answer = searcher.answer(Request(text=query, k=5, regions=True))
            explained += sum(bool(h.regions) for h in answer.hits)
            answer.hits = [h for h in answer.hits if h.regions]  # no box lowers the score: none is shown
            tower = searcher.image_tower
            records = searcher.region_records([h.vector_id for h in answer.hits])
            feat, box7, valid = prepare(tower, records)
            q = torch.as_tensor(np.repeat(searcher.last_vector, len(records), 0))
            chosen, random_box = [], []
            for hit, record in zip(answer.hits, records):
                norm = np.asarray(record.norm_bb, np.float32)[:, :4]
                first = int(np.argmin(np.abs(norm - np.asarray(hit.regions[0][:4])).sum(1)))
                chosen.append([first])
                others = [i for i in range(len(record.features)) if i != first]
                random_box.append([int(rng.choice(others))])
                weights = [r[4] for r in hit.regions]
                assert weights == sorted(weights, reverse=True) and all(w > 0 for w in weights)
            without_chosen = removal_scores(tower.img_model, q, feat, box7, valid, chosen)[:, 0]
            without_random = removal_scores(tower.img_model, q, feat, box7, valid, random_box)[:, 0]
            scores = np.asarray([h.score for h in answer.hits])
            drops = scores - without_chosen
            assert drops == pytest.approx([h.regions[0][4] for h in answer.hits], rel=1e-3, abs=1e-3)
            wins += int(np.sum(drops > scores - without_random))
            total += len(drops)
    finally:
        searcher.close()
    assert explained >= 12, f"only {explained} of 15 results have a box that drives their score"
    assert wins / total >= 0.75, f"chosen box beat a random one on {wins}/{total}"


def test_regions_in_json_are_pixels_of_the_photo(indexed):
    from PIL import Image

    hits = search_json(QUERIES[1], "-k", "5", "--regions")
    for hit in hits:
        width, height = Image.open(hit["path"]).size
        assert hit["regions"] and all(len(r) == 5 for r in hit["regions"])
        for x1, y1, x2, y2, weight in hit["regions"]:
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height and weight > 0
    assert "regions" not in search_json(QUERIES[1], "-k", "2")[0]


def test_html_contact_sheet(indexed, tmp_path):
    target = tmp_path / "sheet.html"
    result = runner.invoke(app, ["search", QUERIES[0], "-k", "11", "--html", str(target), "--json"],
                           env={"LDOT_NO_SERVER": "1"})
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    page = target.read_text()
    assert [int(r) for r in re.findall(r'data-rank="(\d+)"', page)] == list(range(1, 12))
    assert page.count("data:image/jpeg;base64,") == 11  # self-contained: every thumbnail inside
    assert "<b>bold" not in page and "&lt;b&gt;bold&lt;i&gt;" in page  # file names are text, not HTML
    assert page.count('class="box') >= 11  # the regions drawn on the results
    for hit in hits[:3]:
        assert os.path.basename(hit["path"]).replace("&", "&amp;").split("\x1b")[0] in page
    assert "src=\"http" not in page and "<script" not in page


def test_preview_draws_thumbnails_in_a_terminal_and_falls_back_to_text(indexed, monkeypatch):
    import io

    from rich.console import Console

    from ldot_cli.commands import console, sheet
    from ldot_cli.index.search import Searcher

    searcher = Searcher("default")
    hits = searcher.search(QUERIES[0], k=3)
    searcher.close()
    plain = runner.invoke(app, ["search", QUERIES[0], "-k", "3", "--preview"], env={"LDOT_NO_SERVER": "1",
                                                                                    "COLUMNS": "200"})
    assert plain.exit_code == 0 and "rank" in plain.stdout and "\x1b[" not in plain.stdout  # no terminal: text
    terminal = Console(file=io.StringIO(), force_terminal=True, width=160, color_system="truecolor")
    monkeypatch.setattr(sheet, "out", terminal)
    assert sheet.preview_table(hits)
    drawn = terminal.file.getvalue()
    assert sum(drawn.count(ch) for ch in "▀▄░▒▓█") > 50  # pixels as cells (colour blocks or shades)
    assert "img_" in drawn and "\x1b[31mred" not in drawn  # the file name's escape is shown, not obeyed
    assert console.out is not terminal


def test_thumbnails_are_cached_and_leave_with_their_image(indexed):
    from ldot_cli.index.layout import index_path
    from ldot_cli.index.search import Searcher
    from ldot_cli.index.thumbs import thumb_path, thumbnail

    searcher = Searcher("default")
    hit = searcher.search(QUERIES[0], k=1)[0]
    digest = searcher.store.content_hashes([hit.vector_id])[hit.vector_id]
    searcher.close()
    directory = index_path("default")
    with pytest.raises(ValueError, match="not the indexed content"):  # bytes of another content: nothing cached
        thumbnail(directory, digest, lambda: b"\x89PNG other bytes")
    assert not thumb_path(directory, digest).exists()
    first = thumbnail(directory, digest, lambda: Path(os.fsdecode(hit.path)).read_bytes())
    cached = thumb_path(directory, digest)
    assert cached.read_bytes() == first and first[:3] == b"\xff\xd8\xff"
    os.utime(cached, (1, 1))
    assert thumbnail(directory, digest, lambda: b"") == first  # made once: the cache answers
    os.unlink(hit.path)
    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([indexed])
    assert not cached.exists()
    with pytest.raises(ValueError):
        thumb_path(directory, "../../etc/passwd")
