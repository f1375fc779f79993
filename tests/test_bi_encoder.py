"""The bi-encoder against a hand-mapped reference of the same weights, in every official layout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from ldot_testing import MaliciousPayload, official_finetuned, official_pretrained

import models
from models.core.errors import CheckpointError, UnsafeCheckpointError
from models.hub.formats import FORMAT_VERSION, infer_bi_encoder_config


# -- an independent reference: transformers' BertModel + the UNITER embedding written out by hand ----
def _hf_bert(cfg, state: dict, prefix: str):
    from transformers import BertConfig, BertModel

    hf = BertModel(BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                              intermediate_size=cfg.intermediate_size, hidden_act="gelu",
                              max_position_embeddings=cfg.max_position_embeddings,
                              type_vocab_size=cfg.type_vocab_size, layer_norm_eps=1e-12,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                   add_pooling_layer=True)
    hf.set_attn_implementation("eager")
    body = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)
            and not k[len(prefix):].startswith("img_embeddings.") and not k.endswith("position_ids")}
    missing, unexpected = hf.load_state_dict(body, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return hf.eval()


def _project(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    s = {k: v.float() for k, v in state.items()}
    x = F.linear(x, s[prefix + "0.weight"], s[prefix + "0.bias"])
    x = F.gelu(x)
    x = F.layer_norm(x, (x.shape[-1],), s[prefix + "2.weight"], s[prefix + "2.bias"], 1e-12)
    return F.linear(x, s[prefix + "3.weight"], s[prefix + "3.bias"])


def reference_text(cfg, state, ids, mask):
    hf = _hf_bert(cfg.text, state, "txt_model.bert.")
    with torch.no_grad():
        cls = hf(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        return _project(state, "txt_model.encode_proj.", cls)


def reference_image(cfg, state, feat, norm_bb, mask):
    s = {k: v.float() for k, v in state.items()}
    p = "img_model.bert."
    eps = 1e-12
    h = cfg.image.hidden_size

    def ln(x, name):
        return F.layer_norm(x, (h,), s[f"{p}{name}.weight"], s[f"{p}{name}.bias"], eps)

    hf = _hf_bert(cfg.image, state, p)
    with torch.no_grad():
        cls = s[p + "embeddings.word_embeddings.weight"][cfg.cls_token_id] \
            + s[p + "embeddings.position_embeddings.weight"][0] + s[p + "embeddings.token_type_embeddings.weight"][0]
        cls = ln(cls, "embeddings.LayerNorm").expand(feat.shape[0], 1, h)
        box7 = torch.cat([norm_bb, (norm_bb[..., 4] * norm_bb[..., 5])[..., None]], -1)
        img = ln(F.linear(feat, s[p + "img_embeddings.img_linear.weight"], s[p + "img_embeddings.img_linear.bias"]),
                 "img_embeddings.img_layer_norm")
        pos = ln(F.linear(box7, s[p + "img_embeddings.pos_linear.weight"], s[p + "img_embeddings.pos_linear.bias"]),
                 "img_embeddings.pos_layer_norm")
        regions = ln(img + pos + s[p + "embeddings.token_type_embeddings.weight"][1], "img_embeddings.LayerNorm")
        hidden = torch.cat([cls, regions], 1)
        full_mask = torch.cat([torch.ones(feat.shape[0], 1), mask.float()], 1)
        ext = (1.0 - full_mask[:, None, None, :]) * -10000.0
        seq = hidden
        for layer in hf.encoder.layer:
            seq = layer(seq, attention_mask=ext)
            seq = seq[0] if isinstance(seq, tuple) else seq
        return _project(state, "img_model.encode_proj.", seq[:, 0])


def _inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.text.vocab_size, (3, 9), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    tmask = torch.ones_like(ids)
    tmask[1, 6:] = 0
    feat = torch.randn(3, 7, cfg.img_dim, generator=g).abs()
    xy = torch.rand(3, 7, 2, generator=g) * 0.5
    wh = torch.rand(3, 7, 2, generator=g) * 0.5
    norm_bb = torch.cat([xy, xy + wh, wh], -1)
    rmask = torch.ones(3, 7, dtype=torch.bool)
    rmask[0, 4:] = False
    return ids, tmask, feat, norm_bb, rmask


@pytest.mark.parametrize("layout", ["finetuned", "pretrained"])
def test_official_layouts_match_hand_mapped_reference(tmp_path, tiny_model, layout):
    obj = official_finetuned(tiny_model) if layout == "finetuned" else official_pretrained(tiny_model)
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    enc = models.load_bi_encoder(path)
    ref_state = obj["model_dict"] if layout == "finetuned" else {
        k[5:].replace("gamma", "weight").replace("beta", "bias"): v for k, v in obj.items() if k.startswith("bert.")}
    cfg = enc.config
    ids, tmask, feat, norm_bb, rmask = _inputs(cfg)
    ours_t = enc.encode_token_ids(ids, tmask)
    ours_i = enc.encode_regions(feat, norm_bb, rmask)
    ref_t = reference_text(cfg, ref_state, ids, tmask)
    ref_i = reference_image(cfg, ref_state, feat, norm_bb, rmask)
    assert ours_t.shape == (3, cfg.project_dim) and ours_i.shape == (3, cfg.project_dim)
    assert torch.allclose(ours_t, ref_t, atol=1e-4, rtol=1e-4), (ours_t - ref_t).abs().max()
    assert torch.allclose(ours_i, ref_i, atol=1e-4, rtol=1e-4), (ours_i - ref_i).abs().max()
    # the reference is sensitive: other weights give other vectors
    assert not torch.allclose(ref_i[0], ref_i[1], atol=1e-2)


def test_pretrained_fp16_drops_heads_and_equals_finetuned_of_same_weights(tmp_path, tiny_model):
    half = {k: v.half().float() for k, v in tiny_model.state_dict().items()}
    tiny_model.load_state_dict(half)
    torch.save(official_pretrained(tiny_model), tmp_path / "pre.pt")
    torch.save(official_finetuned(tiny_model), tmp_path / "ft.pt")
    a = models.load_bi_encoder(tmp_path / "pre.pt")
    b = models.load_bi_encoder(tmp_path / "ft.pt")
    ids, tmask, feat, norm_bb, rmask = _inputs(a.config)
    assert torch.equal(a.encode_token_ids(ids, tmask), b.encode_token_ids(ids, tmask))
    assert torch.equal(a.encode_regions(feat, norm_bb, rmask), b.encode_regions(feat, norm_bb, rmask))


def test_config_is_inferred_from_shapes(tiny_model):
    cfg = infer_bi_encoder_config(tiny_model.state_dict())
    assert cfg.text.hidden_size == 128 and cfg.text.num_heads == 2  # hidden / 64, the BERT convention
    assert cfg.text.num_layers == 2 and cfg.image.vocab_size == 128 and cfg.img_dim == 32
    assert cfg.project_dim == 48


def test_padding_does_not_change_vectors(tiny_model):
    ids, tmask, feat, norm_bb, rmask = _inputs(tiny_model.config)
    full = tiny_model.encode_regions(feat, norm_bb, rmask)
    alone = tiny_model.encode_regions(feat[:1, :4], norm_bb[:1, :4])
    assert torch.allclose(full[0], alone[0], atol=1e-5)
    t_full = tiny_model.encode_token_ids(ids, tmask)
    t_alone = tiny_model.encode_token_ids(ids[1:2, :6])
    assert torch.allclose(t_full[1], t_alone[0], atol=1e-5)


def test_bad_region_shapes_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="norm_bb"):
        tiny_model.encode_regions(torch.zeros(1, 3, 32), torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="expects 32"):
        tiny_model.encode_regions(torch.zeros(1, 3, 2048), torch.zeros(1, 3, 6))


# -- strictness -----------------------------------------------------------------------------------
def test_missing_key_is_an_error_that_names_it(tmp_path, tiny_model):
    obj = official_finetuned(tiny_model)
    del obj["model_dict"]["img_model.bert.img_embeddings.pos_linear.bias"]
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"1 missing: img_model\.bert\.img_embeddings\.pos_linear\.bias"):
        models.load_bi_encoder(tmp_path / "x.pt")


def test_unexpected_key_is_an_error_that_names_it(tmp_path, tiny_model):
    obj = official_finetuned(tiny_model)
    obj["model_dict"]["txt_model.extra_head.weight"] = torch.zeros(2)
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected: txt_model\.extra_head\.weight"):
        models.load_bi_encoder(tmp_path / "x.pt")


def test_wrong_shape_is_an_error(tmp_path, tiny_model):
    obj = official_finetuned(tiny_model)
    obj["model_dict"]["img_model.encode_proj.2.weight"] = torch.zeros(7)
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="another shape"):
        models.load_bi_encoder(tmp_path / "x.pt")


def test_unknown_pretraining_key_is_not_silently_dropped(tmp_path, tiny_model):
    obj = official_pretrained(tiny_model)
    obj["mystery.weight"] = torch.zeros(1)
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="mystery.weight"):
        models.load_bi_encoder(tmp_path / "x.pt")


# -- safety ------------------------------------------------------------------------------------------
def test_malicious_pickle_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model_dict": MaliciousPayload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        models.load_bi_encoder(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_empty_truncated_or_garbage_files_are_clear_errors(tmp_path, tiny_model, content):
    path = tmp_path / "bad.pt"
    if content is None:  # a real checkpoint cut in half
        torch.save(official_finetuned(tiny_model), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt"):
        models.load_bi_encoder(path)


def test_uniter_checkpoint_is_not_taken_for_a_bi_encoder(tmp_path, tiny_model):
    state = {"uniter." + k[len("img_model.bert."):]: v for k, v in tiny_model.state_dict().items()
             if k.startswith("img_model.bert.")}
    torch.save(state, tmp_path / "uniter.pt")
    with pytest.raises(CheckpointError, match="re-ranker"):
        models.load_bi_encoder(tmp_path / "uniter.pt")


# -- conversion ------------------------------------------------------------------------------------
def test_conversion_writes_a_self_describing_dir_that_loads_identically(tmp_path, tiny_model, vocab_dir):
    torch.save(official_pretrained(tiny_model), tmp_path / "LightningDot.pt")
    kind, out = models.convert_checkpoint(tmp_path / "LightningDot.pt", tmp_path / "converted",
                                          tokenizer=vocab_dir / "vocab.txt")
    assert kind == "bi-encoder"
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "ldot-model" and meta["format_version"] == FORMAT_VERSION
    assert meta["source"]["format"] == "lightningdot-pretrained" and len(meta["source"]["sha256"]) == 64
    raw = models.load_bi_encoder(tmp_path / "LightningDot.pt")
    conv = models.load_bi_encoder(out)
    _ids, _tmask, feat, norm_bb, rmask = _inputs(raw.config)
    assert torch.equal(raw.encode_regions(feat, norm_bb, rmask), conv.encode_regions(feat, norm_bb, rmask))
    # the bundled tokenizer travels with the model dir
    assert torch.equal(conv.encode_text(["a dog on the beach"]), raw.encode_token_ids(
        torch.tensor([conv.tokenizer.encode("a dog on the beach")])))


def test_newer_format_version_is_refused_with_advice(tmp_path, tiny_model):
    torch.save(official_finetuned(tiny_model), tmp_path / "ft.pt")
    _, out = models.convert_checkpoint(tmp_path / "ft.pt", tmp_path / "m")
    meta = json.loads((out / "config.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="newer ldot"):
        models.load_bi_encoder(out)


def test_registry_name_not_downloaded_says_how_to_get_it():
    with pytest.raises(models.ModelNotFoundError, match="ldot models download flickr-ft"):
        models.load_bi_encoder("flickr-ft")


def test_gpu_path_when_available(tiny_model):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (the GPU path is exercised on the device machine)")
    gpu = tiny_model.to("cuda")
    _ids, _tmask, feat, norm_bb, rmask = _inputs(gpu.config)
    assert torch.allclose(gpu.encode_regions(feat, norm_bb, rmask).cpu(),
                          tiny_model.cpu().encode_regions(feat, norm_bb, rmask), atol=1e-4)


def test_encode_images_batches_ragged_region_sets_in_input_order(tiny_model):
    from feature_extraction.types import RegionFeatures

    g = torch.Generator().manual_seed(5)
    records = []
    for n in (7, 3, 10, 3, 1):
        f = torch.randn(n, 32, generator=g).abs().numpy()
        bb = torch.rand(n, 6, generator=g).numpy()
        records.append(RegionFeatures(f, bb[:, :4], bb, bb[:, 0], bb[:, 0].astype(int), bb[:, 0].astype(int),
                                      bb[:, 0], (10, 10)))
    seen = []
    batched = tiny_model.encode_images(records, batch_size=2, progress=seen.append)
    assert [(p.done, p.total) for p in seen] == [(2, 5), (4, 5), (5, 5)]
    for i, r in enumerate(records):
        alone = tiny_model.encode_regions(r.features[None], r.norm_bb[None])
        assert torch.allclose(batched[i], alone[0], atol=1e-5)


def test_text_tower_alone_loads_half_and_encodes_identically(tmp_path, tiny_model):
    torch.save(official_finetuned(tiny_model), tmp_path / "ft.pt")
    both = models.load_bi_encoder(tmp_path / "ft.pt")
    text = models.load_bi_encoder(tmp_path / "ft.pt", towers=("text",))
    ids = torch.tensor([[2, 5, 6, 3]])
    assert torch.equal(both.encode_token_ids(ids), text.encode_token_ids(ids))
    assert all(p.is_meta for p in text.img_model.parameters())
    with pytest.raises(RuntimeError, match="text tower only"):
        text.encode_regions(torch.zeros(1, 2, 32), torch.zeros(1, 2, 6))


@pytest.mark.parametrize("rows", [1, 11, 32, 33, 200])
def test_fast_linear_equals_plain_linear_in_every_regime(rows):
    """Few-row inference takes oneDNN, the rest MKL, training autograd: the same numbers all three ways."""
    from models.nn import layers

    torch.manual_seed(rows)
    lin = layers.Linear(48, 40)
    x = torch.randn(1, rows, 48)
    expected = torch.nn.functional.linear(x, lin.weight, lin.bias)
    with torch.inference_mode():
        assert torch.allclose(lin(x), expected, atol=1e-5)
        assert torch.allclose(lin(x.transpose(0, 1)).transpose(0, 1), expected, atol=1e-5)  # non-contiguous input
    out = lin(x)  # grad enabled: the plain path, differentiable
    out.sum().backward()
    assert lin.weight.grad is not None and torch.allclose(out, expected, atol=1e-6)
    no_bias = layers.Linear(48, 40, bias=False)
    with torch.no_grad():
        assert torch.allclose(no_bias(x), x @ no_bias.weight.T, atol=1e-5)
    assert layers._onednn_ok == torch.backends.mkldnn.is_available()  # the fast path ran without falling back
