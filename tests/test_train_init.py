"""Initialisation from live weights: the Hugging Face BERT converter, UNITER, and whole bi-encoders."""

from __future__ import annotations

import pytest
import torch
from ldot_testing import tiny_hf_bert_state, write_tiny_hf_bert

from models.core.errors import CheckpointError, ModelError
from models.hub.formats import load_strict
from models.nn.config import TINY
from models.nn.layers import BertBody
from models.nn.pretraining import BiEncoderForPretraining
from models.training.initialization import (
    hf_bert_body,
    initial_model,
    read_source,
    source_tokenizer,
    uniter_body,
)


@pytest.mark.parametrize("legacy", [False, True])
def test_hf_bert_converter_gives_our_body_the_same_outputs(legacy):
    from transformers import BertConfig, BertModel

    state = tiny_hf_bert_state(seed=1, legacy_names=legacy)
    body, head = hf_bert_body(state)
    assert set(head) == {"predictions.bias", "predictions.transform.dense.weight", "predictions.transform.dense.bias",
                         "predictions.transform.LayerNorm.weight", "predictions.transform.LayerNorm.bias"}
    ours = BertBody(TINY)
    load_strict(ours, body)
    from ldot_testing import TINY_HF_CONFIG

    hf = BertModel(BertConfig(**{**TINY_HF_CONFIG, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    hf.load_state_dict({k[len("bert."):]: v for k, v in tiny_hf_bert_state(seed=1).items() if k.startswith("bert.")},
                       strict=False)
    ids = torch.randint(5, 128, (2, 7))
    with torch.no_grad():
        assert torch.allclose(ours.eval()(ids), hf.eval()(input_ids=ids).last_hidden_state, atol=1e-5)


def test_hf_bert_converter_takes_a_bare_bertmodel_and_refuses_strangers():
    bare = {k[len("bert."):]: v for k, v in tiny_hf_bert_state().items() if k.startswith("bert.")}
    body, head = hf_bert_body(bare)
    assert "embeddings.word_embeddings.weight" in body and not head
    with pytest.raises(CheckpointError, match="unexpected key 'classifier.weight'"):
        hf_bert_body({**bare, "classifier.weight": torch.zeros(2, 128)})


def test_init_from_bert_alone_fills_both_towers_and_the_mlm_head(ldot_home):
    write_tiny_hf_bert(ldot_home / "models" / "bert-base-cased")
    model, report = initial_model("bert-base-cased", img_dim=32, num_region_labels=11)
    hub = tiny_hf_bert_state(legacy_names=False)
    for tower in (model.bert.txt_model.bert, model.bert.img_model.bert):
        assert torch.equal(tower.encoder.layer[1].output.dense.weight, hub["bert.encoder.layer.1.output.dense.weight"])
        assert torch.equal(tower.embeddings.word_embeddings.weight, hub["bert.embeddings.word_embeddings.weight"])
    # fresh parts get BERT's init: projections N(0, 0.02), LayerNorms 1/0, mask embedding row 0 zero
    proj = model.bert.txt_model.encode_proj
    assert proj[0].weight.std().item() == pytest.approx(0.02, rel=0.1) and torch.all(proj[0].bias == 0)
    assert torch.all(proj[2].weight == 1) and torch.all(proj[2].bias == 0)
    emb = model.bert.img_model.bert.img_embeddings
    assert emb.img_linear.weight.shape == (128, 32) and torch.all(emb.mask_embedding.weight[0] == 0)
    assert torch.equal(model.cls.predictions.transform.dense.weight, hub["cls.predictions.transform.dense.weight"])
    assert report.heads.startswith("cls from") and "fresh region embedding" in report.image
    assert model.config.tokenizer == "bert-base-cased" and model.config.project_dim == 128
    tok = source_tokenizer(read_source("bert-base-cased"))
    assert tok.tokenize("a dog on the beach") == ["a", "dog", "on", "the", "beach"]


def test_init_image_tower_from_uniter(tmp_path, ldot_home, tiny_model):
    write_tiny_hf_bert(ldot_home / "models" / "bert-base-cased")
    uniter = {f"uniter.{k[len('img_model.bert.'):]}": v.clone() for k, v in tiny_model.state_dict().items()
              if k.startswith("img_model.bert.")}
    uniter["uniter.embeddings.position_ids"] = torch.arange(128)[None]
    uniter["itm_output.weight"], uniter["itm_output.bias"] = torch.randn(2, 128), torch.zeros(2)
    uniter["region_classifier.net.3.weight"] = torch.randn(11, 128)  # a partial head is left fresh
    torch.save(uniter, tmp_path / "uniter-base.pt")
    body, heads = uniter_body(torch.load(tmp_path / "uniter-base.pt", weights_only=True))
    assert "img_embeddings.img_linear.weight" in body and "itm_output.weight" in heads
    model, report = initial_model("bert-base-cased", tmp_path / "uniter-base.pt", num_region_labels=11)
    ref = tiny_model.img_model.bert.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.bert.img_model.bert.state_dict().items())
    assert torch.equal(model.itm_output.weight, uniter["itm_output.weight"])
    assert report.heads == f"itm_output from {tmp_path / 'uniter-base.pt'}"
    assert model.config.img_dim == 32


def test_init_from_a_bi_encoder_keeps_it_and_refuses_other_kinds(tmp_path, tiny_model):
    from ldot_testing import official_finetuned, official_pretrained

    torch.save(official_finetuned(tiny_model), tmp_path / "flickr-ft.pt")
    model, report = initial_model(tmp_path / "flickr-ft.pt", num_region_labels=11)
    ref = tiny_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.bert.state_dict().items())
    assert report.heads == "fresh"
    pre = official_pretrained(tiny_model)
    pre["region_classifier.net.3.bias"] = torch.zeros(1601).half()
    for name in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"):
        shape = (128, 128) if name.endswith("0.weight") else (128,)
        pre[f"region_classifier.{name}"] = torch.ones(shape).half()
    torch.save(pre, tmp_path / "LightningDot.pt")
    model, report = initial_model(tmp_path / "LightningDot.pt")
    assert isinstance(model, BiEncoderForPretraining) and model.num_region_labels == 1601
    assert report.heads == f"region_classifier from {tmp_path / 'LightningDot.pt'}"
    torch.save({"backbone.x": torch.zeros(1), "roi_heads.y": torch.zeros(1)}, tmp_path / "frcnn.pt")
    with pytest.raises(ModelError, match="frcnn"):
        initial_model(tmp_path / "frcnn.pt")


def test_missing_bert_says_how_to_get_it():
    with pytest.raises(ModelError, match="ldot models download bert-base-cased"):
        initial_model("bert-base-cased")
