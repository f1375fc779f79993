"""Training reaches ViLT: `ldot train decompose --from vilt-flickr30k` (VLDeformer on a
detector-free single-stream model, trained on the image files) and `--distill-from vilt-flickr30k` (a teacher that
scores pairs from pixels), on tiny configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from evalsets import region_arrays, write_image_db
from imagegen import pattern, save
from ldot_testing import (
    WORDS,
    install_tiny_model,
    install_tiny_vilt,
    tiny_vilt,
    write_tiny_vilt,
)
from typer.testing import CliRunner

import models
from ldot_cli.main import app
from models.hub.decompose import (
    decomposed_model,
    read_decompose_source,
    source_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


def _karpathy_with_files(root, n_train: int = 8, n_val: int = 4, region_dim: int | None = None):
    """A Flickr30k Karpathy split (train + val, two captions an image, words the tiny vocabulary knows) with its image
    files (distinct patterns, several shapes); ``region_dim``: also their region features, already in ldot's feature
    cache (what the detector would have written), for a region model."""
    from ldot_cli.data.features import feature_cache_dir
    from ldot_cli.data.retrieval_sets import uniter_image_key

    rng = np.random.default_rng(0)
    folder = root / "flickr30k-images"
    folder.mkdir(parents=True)
    images, sentid = [], 0
    for j in range(n_train + n_val):
        name = f"{2000 + j}.jpg"
        save(pattern(64 + 32 * (j % 2), 64 + 16 * (j % 3), seed=300 + j), folder / name, "JPEG")
        sentences = []
        for _ in range(2):
            sentences.append({"raw": " ".join(rng.choice(WORDS[:40], size=5, replace=False)), "sentid": sentid,
                              "imgid": j})
            sentid += 1
        images.append({"filename": name, "split": "train" if j < n_train else "val", "imgid": j,
                       "sentences": sentences})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    if region_dim is not None:
        records = {uniter_image_key("flickr30k", im["filename"]): region_arrays(j, 6, region_dim)
                   for j, im in enumerate(images)}
        write_image_db(feature_cache_dir(folder), records)
    return folder


def test_the_decomposed_passes_are_vilts_own(tmp_path, vocab_dir):
    """Text alone and patches alone through ViLT's own embeddings and transformer: together, they are
    ViltModel's forward; each vector is unit norm and does not depend on what it is batched with."""
    from transformers import ViltModel

    folder = write_tiny_vilt(tmp_path / "vilt", vocab_dir, seed=1)
    source = read_decompose_source(folder)
    assert source.kind == "vilt"
    tokenizer = source_tokenizer(source)
    model = decomposed_model(source, tokenizer, text_len=16).eval()
    reference = ViltModel(tiny_vilt(seed=1).config).eval()
    reference.load_state_dict(tiny_vilt(seed=1).vilt.state_dict())
    ids, mask = tokenizer.batch(["a dog on the beach", "two people sitting"])
    images = [model.prepare(pattern(96, 64, seed=1)), model.prepare(pattern(64, 128, seed=2))]
    from models.nn.vilt import pad_pixels

    values, pixel_mask = pad_pixels(images)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, pixel_values=values, pixel_mask=pixel_mask)
        got = model.joint_states(ids, mask, values, pixel_mask)
    # ViLT's embedding shuffles an image's patches (and fills missing ones with patches drawn at random, masked):
    # the text positions and the image's [CLS] compare as they are, its real patches as a set (their mean)
    _, image_mask = model.embed_pixels(values, pixel_mask)
    want, n_text = expected.last_hidden_state, ids.shape[1]
    torch.testing.assert_close(got[:, : n_text + 1], want[:, : n_text + 1], atol=1e-5, rtol=0)
    weights = image_mask[:, 1:, None].float()

    def mean(states):
        return (states[:, n_text + 1:] * weights).sum(1) / weights.sum(1)

    torch.testing.assert_close(mean(got), mean(want), atol=1e-5, rtol=0)
    texts = model.encode_text(["a dog on the beach", "two people sitting", "red car"])
    alone = model.encode_text(["two people sitting"])
    pixels = model.encode_pixels(images)
    torch.testing.assert_close(alone[0], texts[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_pixels(images[1:])[0], pixels[1], atol=1e-5, rtol=0)
    assert torch.allclose(texts.norm(dim=1), torch.ones(3)) and torch.allclose(pixels.norm(dim=1), torch.ones(2))
    with pytest.raises(models.ModelError, match="do not apply"):
        decomposed_model(source, tokenizer, max_regions=10)


def test_train_decompose_from_vilt_on_the_image_files_with_its_own_distillation(tmp_path, vocab_dir, ldot_home):
    """`ldot train decompose --from vilt-flickr30k --distill-from vilt-flickr30k` on image files: no detector, the
    result installed as a decomposed-vilt model that encodes texts and photos; resumable."""
    install_tiny_vilt("vilt-flickr30k", vocab_dir, seed=6)
    _karpathy_with_files(tmp_path / "data")
    from ldot_cli.data.training_data import DataSpec
    from ldot_cli.train.driver import TrainRequest, run_training

    # the first steps through the API (stopped after step 2), the rest through the command: a resumed pixel run
    request = TrainRequest("decompose", "dv", DataSpec("flickr30k", tmp_path / "data"), "vilt-flickr30k",
                           overrides=dict(epochs=2, batch_size=4, lr=1e-3, warmup=0.1, distill_from="vilt-flickr30k",
                                          hard_negatives=1, checkpoint_every=1), device="cpu", stop_at_step=2,
                           model_options={"text_len": 12})
    assert not run_training(request).result.finished
    result = runner.invoke(app, ["train", "decompose", "--out", "dv", "--resume", "--data", str(tmp_path / "data"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (ldot_home / "runs" / "dv" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r.get("event") == "step"]
    assert steps and all(np.isfinite(r["tasks"]["distill"]) and np.isfinite(r["tasks"]["itm"]) for r in steps)
    assert any(r.get("event") == "eval" for r in log)
    meta = json.loads((ldot_home / "models" / "dv" / "config.json").read_text())
    assert meta["kind"] == "decomposed-vilt" and meta["config"]["text_len"] == 12
    model = models.load_bi_encoder("dv")
    assert type(model).__name__ == "ViltDecomposedEncoder"
    text = model.encode_text(["a dog on the beach"])
    image = model.encode_rgb([pattern(96, 64, seed=3)])
    assert text.shape == image.shape == (1, 32) and abs(float(text.norm()) - 1) < 1e-5
    from models.training.data import PixelRecord

    torch.testing.assert_close(model.encode_images([PixelRecord(model.prepare(pattern(96, 64, seed=3)))]), image)
    with pytest.raises(models.ModelError, match="reads pixels, not region features"):
        model.encode_images([type("Regions", (), {"features": np.zeros((2, 16))})()])
    # it starts from the source's weights: the first validation is the decomposed source's, not a random model's
    source = decomposed_model(read_decompose_source("vilt-flickr30k"), model.tokenizer, text_len=12)
    assert any(not torch.equal(a, b) for a, b in zip(source.state_dict().values(), model.state_dict().values()))
    # and it indexes photos and answers queries as any model that reads pixels does (no detector)
    from ldot_testing import make_photos

    photos = make_photos(tmp_path / "photos", 3, size=(96, 64))
    result = runner.invoke(app, ["index", str(tmp_path / "photos"), "--model", "dv", "--workers", "0",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    from ldot_cli.index.search import Searcher

    searcher = Searcher("default")
    try:
        hits = searcher.search_vector(model.encode_rgb([pattern(96, 64, seed=1)]).numpy(), k=3)
        assert hits[0].path.decode().endswith(photos[1].name)  # the photo whose pixels they are comes first
        assert len(searcher.search("a dog on the beach", k=3)) == 3
    finally:
        searcher.close()


def test_finetune_a_region_bi_encoder_distilling_vilt_from_the_image_files(tmp_path, vocab_dir, ldot_home):
    """LightningDOT fine-tuning (region features) with ViLT as teacher: ViLT scores the batch's pairs from the image
    files, keyed by the same image keys as the region features."""
    install_tiny_model("tiny", vocab_dir, img_dim=16)
    install_tiny_vilt("vilt-flickr30k", vocab_dir, seed=6)
    _karpathy_with_files(tmp_path / "data", region_dim=16)
    args = ["train", "finetune", "--init", "tiny", "--dataset", "flickr30k", "--data", str(tmp_path / "data"),
            "--out", "ft", "--epochs", "1", "--batch-size", "4", "--lr", "1e-4", "--distill-from", "vilt-flickr30k",
            "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (ldot_home / "runs" / "ft" / "log.jsonl").read_text().splitlines()
             if json.loads(line).get("event") == "step"]
    assert steps and all(r["tasks"]["distill"] > 0 for r in steps)


def test_a_pixel_teacher_scores_the_batchs_pairs_by_image_key(tmp_path, vocab_dir):
    """The teacher's matrix is ViLT's score of (caption j, image of row i) for the first M images."""
    from ldot_cli.train.driver import PixelTeacher
    from models.hub.load import load_reranker

    files = {}
    for j in range(3):
        files[f"k{j}"] = save(pattern(64, 96, seed=j), tmp_path / f"{j}.png")
    vilt = load_reranker(write_tiny_vilt(tmp_path / "vilt", vocab_dir), device="cpu")
    teacher = PixelTeacher(vilt, files)
    texts = ["a dog", "red car", "two people"]
    got = teacher.score_keys(texts * 2, ["k0"] * 3 + ["k2"] * 3)
    from feature_extraction.images.decode import load_image

    expected = vilt.score_images(texts * 2, [load_image(files["k0"])] * 3 + [load_image(files["k2"])] * 3)
    torch.testing.assert_close(got, expected)


def test_a_pixel_model_needs_the_image_files(tmp_path, vocab_dir):
    from evalsets import make_plant, uniter_layout

    from ldot_cli.data.training_data import DataSpec, TrainDataError, open_training_data

    uniter_layout(tmp_path, make_plant([2, 1], [1]))  # region features and a text DB, no image files
    db = tmp_path / "txt_db" / "itm_flickr30k_test_base-cased.db"
    db.rename(db.with_name("itm_flickr30k_train_base-cased.db"))
    tokenizer = source_tokenizer(read_decompose_source(write_tiny_vilt(tmp_path / "vilt", vocab_dir)))
    with pytest.raises(TrainDataError, match="reads pixels"):
        open_training_data(DataSpec("flickr30k", tmp_path), tokenizer, pixels=lambda rgb: rgb)
