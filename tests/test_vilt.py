"""ViLT as a re-ranker over pixels: ldot's scores and preprocessing equal transformers' own,
its files are read as tensors only, and what does not fit is refused with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from imagegen import pattern, save
from ldot_testing import VILT_PROCESSOR, MaliciousPayload, tiny_vilt, write_tiny_vilt

from models.core.errors import CheckpointError, UnsafeCheckpointError
from models.hub.load import load_reranker
from models.nn.vilt import PixelPreprocessing, ViltReranker

TEXTS = ["a dog on the beach", "Two people sitting on a bench near a tree", "red car",
         ("a child playing with a white ball in the snow near the big blue water and the grass of the park on a sunny "
          "day with people")]


def _photos() -> list[np.ndarray]:
    """Real photographs (scikit-image's sample data), of several shapes."""
    skdata = pytest.importorskip("skimage.data")
    return [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.hubble_deep_field()]


def _odd_shapes() -> list[np.ndarray]:
    """Portrait, tiny, thin, exactly a multiple of 32, wider than 1333/800."""
    return [pattern(48, 96, seed=1), pattern(16, 8, seed=2), pattern(400, 24, seed=3), pattern(384, 384, seed=4),
            pattern(1000, 200, seed=5)]


def _processor(shortest_edge: int = 384):
    from transformers import ViltImageProcessor

    config = {k: v for k, v in VILT_PROCESSOR.items() if k != "image_processor_type"}
    return ViltImageProcessor(**{**config, "size": {"shortest_edge": shortest_edge}})


def _reference_scores(model, processor, tokenizer, texts, images) -> torch.Tensor:
    """transformers' own: the image processor's batch (padded, with pixel_mask) through the model's forward."""
    batch = processor(images, return_tensors="pt")
    rows = [tokenizer.encode(t, 40) for t in texts]
    from models.nn.tokenizer import pad_ids

    ids, mask = pad_ids(rows, tokenizer.pad_id)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                    pixel_mask=batch["pixel_mask"])
    return out.logits[:, 0]


def test_preprocessing_equals_vilt_image_processor_on_real_photos():
    ours = PixelPreprocessing.from_processor_config(VILT_PROCESSOR)
    assert (ours.shortest_edge, ours.longest_edge, ours.size_divisor) == (384, 639, 32)
    processor = _processor()
    for image in _photos() + [im for im in _odd_shapes() if min(im.shape[:2]) >= 24]:
        expected = processor(image, return_tensors="pt")["pixel_values"][0]
        got = ours(image)
        assert got.shape == expected.shape, image.shape
        assert got.shape[1] % 32 == 0 and got.shape[2] % 32 == 0 and min(got.shape[1:]) <= 384
        assert max(got.shape[1:]) <= 640
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_preprocessing_after_ldot_decoding(tmp_path):
    """The file path: ldot's decoder (EXIF rotation applied), then the processor's arithmetic."""
    from PIL import Image

    from feature_extraction.images.decode import load_image

    photo = _photos()[1]  # 300 x 451
    img = Image.fromarray(photo)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = tmp_path / "cat.png"
    img.save(path, exif=exif)
    decoded = load_image(path)
    assert decoded.shape == (451, 300, 3)  # upright
    ours = PixelPreprocessing.from_processor_config(VILT_PROCESSOR)
    expected = _processor()(np.ascontiguousarray(np.rot90(photo, -1)), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours(decoded), expected, atol=1e-5, rtol=0)


def test_thin_images_keep_one_patch_where_the_processor_would_have_none():
    ours = PixelPreprocessing.from_processor_config(VILT_PROCESSOR)
    assert ours.output_size(16, 4000) == (32, 608)  # 639 at most, cut to a multiple of 32


def test_scores_equal_transformers_forward(tmp_path, vocab_dir, one_thread):
    folder = write_tiny_vilt(tmp_path / "vilt", vocab_dir, seed=3, shortest_edge=64)
    reranker = load_reranker(folder, device="cpu")
    assert isinstance(reranker, ViltReranker) and reranker.inputs == "pixels"
    reference = tiny_vilt(seed=3)
    images = [pattern(96, 64, seed=i) for i in range(3)] + [pattern(48, 128, seed=9)]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(images))]
    got = reranker.score_images(texts, images)
    expected = _reference_scores(reference, _processor(64), reranker.tokenizer, texts, images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got.std() > 1e-3  # distinct pairs, distinct scores
    # a pair scores the same whatever it is batched with (padding is masked), and in batches of any size
    reranker.batch_size = 1
    torch.testing.assert_close(reranker.score_images(texts, images), got, atol=1e-5, rtol=0)


def test_texts_are_lower_cased_and_cut_at_forty_word_pieces(tmp_path, vocab_dir):
    reranker = load_reranker(write_tiny_vilt(tmp_path / "vilt", vocab_dir), device="cpu")
    tok = reranker.tokenizer
    assert tok.encode("Dog") == tok.encode("dog") and tok.unk_id not in tok.encode("Dog")
    rows = reranker.token_rows([TEXTS[3] * 3])
    assert len(rows[0]) == 40 and rows[0][-1] == tok.sep_id
    assert reranker.truncates(TEXTS[3] * 3) and not reranker.truncates(TEXTS[0])


@pytest.mark.slow
def test_full_size_scores_equal_transformers_forward(vocab_dir):
    """ViLT-B/32's own shape (random weights): 12 layers, 768 wide, 384-pixel images."""
    from transformers import ViltConfig, ViltForImageAndTextRetrieval

    from models.nn.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = ViltForImageAndTextRetrieval(ViltConfig(max_position_embeddings=40, vocab_size=30522)).eval()
    tokenizer = Tokenizer.from_path(vocab_dir / "vocab.txt", lowercase=True)
    reranker = ViltReranker(model, tokenizer, PixelPreprocessing.from_processor_config(VILT_PROCESSOR))
    images = _photos()[:3]
    texts = TEXTS[:3]
    expected = _reference_scores(model, _processor(), tokenizer, texts, images)
    torch.testing.assert_close(reranker.score_images(texts, images), expected, atol=1e-5, rtol=0)


def test_pickle_weights_are_read_as_tensors_only(tmp_path, vocab_dir):
    folder = write_tiny_vilt(tmp_path / "vilt", vocab_dir)
    marker = tmp_path / "ran"
    torch.save({"vilt.x": MaliciousPayload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_reranker(folder, device="cpu")
    assert not marker.exists()


def test_what_does_not_fit_is_refused_in_one_line(tmp_path, vocab_dir):
    folder = write_tiny_vilt(tmp_path / "vilt", vocab_dir)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["ViltForQuestionAnswering"]}))
    with pytest.raises(CheckpointError, match="ViltForImageAndTextRetrieval"):
        load_reranker(folder, device="cpu")
    # a config asking for other shapes than the weights have: refused before anything is allocated
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 4096 * 16, "num_attention_heads": 64}))
    with pytest.raises(CheckpointError, match="does not match"):
        load_reranker(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps(config))
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    for bad in ({"size": {"shortest_edge": -1}}, {"image_std": [0.5, 0, 0.5]}, {"resample": "lanczos"},
                {"image_mean": [0.5, "x", 0.5]}, {"size_divisor": 1e9}):
        (folder / "preprocessor_config.json").write_text(json.dumps({**processor, **bad}))
        with pytest.raises(CheckpointError, match="preprocessor_config.json"):
            load_reranker(folder, device="cpu")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        load_reranker(folder, device="cpu")


def test_a_save_pretrained_folder_imports_under_the_registry_name(tmp_path, vocab_dir):
    from models.hub.convert import import_model
    from models.hub.installed import default_reranker, is_present

    folder = write_tiny_vilt(tmp_path / "saved", vocab_dir, pickle=False)  # save_pretrained: model.safetensors
    (folder / "vocab.txt").rename(tmp_path / "vocab.txt")
    with pytest.raises(CheckpointError, match="vocab.txt or tokenizer.json"):
        import_model(folder, "vilt-flickr30k")
    (tmp_path / "vocab.txt").rename(folder / "vocab.txt")
    model = import_model(folder, "vilt-flickr30k")
    assert model.kind == "vilt" and is_present("vilt-flickr30k")
    assert default_reranker(regions=False) == "vilt-flickr30k"
    assert isinstance(load_reranker("vilt-flickr30k", device="cpu"), ViltReranker)


# -- `ldot search --rerank` with ViLT: any index, the photos read as pixels -------------------------------------------
def _index(tmp_path, vocab_dir, keep_regions: bool = True):
    from fakes import FakeDetector
    from ldot_testing import install_tiny_model, make_photos

    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions

    install_tiny_model("tiny", vocab_dir)
    folder = tmp_path / "photos"
    photos = make_photos(folder, 5, size=(96, 64))
    Indexer("default", IndexOptions(model="tiny", num_workers=0, keep_regions=keep_regions), detector=FakeDetector()).run([folder])
    return photos


def test_search_rerank_reads_the_photos_of_a_lightningdot_region_index(tmp_path, vocab_dir, one_thread):
    from ldot_testing import install_tiny_vilt
    from typer.testing import CliRunner

    from feature_extraction.images.decode import load_image
    from ldot_cli.main import app

    photos = _index(tmp_path, vocab_dir)
    install_tiny_vilt("vilt-flickr30k", vocab_dir, seed=5)
    args = ["search", "a dog on the beach", "-k", "3", "--rerank", "--rerank-k", "4", "--device", "cpu", "--json",
            "--reranker", "vilt-flickr30k"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 3
    scores = [h["rerank_score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert "vilt-flickr30k (reading the photos) on the CPU" in " ".join(result.stderr.split())
    expected = load_reranker("vilt-flickr30k", device="cpu").score_images(
        ["a dog on the beach"] * 3, [load_image(h["path"]) for h in hits])
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)
    # a photo gone since indexing: left out, with its reason; the others are still re-ranked
    gone = hits[0]["path"]
    (tmp_path / "photos" / gone.rsplit("/", 1)[1]).unlink()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert gone not in [h["path"] for h in json.loads(result.stdout)]
    assert f"left out of the re-ranked results: {gone} (file not found" in " ".join(result.stderr.split())
    # a photo whose content changed since indexing is not scored as if it were the indexed one
    changed = json.loads(result.stdout)[0]["path"]
    save(pattern(96, 64, seed=77), tmp_path / "photos" / changed.rsplit("/", 1)[1], "PNG")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert changed not in [h["path"] for h in json.loads(result.stdout)]
    assert f"left out of the re-ranked results: {changed} (its content changed" in " ".join(result.stderr.split())
    assert len(photos) == 5


def test_the_default_reranker_is_the_best_present_for_the_index(tmp_path, vocab_dir, one_thread):
    from ldot_testing import install_tiny_reranker, install_tiny_vilt
    from typer.testing import CliRunner

    from ldot_cli.index.search import Searcher
    from ldot_cli.main import app
    from models.core.errors import LdotError

    _index(tmp_path, vocab_dir, keep_regions=False)
    searcher = Searcher("default", device="cpu")
    with pytest.raises(LdotError, match="ldot models download vilt-flickr30k"):
        searcher.reranker_name(None)
    install_tiny_reranker("uniter-base", vocab_dir)  # needs region features: not for this index
    with pytest.raises(LdotError, match="keeps no region features .* `ldot models download vilt-flickr30k`"):
        searcher.reranker_name(None)
    install_tiny_vilt("vilt-coco", vocab_dir)
    assert searcher.reranker_name(None) == "vilt-coco"
    install_tiny_vilt("vilt-flickr30k", vocab_dir)
    assert searcher.reranker_name(None) == "vilt-flickr30k"
    searcher.close()
    result = CliRunner().invoke(app, ["search", "a dog", "-k", "2", "--rerank", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert all(h["rerank_score"] is not None for h in json.loads(result.stdout))


def test_models_download_fetches_the_hub_files_and_the_model_reranks(tmp_path, vocab_dir, monkeypatch):
    """`ldot models download vilt-flickr30k` from a server laid out like the hub (the weights an LFS pickle
    behind a CDN redirect; tokenizer.json absent, as optional), then the model loads and scores."""
    from ldot_testing import http_server, hub_online, hub_repo_files
    from typer.testing import CliRunner

    from ldot_cli.main import app
    from models.hub.installed import is_present, verify_dir

    folder = write_tiny_vilt(tmp_path / "repo", vocab_dir, seed=4)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(files) == {"config.json", "preprocessor_config.json", "pytorch_model.bin", "vocab.txt",
                          "tokenizer_config.json"}
    served = hub_repo_files("dandelin/vilt-b32-finetuned-flickr30k", files, lfs=("pytorch_model.bin",))
    with http_server(served) as srv:
        hub_online(monkeypatch, srv.url)
        result = CliRunner().invoke(app, ["models", "download", "vilt-flickr30k"])
        assert result.exit_code == 0, result.output
    assert is_present("vilt-flickr30k")
    from models.core.home import models_dir

    assert verify_dir(models_dir() / "vilt-flickr30k") == []
    reranker = load_reranker("vilt-flickr30k", device="cpu")
    images = [pattern(96, 64, seed=1), pattern(64, 64, seed=2)]
    expected = load_reranker(folder, device="cpu").score_images(TEXTS[:2], images)
    torch.testing.assert_close(reranker.score_images(TEXTS[:2], images), expected)


def test_serve_reranks_with_vilt_on_an_index_without_regions(tmp_path, vocab_dir, one_thread):
    """`ldot serve`'s API (in process): /api/info names ViLT as the re-ranker of an index without region features,
    and /api/search re-ranks with it as `Searcher.answer` does."""
    from fastapi.testclient import TestClient
    from ldot_testing import install_tiny_vilt

    from ldot_cli.index.search import Request, Searcher
    from ldot_cli.serve.app import ServeState, create_app

    _index(tmp_path, vocab_dir, keep_regions=False)
    install_tiny_vilt("vilt-flickr30k", vocab_dir, seed=2)
    state = ServeState("default", device="cpu")
    client = TestClient(create_app(state), base_url="http://127.0.0.1")
    info = client.get("/api/info").json()
    assert info["regions"] is False and info["reranker"] == "vilt-flickr30k"
    body = {"q": "a dog on the beach", "k": 3, "rerank": True, "rerank_k": 4}
    answer = client.post("/api/search", json=body)
    assert answer.status_code == 200, answer.text
    hits = answer.json()["hits"]
    searcher = Searcher("default", device="cpu")
    expected = searcher.answer(Request(text="a dog on the beach", k=3, rerank_k=4)).hits
    searcher.close()
    state.close()
    assert [h["path"] for h in hits] == [h.path.decode() for h in expected]
    np.testing.assert_allclose([h["rerank_score"] for h in hits], [h.rerank_score for h in expected], atol=1e-5)
