"""Training objectives against hand computations; masking statistics; pre-training heads and their layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from models.hub.formats import bi_encoder_state
from models.nn import losses
from models.nn.config import preset
from models.nn.pretraining import (
    TIED,
    BiEncoderForPretraining,
    PairBatch,
    state_for_saving,
    with_tied_aliases,
)


def _ce(row: list[float], target: int) -> float:
    return -row[target] + math.log(sum(math.exp(x) for x in row))


# -- losses ------------------------------------------------------------------------------------------------
def test_cmr_is_the_mean_of_both_directions_over_raw_dot_products():
    text = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 2.0]])
    image = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.5], [0.0, 2.0, 2.0]]  # text @ image.T by hand
    t2i = sum(_ce(s[i], i) for i in range(3)) / 3
    i2t = sum(_ce([s[r][j] for r in range(3)], j) for j in range(3)) / 3
    assert losses.cmr_loss(text, image).item() == pytest.approx(0.5 * t2i + 0.5 * i2t, rel=1e-6)
    # no temperature, no normalisation: scaling the vectors changes the loss
    assert losses.cmr_loss(2 * text, image).item() != pytest.approx(losses.cmr_loss(text, image).item())


def test_cmr_with_temperature_divides_the_scores():
    text, image = torch.randn(4, 8), torch.randn(4, 8)
    assert losses.cmr_loss(text, image, temperature=0.5).item() == pytest.approx(
        losses.cmr_loss(2 * text, image).item(), rel=1e-5)


def test_same_image_twice_in_a_batch_is_not_a_negative():
    text = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    image = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 show one image
    ids = torch.tensor([7, 7, 9])
    s = (text @ image.T).tolist()
    keep = [[j for j in range(3) if j == i or ids[j] != ids[i]] for i in range(3)]
    t2i = sum(_ce([s[i][j] for j in keep[i]], keep[i].index(i)) for i in range(3)) / 3
    i2t = sum(_ce([s[r][j] for r in keep[j]], keep[j].index(j)) for j in range(3)) / 3
    assert losses.cmr_loss(text, image, ids).item() == pytest.approx(0.5 * t2i + 0.5 * i2t, rel=1e-6)


def test_nt_xent_by_hand():
    text, image = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    z = F.normalize(torch.cat([text, image]), dim=-1)
    sim = (z @ z.T / 0.1).tolist()
    expected = sum(_ce([sim[i][j] for j in range(4) if j != i], [j for j in range(4) if j != i].index((i + 2) % 4))
                   for i in range(4)) / 4
    assert losses.nt_xent_loss(text, image, temperature=0.1).item() == pytest.approx(expected, rel=1e-5)


def test_head_losses_by_hand():
    assert losses.mlm_loss(torch.zeros(3, 10), torch.tensor([1, 2, 3])).item() == pytest.approx(math.log(10))
    assert losses.mrfr_loss(torch.zeros(2, 5), torch.ones(2, 5)).item() == pytest.approx(1.0)
    soft = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    # KL(p || uniform) per region: log 4 and log 2 (0*log 0 = 0); official mean over all 8 elements
    assert losses.mrc_kl_loss(torch.zeros(2, 4), soft).item() == pytest.approx((math.log(4) + math.log(2)) / 8)


def test_soft_labels_move_background_from_last_to_first():
    ours = np.array([[0.1, 0.2, 0.7]])  # two objects, background last (our detector)
    assert losses.soft_labels_background_first(ours).tolist() == [[0.7, 0.1, 0.2]]


# -- masking -------------------------------------------------------------------------------------------------
def test_token_masking_statistics_are_bert_s():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (400, 100))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :2] = False
    out, labels = losses.mask_tokens(ids, maskable, mask_id=4, vocab_range=(10, 1000), generator=gen)
    chosen = labels != losses.IGNORE
    assert not chosen[:, :2].any()
    assert chosen.float().sum() / maskable.sum() == pytest.approx(0.15, abs=0.005)
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(out[~chosen], ids[~chosen])
    n = chosen.sum().item()
    masked = (out[chosen] == 4).sum().item() / n
    kept = (out[chosen] == ids[chosen]).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.02) and kept == pytest.approx(0.1, abs=0.02)
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.02)  # random ids
    assert out.min() >= 4


def test_token_masking_is_seeded_and_masks_at_least_one_per_row():
    ids = torch.randint(10, 100, (50, 3))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    a = losses.mask_tokens(ids, maskable, 4, (10, 100), torch.Generator().manual_seed(3))
    b = losses.mask_tokens(ids, maskable, 4, (10, 100), torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert ((a[1] != losses.IGNORE).sum(dim=1) >= 1).all()


def test_region_masking_statistics():
    gen = torch.Generator().manual_seed(1)
    valid = torch.zeros(500, 60, dtype=torch.bool)
    valid[:, :40] = True
    masked = losses.mask_regions(valid, gen)
    assert not masked[:, 40:].any()
    assert masked.float().sum() / valid.sum() == pytest.approx(0.15, abs=0.01)
    few = losses.mask_regions(torch.ones(200, 2, dtype=torch.bool), gen)
    assert (few.sum(dim=1) >= 1).all()


# -- heads, tying, layout --------------------------------------------------------------------------------------
@pytest.fixture
def pre_model():
    torch.manual_seed(0)
    return BiEncoderForPretraining(preset("tiny"), num_region_labels=11)


def _batch(seed: int = 0, b: int = 4, length: int = 6, n: int = 5, labels: int = 11) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 128, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return PairBatch(ids, torch.ones(b, length, dtype=torch.bool), torch.randn(b, n, 32, generator=g),
                     torch.rand(b, n, 6, generator=g), torch.ones(b, n, dtype=torch.bool), torch.arange(b),
                     torch.softmax(torch.randn(b, n, labels, generator=g), -1))


def test_heads_are_tied_as_in_the_official_code(pre_model):
    img_words = pre_model.bert.img_model.bert.embeddings.word_embeddings.weight
    assert pre_model.cls.predictions.decoder.weight is img_words
    txt_words = pre_model.bert.txt_model.bert.embeddings.word_embeddings.weight
    assert pre_model.cls.predictions.decoder.weight is not txt_words
    assert pre_model.feat_regress.weight is pre_model.bert.img_model.bert.img_embeddings.img_linear.weight
    batch = _batch()
    ids, labels = losses.mask_tokens(batch.input_ids, batch.text_mask, 4, (10, 128), torch.Generator().manual_seed(0))
    pre_model.mlm(batch, ids, labels)[0].backward()
    assert img_words.grad is not None and img_words.grad.abs().sum() > 0


def test_every_task_runs_and_only_masked_positions_count(pre_model):
    batch = _batch()
    gen = torch.Generator().manual_seed(0)
    ids, labels = losses.mask_tokens(batch.input_ids, batch.text_mask, 4, (10, 128), gen)
    masked = losses.mask_regions(batch.region_mask, gen)
    for loss, _ in (pre_model.itm(batch), pre_model.mlm(batch, ids, labels), pre_model.mrfr(batch, masked),
                    pre_model.mrc(batch, masked)):
        assert torch.isfinite(loss)
    # MRFR's target is the ORIGINAL feature of the masked regions (the input ones are zeroed)
    pre_model.eval()
    predicted = pre_model.feat_regress(pre_model._masked_region_states(batch, masked))
    assert pre_model.mrfr(batch, masked)[0].item() == pytest.approx(
        F.mse_loss(predicted, batch.features[masked]).item(), rel=1e-5)


def test_state_dict_is_the_official_pretraining_layout(pre_model, tiny_model):
    from ldot_testing import official_pretrained

    keys = set(pre_model.state_dict())
    official_heads = {k for k in official_pretrained(tiny_model) if not k.startswith("bert.")}
    assert official_heads <= keys
    assert {k for k in keys if not k.startswith("bert.")} == {
        "cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.decoder.weight", "feat_regress.weight", "feat_regress.bias", "feat_regress.net.0.weight",
        "feat_regress.net.0.bias", "feat_regress.net.2.weight", "feat_regress.net.2.bias",
        "region_classifier.net.0.weight", "region_classifier.net.0.bias", "region_classifier.net.2.weight",
        "region_classifier.net.2.bias", "region_classifier.net.3.weight", "region_classifier.net.3.bias",
        "itm_output.weight", "itm_output.bias"}


def test_pretraining_state_round_trips_through_the_official_converters(tmp_path, pre_model):
    state, fmt = bi_encoder_state(pre_model.state_dict())
    assert fmt == "lightningdot-pretrained"
    reference = pre_model.bert.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    # as an official LightningDot.pt (flat fp16 torch file) and as our safetensors without tied aliases
    torch.save({k: v.half() for k, v in pre_model.state_dict().items()}, tmp_path / "LightningDot.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state_for_saving(pre_model).items()}, str(tmp_path / "pre.safetensors"))
    assert set(with_tied_aliases(state_for_saving(pre_model))) == set(pre_model.state_dict())
    feats, bb = torch.randn(2, 5, 32), torch.rand(2, 5, 6)
    pre_model.eval()
    with torch.no_grad():
        expected = pre_model.bert.encode_regions(feats, bb)
    for name in ("LightningDot.pt", "pre.safetensors"):
        loaded = models.load_bi_encoder(tmp_path / name)
        tol = 2e-2 if name.endswith(".pt") else 1e-6
        assert torch.allclose(loaded.encode_regions(feats, bb), expected, atol=tol), name
    assert all(alias in pre_model.state_dict() for alias, _ in TIED)
