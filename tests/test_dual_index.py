"""A dual encoder (CLIP, SigLIP) indexes pixels: no detector, the default model, search by text and by image."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from dual_fixtures import install_tiny_dual
from fakes import FakeDetector
from ldot_testing import install_tiny_model, make_photos
from typer.testing import CliRunner

from ldot_cli.index.indexer import Indexer
from ldot_cli.index.layout import index_path
from ldot_cli.index.options import IndexOptions
from ldot_cli.index.search import Request, Searcher
from ldot_cli.index.store import IndexStore


class NoDetector:
    """A detector that must never run."""

    name = "no-detector"

    def extract(self, *args, **kwargs):
        raise AssertionError("the detector ran for an index of a dual encoder")


@pytest.fixture
def clip(one_thread):
    install_tiny_dual("clip-vit-b32", "clip")
    return "clip-vit-b32"


def run_index(folder, name="default", model=None, detector=None, **kw):
    indexer = Indexer(name, IndexOptions(model=model, num_workers=0, batch_size=4), detector=detector or NoDetector())
    return indexer, indexer.run([folder], **kw)


def test_pixels_are_indexed_without_the_detector_and_search_matches_brute_force(tmp_path, clip):
    make_photos(tmp_path / "photos", 10, size=(64, 48))
    _, report = run_index(tmp_path / "photos", model=clip)
    assert (report.found, report.encoded, report.vectors) == (10, 10, 10)
    with IndexStore(index_path("default")) as store:
        meta = store.meta_rows()
        ids, vectors = store.vectors()
    assert meta["model"] == clip and meta["regions"] == "none" and "detector" not in meta
    assert not (index_path("default") / "regions").exists()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # unit vectors: scores are cosines
    searcher = Searcher("default")
    hits = searcher.search("a dog on a beach", k=4)
    query = searcher.text_vector("a dog on a beach")[0]
    order = [int(ids[i]) for i in np.argsort(-(vectors @ query))]
    assert [h.vector_id for h in hits] == order[:4]
    assert all(-1.0 - 1e-5 <= h.score <= 1.0 + 1e-5 for h in hits)


def test_vectors_are_the_encoders_of_the_decoded_photo(tmp_path, clip):
    """What the index stores is the model's vector of ldot's decoding + the model's preprocessing of the file."""
    from feature_extraction.images.decode import load_image
    from models.hub.load import load_bi_encoder

    photo = make_photos(tmp_path / "photos", 1, size=(70, 50))[0]
    run_index(tmp_path / "photos", model=clip)
    encoder = load_bi_encoder(clip)
    pixels, _ = encoder.pixel_preprocess(load_image(photo))
    expected = encoder.encode_images([pixels.numpy()]).numpy()[0]
    with IndexStore(index_path("default")) as store:
        _, vectors = store.vectors()
    assert np.allclose(vectors[0], expected, atol=1e-6)


def test_image_query_encodes_a_new_photo_with_the_dual_encoder(tmp_path, clip):
    make_photos(tmp_path / "photos", 6, size=(64, 48))
    run_index(tmp_path / "photos", model=clip)
    outside = make_photos(tmp_path / "other", 1, start=40, size=(64, 48))[0]
    searcher = Searcher("default")
    answer = searcher.answer(Request(image_path=str(outside), k=3))
    assert len(answer.hits) == 3 and searcher.timings.encode_ms > 0
    inside = sorted((tmp_path / "photos").iterdir())[2]
    again = searcher.answer(Request(image_path=str(inside), k=1))
    assert os.path.samefile(again.hits[0].path, inside)  # an indexed photo finds itself first


def test_regions_request_says_there_are_no_boxes_without_error(tmp_path, clip):
    make_photos(tmp_path / "photos", 4, size=(64, 48))
    run_index(tmp_path / "photos", model=clip)
    searcher = Searcher("default")
    assert not searcher.has_boxes
    with pytest.warns(Warning, match="no region boxes"):
        answer = searcher.answer(Request(text="a cat", k=2, regions=True))
    assert len(answer.hits) == 2 and all(h.regions is None for h in answer.hits)


def test_regions_flag_keeps_region_features_for_a_pixel_index(tmp_path, clip):
    make_photos(tmp_path / "photos", 3, size=(64, 48))
    detector = FakeDetector()
    indexer = Indexer("default", IndexOptions(model=clip, keep_regions=True, num_workers=0, batch_size=4), detector=detector)
    assert indexer.needed_models() == [clip]  # a ready detector object: nothing to download for it
    report = indexer.run([tmp_path / "photos"])
    assert report.encoded == 3 and sum(detector.calls) == 3
    with IndexStore(index_path("default")) as store:
        assert store.meta_rows().get("regions") == "kept"
    # a re-run without the flag keeps what the index has (and runs no model on unchanged files)
    again = Indexer("default", IndexOptions(num_workers=0), detector=FakeDetector())
    assert again.run([tmp_path / "photos"]).unchanged == 3 and again.keep_regions


def test_default_model_is_clip_unless_flickr_ft_is_in_the_cache(tmp_path, vocab_dir, clip):
    make_photos(tmp_path / "photos", 2, size=(64, 48))
    indexer = Indexer("a", IndexOptions(num_workers=0))
    assert indexer.choices()[0] == "clip-vit-b32" and "flickr-ft is not in the cache" in indexer.model_reason
    assert indexer.needed_models() == ["clip-vit-b32"]  # no detector to download
    indexer.detector_arg, indexer._detector = "none", NoDetector()
    indexer.run([tmp_path / "photos"])
    install_tiny_model("flickr-ft", vocab_dir)
    fresh = Indexer("b", IndexOptions(num_workers=0))
    assert fresh.choices()[0] == "flickr-ft" and "is in the cache" in fresh.model_reason
    assert fresh.needed_models() == ["butd-r101-vg", "flickr-ft"]
    rerun = Indexer("a", IndexOptions(num_workers=0))  # a re-run keeps the index's own model
    assert rerun.choices()[0] == "clip-vit-b32" and rerun.model_reason is None


def test_index_command_says_which_model_and_why_and_search_json(tmp_path, clip, monkeypatch):
    from ldot_cli.main import app

    monkeypatch.setenv("LDOT_NO_SERVER", "1")
    make_photos(tmp_path / "photos", 5, size=(64, 48))
    runner = CliRunner()
    result = runner.invoke(app, ["index", str(tmp_path / "photos"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "model: clip-vit-b32 (flickr-ft is not in the cache" in " ".join(result.output.split())
    result = runner.invoke(app, ["search", "a dog", "--json", "-k", "3"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 3 and all(os.path.exists(h["path"]) for h in hits)
    result = runner.invoke(app, ["search", "a dog", "--min-score", "auto"])
    assert result.exit_code != 0 and "--min-score 0.25" in " ".join(result.output.split())
    sheet = tmp_path / "sheet.html"
    result = runner.invoke(app, ["search", "a dog", "-k", "2", "--html", str(sheet)])
    assert result.exit_code == 0, result.output
    assert sheet.is_file() and "no region boxes" in " ".join(result.output.split())
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0 and "clip-vit-b32" in result.output


def test_offline_with_nothing_in_the_cache_names_what_to_download(tmp_path):
    from ldot_cli.main import app

    make_photos(tmp_path / "photos", 2)
    result = CliRunner().invoke(app, ["index", str(tmp_path / "photos")])
    assert result.exit_code != 0
    text = " ".join(result.output.split())
    assert "ldot models download clip-vit-b32" in text and "ldot models import" in text
    assert "butd" not in text  # the detector is not needed


def test_serve_answers_for_a_dual_encoder_index_without_boxes(tmp_path, clip):
    """`ldot serve` of a CLIP index: searches (text and similar images), and says the page has no boxes."""
    import subprocess
    import sys

    import httpx

    from models.core.home import ldot_home

    make_photos(tmp_path / "photos", 5, size=(64, 48))
    run_index(tmp_path / "photos", model=clip)
    env = {**os.environ, "LDOT_HOME": str(ldot_home()), "LDOT_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from ldot_cli.main import run; run()", "serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), proc.stderr.read() if proc.poll() is not None else url
        base = url.split("?")[0].rstrip("/")
        info = httpx.get(f"{base}/api/info", timeout=60).json()
        assert info["model"] == clip and info["regions"] is False and "no region boxes" in info["boxes_note"]
        got = httpx.post(f"{base}/api/search", json={"q": "a dog", "k": 3, "regions": True}, timeout=120)
        assert got.status_code == 200, got.text
        hits = got.json()["hits"]
        assert len(hits) == 3 and not any(h.get("regions") for h in hits)
        similar = httpx.post(f"{base}/api/search", json={"id": hits[0]["id"], "k": 2}, timeout=120).json()
        assert similar["hits"][0]["id"] == hits[0]["id"]  # an image is its own nearest neighbour
        assert "no region boxes" in got.json()["boxes_note"]
        from ldot_cli.main import app

        through = CliRunner().invoke(app, ["search", "a dog", "-k", "2", "--regions", "--paths"])  # the server answers
        assert through.exit_code == 0 and len(through.stdout.splitlines()) == 2
        assert "no region boxes" in " ".join(through.output.split())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
