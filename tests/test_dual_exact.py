"""ldot's dual-encoder vectors are `transformers`' own (``get_text_features`` / ``get_image_features``, then
L2-normalised), and its preprocessing is the model's own image processor's, on real photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dual_fixtures import tiny_dual, write_tiny_dual

from models.core.errors import CheckpointError
from models.hub.dual import load_dual_encoder, pixel_spec

TEXTS = ["a dog on a beach", "A RED CAR in the street", "two dogs play in the snow", "x",
         "a photo of a cat " * 30]  # the last one is longer than either model reads


def _unit(x) -> torch.Tensor:
    x = x if isinstance(x, torch.Tensor) else x.pooler_output
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(params=["clip", "siglip"])
def folder(request, tmp_path, one_thread):
    return write_tiny_dual(tmp_path / request.param, request.param, seed=3), request.param


def _reference_text(model, tokenizer, arch: str, texts) -> torch.Tensor:
    """What `transformers` users write: the tokenizer as the model card says (SigLIP: padded to max_length 64)."""
    if arch == "siglip":
        inputs = tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    else:
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        return _unit(model.get_text_features(**inputs))


def test_text_vectors_equal_get_text_features(folder):
    from transformers import AutoModel, AutoTokenizer

    path, arch = folder
    encoder = load_dual_encoder(path)
    model = AutoModel.from_pretrained(str(path)).eval()
    expected = _reference_text(model, AutoTokenizer.from_pretrained(str(path)), arch, TEXTS)
    got = encoder.encode_text(TEXTS, batch_size=2)  # batching (and its padding) changes nothing
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_truncation_is_at_the_models_own_maximum_and_reported(folder):
    path, arch = folder
    encoder = load_dual_encoder(path)
    assert encoder.max_text_tokens == (64 if arch == "siglip" else 77)
    tokens, limit = encoder.text_tokens(TEXTS[-1])
    assert tokens > limit and limit == encoder.max_text_tokens - (1 if arch == "siglip" else 2)
    short, _ = encoder.text_tokens("a dog")
    assert 0 < short <= limit
    ids = encoder.tokenize([TEXTS[-1], "a dog"])["input_ids"]
    assert ids.shape[1] == encoder.max_text_tokens  # cut there (SigLIP also pads every text to it)
    if arch == "siglip":
        assert encoder.tokenize(["a dog"])["input_ids"].shape[1] == 64


def test_search_warns_when_a_query_is_cut(tmp_path, one_thread):
    from dual_fixtures import install_tiny_dual
    from ldot_testing import make_photos

    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions
    from ldot_cli.index.search import Searcher

    install_tiny_dual("clip-vit-b32")
    make_photos(tmp_path / "p", 2, size=(40, 40))
    Indexer("default", IndexOptions(model="clip-vit-b32", num_workers=0)).run([tmp_path / "p"])
    with pytest.warns(Warning, match="model reads at most 75"):
        Searcher("default").text_vector(TEXTS[-1])


def test_image_vectors_equal_get_image_features(folder):
    from transformers import AutoImageProcessor, AutoModel

    path, _ = folder
    encoder = load_dual_encoder(path)
    model = AutoModel.from_pretrained(str(path)).eval()
    processor = AutoImageProcessor.from_pretrained(str(path))
    rng = np.random.default_rng(0)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in ((40, 60), (90, 33), (32, 32))]
    with torch.no_grad():
        expected = _unit(model.get_image_features(**processor(images=images, return_tensors="pt")))
    pixels = [encoder.pixel_preprocess(im)[0].numpy() for im in images]
    got = encoder.encode_images(pixels, batch_size=2)
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_image_tower_alone_gives_the_same_vectors(folder):
    """What indexing loads (the image tower and its projection, not the text tower) encodes as the whole model."""
    path, _ = folder
    whole, alone = load_dual_encoder(path), load_dual_encoder(path, image_only=True)
    assert alone.image_only and sum(p.numel() for p in alone.parameters()) < sum(p.numel() for p in whole.parameters())
    rgb = (np.random.default_rng(2).random((50, 70, 3)) * 255).astype(np.uint8)
    pixels = whole.pixel_preprocess(rgb)[0].numpy()
    assert torch.allclose(alone.encode_images([pixels]), whole.encode_images([pixels]), atol=1e-6)
    with pytest.raises(RuntimeError, match="image tower only"):
        alone.encode_text(["a dog"])


@pytest.mark.slow
def test_full_size_clip_config_matches_transformers(tmp_path, one_thread):
    """The full ViT-B/32 CLIP (random weights, no download): same vectors as `transformers`, 512-d."""
    model, tokenizer, processor = tiny_dual("clip", seed=1, full=True)
    path = tmp_path / "clip-full"
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    encoder = load_dual_encoder(path)
    texts = TEXTS[:3]
    expected = _reference_text(model, tokenizer, "clip", texts)
    assert torch.allclose(encoder.encode_text(texts), expected, atol=1e-5)
    rgb = (np.random.default_rng(1).random((600, 800, 3)) * 255).astype(np.uint8)
    with torch.no_grad():
        ref = _unit(model.get_image_features(**processor(images=[rgb], return_tensors="pt")))
    got = encoder.encode_images([encoder.pixel_preprocess(rgb)[0].numpy()])
    assert got.shape == (1, 512) and torch.allclose(got, ref, atol=1e-5)


# -- preprocessing on real photos, with the hub's own processor settings ---------------------------------------
# preprocessor_config.json as the hub repositories hold them (openai/clip-vit-base-patch32 keeps the old
# integer sizes; google/siglip-base-patch16-224 resizes to a square, no crop)
HUB_PROCESSORS = {
    "clip": {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
             "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224},
    "siglip": {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
               "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
               "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
               "size": {"height": 224, "width": 224}},
}


def _photos(tmp_path):
    """scikit-image's bundled photographs, written as JPEG / PNG and read back with ldot's own decoding."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (the test extra) holds the real photos")
    from PIL import Image

    from feature_extraction.images.decode import load_image

    out = []
    for name, suffix in (("astronaut", ".jpg"), ("coffee", ".png"), ("chelsea", ".jpg"), ("rocket", ".png"),
                         ("camera", ".png")):  # camera: greyscale, turned to RGB by ldot's decoding
        path = tmp_path / f"{name}{suffix}"
        Image.fromarray(getattr(data, name)()).save(path, quality=90)
        out.append(load_image(path))
    return out


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_preprocessing_equals_the_models_processor_on_real_photos(tmp_path, arch, one_thread):
    from transformers import AutoImageProcessor

    from models.nn.dual import preprocess_pixels

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "preprocessor_config.json").write_text(json.dumps(HUB_PROCESSORS[arch]))
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": arch}))
    processor = AutoImageProcessor.from_pretrained(str(tmp_path / "model"))
    spec = pixel_spec(tmp_path / "model", arch)
    photos = _photos(tmp_path)
    for rgb in photos:
        ours, _ = preprocess_pixels(rgb, spec)
        theirs = processor(images=[rgb], return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape == (3, 224, 224)
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_processor_settings_are_checked_before_use(tmp_path):
    from models.nn.dual import PixelSpec

    defaults = {"do_resize": True, "default_to_square": False, "do_normalize": True, "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3}
    for bad in ({"size": 10 ** 9}, {"size": {"shortest_edge": -3}}, {"size": "big"}, {"image_std": [0, 1, 1]},
                {"image_mean": [1, 2]}, {"resample": 99}, {"do_center_crop": True, "crop_size": {"height": 4}}):
        with pytest.raises(CheckpointError, match="where.json"):
            PixelSpec.from_config({"size": 224, **bad}, defaults, "where.json")


def test_another_architecture_is_refused_in_one_line(tmp_path):
    from models.hub.dual import check_dual_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError) as info:
        check_dual_config(tmp_path / "config.json", "hf:org/bert")
    assert "hf:org/bert is a BertModel model" in str(info.value) and "\n" not in str(info.value)
