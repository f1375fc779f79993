"""Training from photos: image files -> `ldot extract` (ldot's detector, tiny, random weights) -> a tiny bi-encoder
trained with ldot's trainer -> validation recall far above chance.

The photos carry a strong signal by construction: two 48-pixel shapes (a square or a circle) in two of six
colours on a grey ground; the captions name them. The detector's random-weight features keep the colours, but
they share a large common part (mean of norm 2.0 against 0.12 of spread), which kept a fresh region embedding on
the plateau at ln(batch): every image started as the same vector. Centred on the training features' mean (what
`ldot train` does to a fresh region embedding: `initialization.centre_region_embedding_`), the model learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ldot_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 40), "yellow": (240, 220, 30),
           "white": (250, 250, 250), "black": (10, 10, 10)}
SHAPES = ("square", "circle")


def shape_photos(folder, n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``n`` photos ``img0000.png``... under ``folder``; returns (file name, its two captions) of each."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        c1, c2 = rng.choice(list(COLOURS), 2, replace=False)
        s1, s2 = rng.choice(SHAPES, 2)
        img = Image.new("RGB", (128, 96), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        for colour, shape, x0 in ((c1, s1, 8), (c2, s2, 72)):
            (draw.ellipse if shape == "circle" else draw.rectangle)([x0, 24, x0 + 48, 72], fill=COLOURS[colour])
        name = f"img{i:04d}.png"
        img.save(folder / name)
        out.append((name, [f"a {c1} {s1} and a {c2} {s2}", f"the {c2} {s2} is right of the {c1} {s1}"]))
    return out


def _photo_run(tmp_path, seed: int, centre: bool, n: int = 160, steps: int = 300, std: float = 0.05):
    """(recall before, after, chance) of a tiny bi-encoder trained on photos extracted by `ldot extract`."""
    import learnset
    from ldot_testing import install_tiny_detector

    from feature_extraction.uniter_db import UniterImageDB
    from models.nn.config import preset
    from models.nn.pretraining import BiEncoderForPretraining
    from models.training.data import PairSet, region_feature_mean
    from models.training.initialization import bert_init_, centre_region_embedding_
    from models.training.loop import TrainConfig

    install_tiny_detector("tiny-det")
    items = shape_photos(tmp_path / "photos", n, seed)
    done = runner.invoke(app, ["extract", str(tmp_path / "photos"), "--out", str(tmp_path / "db"), "--detector",
                               "tiny-det", "--workers", "0", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    db = UniterImageDB(tmp_path / "db", "uniter")
    tok = learnset.tokenizer_for(tmp_path / "tok")
    n_val = n // 4

    def pairs(rows: list[tuple[str, list[str]]]) -> PairSet:
        texts = [c for _, caps in rows for c in caps]
        owners = [i for i, (_, caps) in enumerate(rows) for _ in caps]
        return PairSet.from_texts(texts, owners, [name for name, _ in rows], tok)

    val, train = pairs(items[:n_val]), pairs(items[n_val:])
    dim = np.asarray(db[train.image_keys[0]].features).shape[1]
    torch.manual_seed(seed)
    model = BiEncoderForPretraining(replace_img_dim(preset("tiny"), dim), num_region_labels=21)
    bert_init_(model, std)  # BERT's initialisation (wider: see the test): a fresh region embedding
    if centre:
        centre_region_embedding_(model, region_feature_mean(db, train.image_keys))
    r = learnset.run_mode("photos", model, train, val, db, tok,
                          TrainConfig(batch_size=32, lr=1e-3, epochs=None, steps=steps, warmup=0.1, seed=seed))
    return r.before["mean_recall"], r.after["mean_recall"], r.chance["mean_recall"]


def replace_img_dim(config, dim: int):
    from dataclasses import replace

    return replace(config, img_dim=dim)


@pytest.mark.slow  # ~2 min on one core: 160 photos through the tiny detector, 300 steps of a tiny model
def test_a_model_trained_from_photos_through_extraction_beats_chance_by_far(tmp_path):
    """Init std 0.05 rather than BERT's 0.02: a random tiny model at 0.02 leaves the plateau at ln(batch) after a
    seed-dependent while whatever its features (measured here, centred: 14.6 to 73.8 over 4 seeds at 300 steps);
    at 0.05 it leaves it soon when the images differ, and still not when they all look alike (not centred)."""
    before, after, chance = _photo_run(tmp_path, seed=0, centre=True)
    # measured, mean recall on 40 held-out photos (chance 13.0), seeds 0 / 1 / 2: 50.4 / 54.2 / 61.7 centred;
    # not centred, seeds 0 / 1: 17.1 / 15.2
    assert abs(before - chance) < 10 and after > chance + 20, (before, after, chance)
