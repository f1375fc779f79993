"""`ldot eval` through typer's CliRunner (planted models) and as a real subprocess (tiny random models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from evalsets import (
    PlantedEncoder,
    PlantedReranker,
    expected_recalls,
    make_plant,
    region_arrays,
    uniter_layout,
    write_image_db,
    write_text_db,
)
from ldot_testing import WORDS, official_finetuned
from typer.testing import CliRunner

import models
from ldot_cli.main import app
from models.core.progress import Progress

runner = CliRunner()
PLANT = make_plant([1, 7, 2, 5, 6, 3, 5, 4, 8, 1, 5, 2], [0, 0, 2, 0, 5, 0, 1, 0, 9, 0, 0, 3, 0, 11], seed=4)


@pytest.fixture
def planted(monkeypatch):
    """`models.load_bi_encoder` / `load_reranker` return planted doubles; records what was asked for."""
    asked = {}

    def load_bi_encoder(source, tokenizer=None, device="cpu", **kw):
        asked["model"], asked["device"] = source, device
        return PlantedEncoder(PLANT)

    def load_reranker(source, tokenizer=None, device="auto", **kw):
        asked["reranker"] = source
        return PlantedReranker(PLANT)

    monkeypatch.setattr(models, "load_bi_encoder", load_bi_encoder)
    monkeypatch.setattr(models, "load_reranker", load_reranker)
    return asked


def _figures(section: dict) -> dict:
    return {d: section[d] for d in ("text_to_image", "image_to_text")} | {"rsum": section["rsum"]}


def _approx(got: dict, want: dict) -> None:
    for d in ("text_to_image", "image_to_text"):
        assert got[d] == pytest.approx(want[d]), d
    assert got["rsum"] == pytest.approx(want["rsum"])


def test_help_exits_cleanly():
    result = runner.invoke(app, ["eval", "--help"])
    assert result.exit_code == 0 and "Karpathy" in result.output and "error" not in result.output


def test_cli_json_has_every_figure(tmp_path, planted):
    uniter_layout(tmp_path, PLANT)
    result = runner.invoke(app, ["eval", "flickr30k", "--data", str(tmp_path), "--rerank-k", "3", "--rerank-k", "10",
                                 "--json", "--cross-sample", "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert planted == {"model": "flickr-ft", "device": "cpu", "reranker": "uniter-base"}  # the defaults
    _approx(_figures(rep["recall"]), expected_recalls(PLANT))
    for m in (3, 10):
        _approx(_figures(rep["rerank"][str(m)]), expected_recalls(PLANT, m=m))
    assert rep["num_images"] == 12 and rep["num_captions"] == PLANT.n_txt and rep["text_input"] == "token-ids"
    timing = rep["timing"]
    for key in ("image_encoding_s", "text_encoding_s", "index_build_s", "search_s", "feature_loading_s"):
        assert timing[key] >= 0
    assert set(timing["rerank_s"]) == {"3", "10"} and timing["cross_sample_pairs"] == 20
    assert timing["speedup"] == pytest.approx(timing["cross_full_matrix_s"] / timing["bi_encoder_s"])
    # the registry's flickr-ft is an official checkpoint: its published README row comes along
    assert rep["published"]["setting"].startswith("Flickr30k fine-tuned")
    assert rep["published"]["text_to_image"] == {"r1": 69.9, "r5": 91.1, "r10": 95.18}
    assert rep["published"]["rsum"] == pytest.approx(69.9 + 91.1 + 95.18 + 83.9 + 97.2 + 98.6)


def test_cli_tables(tmp_path, planted):
    uniter_layout(tmp_path, PLANT)
    result = runner.invoke(app, ["eval", "flickr30k", "--data", str(tmp_path), "--model", "mine", "--rerank-k", "5",
                                 "--cross-sample", "8"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    want = expected_recalls(PLANT)
    assert "bi-encoder (ours)" in text and f"{want['text_to_image']['r1']:.2f}" in text
    assert f"{want['rsum']:.2f}" in text and "+ re-rank top 5 (uniter-base)" in text
    assert "published" not in text  # "mine" is not an official checkpoint
    for stage in ("image encoding", "text encoding", "index build", "search", "re-rank top 5"):
        assert stage in text
    assert "cross-encoder alone on all" in text and "speed-up" in text
    assert "score calibration" in text and "not saved" in " ".join(text.split())  # "mine" is no model dir


class NoisyEncoder:
    """Low-dimensional vectors for big sets: images random, captions their image's vector plus noise."""

    def __init__(self, caption_image, dim=8, noise=0.9):
        rng = np.random.default_rng(0)
        self.image_vectors = rng.standard_normal((int(caption_image.max()) + 1, dim)).astype(np.float32)
        self.text_vectors = self.image_vectors[caption_image] + noise * rng.standard_normal(
            (len(caption_image), dim)).astype(np.float32)

    def encode_token_ids(self, input_ids, attention_mask=None):
        return torch.from_numpy(self.text_vectors[np.asarray(input_ids)[:, 1] - 1000])

    def encode_images(self, records, batch_size=64, progress=None):
        if progress:
            progress(Progress("encoding images", len(records), len(records), "images"))
        return torch.from_numpy(self.image_vectors[[int(r.features[0, 0]) for r in records]])


def test_cli_coco_1k_and_save_embeddings(tmp_path, monkeypatch):
    plant = make_plant([2, 3] * 1000, [0], seed=0)  # 2,000 images: two 1K folds
    uniter_layout(tmp_path / "d", plant, "coco", dim=2)
    encoder = NoisyEncoder(plant.caption_image)
    monkeypatch.setattr(models, "load_bi_encoder", lambda *a, **k: encoder)
    result = runner.invoke(app, ["eval", "coco", "--data", str(tmp_path / "d"), "--split", "1k", "--json",
                                 "--save-embeddings", str(tmp_path / "emb")])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["split"] == "1k" and rep["folds"] == 2 and len(rep["fold_recall"]) == 2
    caps = [np.nonzero(plant.caption_image < 1000)[0], np.nonzero(plant.caption_image >= 1000)[0]]
    for n, (got, idx) in enumerate(zip(rep["fold_recall"], caps)):
        t2i, i2t = _brute_force(encoder.text_vectors[idx], encoder.image_vectors[1000 * n:1000 * (n + 1)],
                                plant.caption_image[idx] - 1000 * n)
        assert got["text_to_image"] == pytest.approx(t2i) and got["image_to_text"] == pytest.approx(i2t)
        assert 5 < t2i["r10"] < 95  # a test that could fail
    for d in ("text_to_image", "image_to_text"):
        for k in ("r1", "r5", "r10"):
            assert rep["recall"][d][k] == pytest.approx(np.mean([f[d][k] for f in rep["fold_recall"]]))
    assert rep["published"] is None  # the published COCO row is the 5K test, not 1K
    meta = json.loads((tmp_path / "emb" / "embeddings.json").read_text())
    assert meta["image_keys"][0] == "coco_val2014_000000000500.npz"
    assert meta["image_ids"][0] == "val2014/COCO_val2014_000000000500.jpg"
    assert meta["text_image"] == plant.caption_image.tolist()
    assert np.array_equal(np.load(tmp_path / "emb" / "text_vectors.npy"), encoder.text_vectors)
    assert np.array_equal(np.load(tmp_path / "emb" / "image_vectors.npy"), encoder.image_vectors)


@pytest.mark.parametrize("args, message", [
    (["eval", "flickr30k", "--split", "1k", "--data", "."], "--split 1k is COCO's"),
    (["eval", "coco", "--data", "EMPTY"], "no captions for coco under"),
    (["eval", "multi30k", "--data", "."], "Multi30K needs a bi-encoder"),
    (["eval", "flickr30k", "--data", "DATA", "--rerank-k", "0"], "--rerank-k must be positive"),
])
def test_cli_errors_are_one_line(tmp_path, planted, args, message):
    (tmp_path / "EMPTY").mkdir()
    uniter_layout(tmp_path / "DATA", PLANT)
    args = [str(tmp_path / a) if a in ("EMPTY", "DATA") else a for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------ real tiny models
def _tiny_cross_encoder_dir(tmp_path, vocab_dir):
    from models.nn.config import CROSS_PRESETS

    torch.manual_seed(1)
    model = models.CrossEncoder(CROSS_PRESETS["tiny"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    torch.save(model.state_dict(), tmp_path / "cross.pt")
    _, out = models.convert_checkpoint(tmp_path / "cross.pt", tmp_path / "cross", tokenizer=vocab_dir)
    return out


def _tiny_regions(j):
    rec = region_arrays(j, 10 + j % 3, dim=32)
    rec["features"] = np.abs(rec["features"])  # (n, 32) float16, as stored
    return rec


def _tiny_benchmark(root, tokenizer):
    """A UNITER-layout Flickr30k test set for the tiny models: 12 images, 1-6 captions, 32-d regions."""
    rng = np.random.default_rng(0)
    words = [w for w in WORDS if w.islower()]
    rows, records = [], {}
    for j in range(12):
        key = f"flickr30k_{2000 + j:012d}.npz"
        records[key] = _tiny_regions(j)
        for _ in range(1 + j % 4):
            text = " ".join(rng.choice(words, size=int(rng.integers(3, 9))))
            rows.append({"sentid": len(rows), "raw": text, "input_ids": tokenizer.encode(text)[1:-1],
                         "img_fname": key})
    meta = {"CLS": tokenizer.cls_id, "SEP": tokenizer.sep_id, "MASK": 4, "UNK": 1, "v_range": [5, 128]}
    write_text_db(root / "txt_db" / "itm_flickr30k_test.db", rows, meta)
    write_image_db(root / "img_db" / "flickr30k", records)
    return rows


def _brute_force(text_vectors, image_vectors, text_image):
    """Recalls by the definition, independently of ldot's code: full score matrix, ranks by counting."""
    scores = text_vectors @ image_vectors.T  # (n_txt, n_img)
    text_image = np.asarray(text_image)
    t2i_rank = np.array([(scores[q] > scores[q, text_image[q]]).sum() for q in range(len(scores))])
    i2t_rank = np.array([min((scores[:, j] > scores[q, j]).sum() for q in np.nonzero(text_image == j)[0])
                         for j in range(scores.shape[1])])
    return ({f"r{k}": 100 * float(np.mean(t2i_rank < k)) for k in (1, 5, 10)},
            {f"r{k}": 100 * float(np.mean(i2t_rank < k)) for k in (1, 5, 10)})


@pytest.mark.slow
def test_tiny_models_end_to_end_as_a_subprocess(tmp_path, tiny_model, vocab_dir):
    torch.save(official_finetuned(tiny_model), tmp_path / "tiny.pt")
    _, model_dir = models.convert_checkpoint(tmp_path / "tiny.pt", tmp_path / "tiny", tokenizer=vocab_dir)
    cross_dir = _tiny_cross_encoder_dir(tmp_path, vocab_dir)
    from models.nn.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(vocab_dir)
    rows = _tiny_benchmark(tmp_path / "data", tokenizer)
    cmd = [sys.executable, "-c", "from ldot_cli.main import run; run()", "eval", "flickr30k",
           "--data", str(tmp_path / "data"), "--model", str(model_dir), "--reranker", str(cross_dir),
           "--rerank-k", "5", "--rerank-k", "12", "--json", "--save-embeddings", str(tmp_path / "emb"),
           "--device", "cpu", "--cross-sample", "16", "--batch-size", "7", "--plot", str(tmp_path / "plot.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    text_vectors = np.load(tmp_path / "emb" / "text_vectors.npy")
    image_vectors = np.load(tmp_path / "emb" / "image_vectors.npy")
    meta = json.loads((tmp_path / "emb" / "embeddings.json").read_text())
    assert text_vectors.shape == (len(rows), 48) and image_vectors.shape == (12, 48)
    assert meta["text_ids"] == [str(r["sentid"]) for r in rows] and rep["text_input"] == "token-ids"
    t2i, i2t = _brute_force(text_vectors, image_vectors, meta["text_image"])
    assert rep["recall"]["text_to_image"] == pytest.approx(t2i)
    assert rep["recall"]["image_to_text"] == pytest.approx(i2t)
    # the text DB's ids are what the model's own tokenizer gives the raw captions: same vectors
    model = models.load_bi_encoder(model_dir)
    assert np.allclose(model.encode_text([r["raw"] for r in rows]).numpy(), text_vectors, atol=1e-4)
    # and the image vectors are the model's on the DB's regions (batched with padding there, alone here)
    rec = _tiny_regions(4)
    want = model.encode_regions(rec["features"][None].astype(np.float32), rec["norm_bb"][None].astype(np.float32))
    assert np.allclose(want.numpy()[0], image_vectors[4], atol=1e-4)
    for m in ("5", "12"):
        for d in ("text_to_image", "image_to_text"):
            values = list(rep["rerank"][m][d].values())
            assert values == sorted(values) and all(0 <= v <= 100 for v in values)
    # re-ranking the top 12 = every image: text->image becomes the cross-encoder's own ranking
    rr = models.load_reranker(cross_dir, device="cpu")
    cross = np.zeros((len(rows), 12))
    for j in range(12):
        rec = _tiny_regions(j)
        n = len(rows)
        cross[:, j] = rr.score([r["raw"] for r in rows], np.repeat(rec["features"][None].astype(np.float32), n, 0),
                               np.repeat(rec["norm_bb"][None].astype(np.float32), n, 0)).numpy()
    t2i_cross, _ = _brute_force(cross, np.eye(12), meta["text_image"])
    assert rep["rerank"]["12"]["text_to_image"] == pytest.approx(t2i_cross)
    assert rep["timing"]["rerank_pairs"]["12"] == len(rows) * 12 + 12 * 12
    assert rep["timing"]["cross_full_matrix_s"] > 0 and rep["timing"]["speedup"] > 0
    # the score calibration: stored in the model dir, from the evaluated pairs' scores
    from models.training.calibration import AUTO_QUANTILE, load_calibration

    stored = load_calibration(model_dir)
    scores = text_vectors @ image_vectors.T
    match = np.zeros_like(scores, dtype=bool)
    match[np.arange(len(rows)), meta["text_image"]] = True
    level = float(np.quantile(scores[~match], AUTO_QUANTILE))
    assert stored["auto"]["threshold"] == pytest.approx(level, rel=1e-4, abs=1e-4)
    assert rep["calibration"]["auto_threshold"] == pytest.approx(level, rel=1e-4, abs=1e-4)
    assert rep["calibration"]["match_pass_rate"] == pytest.approx(float(np.mean(scores[match] > level)), abs=1e-6)
    assert rep["calibration"]["saved_to"] == str(model_dir / "calibration.json")
    assert "calibration.json" not in models.hub.installed.hash_dir(model_dir)  # not in the weights' manifest
    from PIL import Image

    plot = Image.open(tmp_path / "plot.png")
    assert plot.size[0] > 1000 and len(plot.convert("RGB").getcolors(1 << 20) or []) > 50


def test_missing_model_as_a_subprocess(tmp_path):
    uniter_layout(tmp_path, PLANT)
    proc = subprocess.run([sys.executable, "-c", "from ldot_cli.main import run; run()", "eval", "flickr30k",
                           "--data", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert "ldot models download flickr-ft" in err
