"""`ldot eval ... --rerank-k M --reranker vilt-flickr30k`: re-ranking reads the benchmark's image files,
on the LightningDOT path (region features for the bi-encoder, pixels for ViLT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from evalsets import PlantedEncoder, flickr_name, karpathy_layout, make_plant
from imagegen import pattern, save
from ldot_testing import WORDS, install_tiny_model, install_tiny_vilt

from ldot_cli.data.errors import DatasetError
from ldot_cli.data.retrieval_sets import DataPaths, locate
from ldot_cli.eval.evaluation import evaluate
from models.hub.load import load_reranker
from models.training.metrics import KS


def _dataset(root, plant):
    """A Karpathy Flickr30k test split whose images are real files (distinct patterns, several shapes) and whose
    region features are already in the feature cache (no detector here)."""
    karpathy_layout(root, plant)
    data = json.loads((root / "dataset_flickr30k.json").read_text())
    rng = np.random.default_rng(0)
    for entry in data["images"]:  # captions of words the tiny vocabulary knows: distinct pairs, distinct scores
        for sentence in entry["sentences"]:
            sentence["raw"] = " ".join(rng.choice(WORDS[:40], size=6, replace=False))
    (root / "dataset_flickr30k.json").write_text(json.dumps(data))
    folder = root / "flickr30k-images"
    for j in range(plant.n_img):
        save(pattern(64 + 16 * (j % 3), 48 + 8 * (j % 2), seed=100 + j), folder / flickr_name(j), "JPEG")
    return folder


def _recalls(ranked_images, ranked_texts, caption_image):
    t2i = [int(np.nonzero(row == caption_image[q])[0][0]) for q, row in enumerate(ranked_images)]
    i2t = [min(int(np.nonzero(caption_image[row] == j)[0][0]) if (caption_image[row] == j).any() else 99, 99)
           for j, row in enumerate(ranked_texts)]
    return {"text_to_image": {f"r{k}": 100.0 * float(np.mean(np.array(t2i) < k)) for k in KS},
            "image_to_text": {f"r{k}": 100.0 * float(np.mean(np.array(i2t) < k)) for k in KS}}


def test_rerank_with_vilt_scores_the_image_files(tmp_path, vocab_dir, one_thread):
    from feature_extraction.images.decode import load_image

    plant = make_plant([2, 1, 3, 2, 1, 2], [1, 0, 2, 3, 0], seed=3)
    folder = _dataset(tmp_path, plant)
    rset = locate("flickr30k", DataPaths(data=tmp_path))
    from ldot_cli.data.features import feature_cache_dir

    rset.image_db = feature_cache_dir(folder)
    install_tiny_vilt("vilt-flickr30k", vocab_dir, seed=2)
    vilt = load_reranker("vilt-flickr30k", device="cpu")
    m = 3
    encoder = PlantedEncoder(plant)
    encoder.by_text = {c.text: int(c.id) - 7000 for c in rset.captions}  # the captions rewritten above
    report = evaluate(rset, encoder, reranker=vilt, rerank_ks=(m,), cross_sample=5)
    # the expected: the bi-encoder's order, its top m re-sorted by ViLT's score of (caption, image file)
    texts = [c.text for c in rset.captions]
    images = [load_image(folder / flickr_name(j)) for j in range(plant.n_img)]
    cross = np.array([[float(vilt.score_images([t], [im])[0]) for im in images] for t in texts])
    for grid in (cross, cross.T):  # no near-ties for float noise to break within a query's candidates
        gaps = np.diff(np.sort(grid, axis=1), axis=1)
        assert gaps.min() > 1e-6  # float noise of batching is ~1e-8 here
    scores = plant.scores
    ranked_images = np.argsort(-scores, axis=1, kind="stable")
    ranked_texts = np.argsort(-scores.T, axis=1, kind="stable")
    before = ranked_images.copy()
    for rows, cross_rows in ((ranked_images, cross), (ranked_texts, cross.T)):
        for q, row in enumerate(rows):
            top = row[:m]
            rows[q, :m] = top[np.argsort(-cross_rows[q, top], kind="stable")]
    expected = _recalls(ranked_images, ranked_texts, plant.caption_image)
    assert (before != ranked_images).any()  # ViLT's scores do reorder: the test can tell re-ranking happened
    got = report.reranked[m].to_dict()
    for direction in ("text_to_image", "image_to_text"):
        assert got[direction] == pytest.approx(expected[direction])
    assert report.timings.rerank_pairs[m] == (plant.n_txt + plant.n_img) * m
    assert report.timings.cross_sample_pairs == 5


def test_a_pixel_reranker_needs_the_image_files(tmp_path, vocab_dir):
    from evalsets import uniter_layout

    plant = make_plant([2, 1, 3], [1, 0], seed=1)
    uniter_layout(tmp_path, plant)
    rset = locate("flickr30k", DataPaths(data=tmp_path))
    install_tiny_vilt("vilt-flickr30k", vocab_dir)
    with pytest.raises(DatasetError, match="reads the image files"):
        evaluate(rset, PlantedEncoder(plant), reranker=load_reranker("vilt-flickr30k", device="cpu"), rerank_ks=(2,))


def test_ldot_eval_reranks_with_vilt_end_to_end(tmp_path, vocab_dir, one_thread):
    """The command, with a tiny LightningDOT bi-encoder as first stage: recalls re-ranked, and on the CPU a line
    saying how long re-ranking will take before it starts."""
    from typer.testing import CliRunner

    from ldot_cli.main import app

    plant = make_plant([2, 1, 3, 2, 1, 2], [1, 0, 2, 3, 0], seed=3)
    _dataset(tmp_path, plant)
    install_tiny_model("tiny", vocab_dir, img_dim=16)
    install_tiny_vilt("vilt-flickr30k", vocab_dir)
    result = CliRunner().invoke(app, ["eval", "flickr30k", "--data", str(tmp_path), "--model", "tiny", "--rerank-k",
                                      "4", "--reranker", "vilt-flickr30k", "--device", "cpu", "--cross-sample", "8",
                                      "--json"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["reranker"] == "vilt-flickr30k" and set(data["rerank"]) == {"4"}
    assert data["timing"]["rerank_pairs"]["4"] == (plant.n_txt + plant.n_img) * 4
    assert data["timing"]["cross_per_pair_s"] > 0
    pairs = (plant.n_txt + plant.n_img) * 4 + 8
    assert (f"re-ranking with vilt-flickr30k (reading the image files) on the CPU (no GPU): {pairs} pairs, expect "
            "roughly") in " ".join(result.stderr.split())
