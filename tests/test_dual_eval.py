"""`ldot eval flickr30k --model clip-vit-b32` on the image files (pixels): no detector, no feature cache."""

from __future__ import annotations

import json

import numpy as np
from dual_fixtures import install_tiny_dual
from ldot_testing import make_photos
from typer.testing import CliRunner

from ldot_cli.main import app

CAPTIONS = ["a dog on a beach", "a cat on a sofa", "two dogs play in the snow", "a red car in the street",
            "people walk by the sea", "a photo of a cat", "the dog runs", "a car in the snow"]


def _flickr(root, n_images=8, per_image=2):
    photos = make_photos(root / "src", n_images, size=(72, 56))
    (root / "flickr30k-images").mkdir(parents=True)
    images = []
    for j, photo in enumerate(photos):
        photo.rename(root / "flickr30k-images" / f"{1000 + j}.jpg")  # PNG bytes: decoded by content, not name
        sentences = [{"raw": CAPTIONS[(j + i) % len(CAPTIONS)] + f" {i}", "tokens": [], "sentid": 10 * j + i,
                      "imgid": j} for i in range(per_image)]
        images.append({"filename": f"{1000 + j}.jpg", "split": "test", "imgid": j, "sentences": sentences})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def _recall_at(ranks, k):
    return 100.0 * float(np.mean(np.asarray(ranks) < k))


def test_eval_on_pixels_matches_recalls_computed_by_hand(tmp_path, one_thread):
    from feature_extraction.images.decode import load_image
    from models.core.home import features_dir
    from models.hub.load import load_bi_encoder

    install_tiny_dual("clip-vit-b32", "clip", seed=2)
    root = _flickr(tmp_path / "flickr")
    result = CliRunner().invoke(app, ["eval", "flickr30k", "--data", str(root), "--model", "clip-vit-b32", "--json",
                                      "--batch-size", "3", "--workers", "0"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["text_input"] == "raw-text" and rep["num_images"] == 8 and rep["num_captions"] == 16
    assert rep["timing"]["feature_extraction_s"] == 0.0
    assert not features_dir().exists() or not any(features_dir().iterdir())  # no detector features were made
    # by hand: the model's vectors of ldot's decoding, exact scores, the official recall definitions
    encoder = load_bi_encoder("clip-vit-b32")
    meta = json.loads((root / "dataset_flickr30k.json").read_text())["images"]
    texts = [s["raw"] for im in meta for s in im["sentences"]]
    owner = np.array([j for j, im in enumerate(meta) for _ in im["sentences"]])
    text = encoder.encode_text(texts).numpy()
    image = encoder.encode_images([encoder.pixel_preprocess(load_image(root / "flickr30k-images" / im["filename"]))[0]
                                   .numpy() for im in meta]).numpy()
    scores = text @ image.T
    t2i = [int(np.sum(scores[q] > scores[q, owner[q]])) for q in range(len(texts))]
    i2t = [min(int(np.sum(scores[:, j] > scores[q, j])) for q in np.nonzero(owner == j)[0]) for j in range(8)]
    for k in (1, 5):
        assert abs(rep["recall"]["text_to_image"][f"r{k}"] - _recall_at(t2i, k)) < 1e-6
        assert abs(rep["recall"]["image_to_text"][f"r{k}"] - _recall_at(i2t, k)) < 1e-6
    assert rep["calibration"]["saved_to"].endswith("calibration.json")  # --min-score auto, on the model's scale


def test_eval_of_a_pixel_model_without_image_files_says_what_to_give(tmp_path, one_thread):
    from evalsets import make_plant, uniter_layout

    install_tiny_dual("clip-vit-b32", "clip")
    root = uniter_layout(tmp_path / "uniter", make_plant([2] * 4, [1] * 4))
    result = CliRunner().invoke(app, ["eval", "flickr30k", "--data", str(root), "--model", "clip-vit-b32"])
    assert result.exit_code != 0
    assert "needs the benchmark's image files" in " ".join(result.output.split())
