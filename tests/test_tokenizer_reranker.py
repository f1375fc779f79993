"""Tokenizer (real ids, never all [UNK]) and the two re-rankers behind one interface."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ldot_testing import official_finetuned

import models
from models.core.errors import CheckpointError, ModelError
from models.nn.config import CROSS_PRESETS
from models.nn.tokenizer import Tokenizer


def test_real_words_get_real_ids_not_unk(vocab_dir):
    tok = Tokenizer.from_path(vocab_dir / "vocab.txt", lowercase=False)
    ids = tok.encode("a dog on the beach")
    assert ids[0] == tok.cls_id == 2 and ids[-1] == tok.sep_id == 3
    vocab = (vocab_dir / "vocab.txt").read_text().split("\n")
    assert [vocab[i] for i in ids[1:-1]] == ["a", "dog", "on", "the", "beach"]
    assert tok.unk_id not in ids
    assert tok.tokenize("dogs") == ["dog", "##s"]


def test_cased_vocab_keeps_case_and_uncased_folds_it(vocab_dir):
    cased = Tokenizer.from_path(vocab_dir / "vocab.txt", lowercase=False)
    uncased = Tokenizer.from_path(vocab_dir / "vocab.txt", lowercase=True)
    assert cased.tokenize("Dog") == ["Dog"]
    assert uncased.tokenize("Dog") == ["dog"]


def test_tokenizer_json_round_trip_and_directory_lookup(tmp_path, vocab_dir):
    tok = Tokenizer.from_path(vocab_dir)
    tok.save(tmp_path)
    again = Tokenizer.from_path(tmp_path)
    assert again.encode("two people sitting on a bench") == tok.encode("two people sitting on a bench")


@pytest.mark.parametrize("text", ["", "a" * 10_000, "dog 🐕 on the beach", "dog\x00\x07\u200b beach", "dog \ud800 x"])
def test_hostile_text_never_crashes(vocab_dir, text):
    tok = Tokenizer.from_path(vocab_dir / "vocab.txt")
    ids, mask = tok.batch([text], max_length=128)
    assert ids.shape[1] <= 128 and ids[0, 0] == tok.cls_id and mask.sum() >= 2


def test_tokenizer_loads_lazily_on_first_encode_text(tmp_path, tiny_model, vocab_dir):
    torch.save(official_finetuned(tiny_model), tmp_path / "ft.pt")
    enc = models.load_bi_encoder(tmp_path / "ft.pt")  # official files imply bert-base-cased: loading needs no network
    with pytest.raises(models.DownloadError, match=r"bert-base-cased.*ldot models import FOLDER --as bert-base-cased"):
        enc.encode_text(["a dog"])  # only the first encode_text looks for the tokenizer
    enc = models.load_bi_encoder(tmp_path / "ft.pt", tokenizer=vocab_dir / "vocab.txt")
    vectors = enc.encode_text(["a dog on the beach", "a cat"])
    assert vectors.shape == (2, 48) and vectors.dtype == torch.float32
    expected = enc.encode_token_ids(torch.tensor([[2, 5, 6, 8, 9, 10, 3]]))
    assert torch.allclose(vectors[0], expected[0], atol=1e-5)


def test_model_without_tokenizer_is_a_clear_error(tiny_model):
    with pytest.raises(ModelError, match="names no tokenizer"):
        tiny_model.encode_text(["a dog"])


# -- UNITER ITM re-ranker -----------------------------------------------------------------------------
def _uniter_state(seed=0, pretrained=True):
    torch.manual_seed(seed)
    model = models.CrossEncoder(CROSS_PRESETS["tiny"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    body = {"uniter." + k[len("bert."):]: v for k, v in model.state_dict().items() if k.startswith("bert.")}
    if pretrained:  # UNITER pre-training heads: 2-way ITM, whose row 1 is "matched"
        body["itm_output.weight"] = torch.randn(2, 128)
        body["itm_output.bias"] = torch.randn(2)
        body["cls.predictions.bias"] = torch.zeros(128)
    else:
        body["rank_output.weight"] = model.rank_output.weight.clone()
        body["rank_output.bias"] = model.rank_output.bias.clone()
        body["itm_output.weight"] = torch.randn(2, 128)
        body["itm_output.bias"] = torch.randn(2)
    return body


def _reference_itm(state, ids, feat, norm_bb, rank_w, rank_b):
    """UNITER ITM by hand: text embeddings + region embeddings, transformers' BERT layers, pooler, Linear."""
    from test_bi_encoder import _hf_bert

    from models.nn.config import CROSS_PRESETS

    cfg = CROSS_PRESETS["tiny"].body
    s = {k.replace("uniter.", ""): v for k, v in state.items()}
    body = {("u." + k): v for k, v in s.items() if not k.startswith(("itm_output", "rank_output", "cls."))}
    hf = _hf_bert(cfg, body, "u.")
    h = cfg.hidden_size

    def ln(x, name):
        return F.layer_norm(x, (h,), s[f"{name}.weight"], s[f"{name}.bias"], 1e-12)

    with torch.no_grad():
        text = hf.embeddings(input_ids=ids)
        box7 = torch.cat([norm_bb, (norm_bb[..., 4] * norm_bb[..., 5])[..., None]], -1)
        img = ln(F.linear(feat, s["img_embeddings.img_linear.weight"], s["img_embeddings.img_linear.bias"]),
                 "img_embeddings.img_layer_norm")
        pos = ln(F.linear(box7, s["img_embeddings.pos_linear.weight"], s["img_embeddings.pos_linear.bias"]),
                 "img_embeddings.pos_layer_norm")
        regions = ln(img + pos + s["embeddings.token_type_embeddings.weight"][1], "img_embeddings.LayerNorm")
        seq = torch.cat([text, regions], 1)
        for layer in hf.encoder.layer:
            seq = layer(seq)
            seq = seq[0] if isinstance(seq, tuple) else seq
        pooled = torch.tanh(F.linear(seq[:, 0], s["pooler.dense.weight"], s["pooler.dense.bias"]))
        return F.linear(pooled, rank_w, rank_b).squeeze(-1)


@pytest.mark.parametrize("pretrained", [True, False])
def test_uniter_reranker_matches_reference(tmp_path, vocab_dir, pretrained):
    state = _uniter_state(pretrained=pretrained)
    torch.save(state, tmp_path / "uniter.pt")
    rr = models.load_reranker(tmp_path / "uniter.pt", tokenizer=vocab_dir / "vocab.txt", device="cpu")
    texts = ["a dog on the beach", "a red car"]
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 5, 32, generator=g).abs()
    xy = torch.rand(2, 5, 2, generator=g) * 0.5
    norm_bb = torch.cat([xy, xy + 0.3, torch.full_like(xy, 0.3)], -1)
    scores = rr.score(texts, feat, norm_bb)
    assert scores.shape == (2,)
    w = state["itm_output.weight"][1:] if pretrained else state["rank_output.weight"]
    b = state["itm_output.bias"][1:] if pretrained else state["rank_output.bias"]
    for i, text in enumerate(texts):
        ids = torch.tensor([rr.tokenizer.encode(text)])
        ref = _reference_itm(state, ids, feat[i:i + 1], norm_bb[i:i + 1], w, b)
        assert torch.allclose(scores[i], ref[0], atol=1e-4), (scores[i], ref)
    # masking padded regions = scoring the shorter set
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    masked = rr.score(texts, feat, norm_bb, mask)
    short = rr.score(texts[1:], feat[1:, :3], norm_bb[1:, :3])
    assert torch.allclose(masked[1], short[0], atol=1e-5)


def test_uniter_converted_dir_scores_the_same(tmp_path, vocab_dir):
    torch.save(_uniter_state(), tmp_path / "uniter-base.pt")
    kind, out = models.convert_checkpoint(tmp_path / "uniter-base.pt", tmp_path / "rr", tokenizer=vocab_dir)
    assert kind == "uniter-itm"
    a = models.load_reranker(tmp_path / "uniter-base.pt", tokenizer=vocab_dir, device="cpu")
    b = models.load_reranker(out, device="cpu")
    feat, bb = torch.rand(1, 4, 32), torch.rand(1, 4, 6)
    assert torch.equal(a.score(["a dog"], feat, bb), b.score(["a dog"], feat, bb))


def test_bi_encoder_dir_is_not_a_reranker(tmp_path, tiny_model):
    torch.save(official_finetuned(tiny_model), tmp_path / "ft.pt")
    _, out = models.convert_checkpoint(tmp_path / "ft.pt", tmp_path / "m")
    with pytest.raises(CheckpointError, match="not a re-ranker"):
        models.load_reranker(out, device="cpu")


# -- LXMERT re-ranker through transformers -------------------------------------------------------------
def test_lxmert_reranker_uses_the_matching_head(tmp_path, vocab_dir):
    from transformers import LxmertConfig, LxmertForPreTraining

    torch.manual_seed(0)
    cfg = LxmertConfig(vocab_size=128, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                       l_layers=1, x_layers=1, r_layers=1, visual_feat_dim=32, num_object_labels=10,
                       num_attr_labels=5, num_qa_labels=3)
    model = LxmertForPreTraining(cfg).eval()
    model.save_pretrained(tmp_path / "lxmert")
    (tmp_path / "lxmert" / "vocab.txt").write_text((vocab_dir / "vocab.txt").read_text())
    rr = models.load_reranker(tmp_path / "lxmert", device="cpu")
    feat, bb = torch.rand(2, 36, 32), torch.rand(2, 36, 6)
    scores = rr.score(["a dog on the beach", "a red car"], feat, bb)
    ids, mask = rr.tokenizer.batch(["a dog on the beach", "a red car"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), visual_feats=feat,
                       visual_pos=bb[..., :4]).cross_relationship_score
    assert torch.allclose(scores, logits[:, 1] - logits[:, 0], atol=1e-5)
    assert rr.tokenizer.tokenize("Dog") == ["dog"]  # LXMERT is uncased
