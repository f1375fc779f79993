"""Decomposition (VLDeformer), hard negatives and distillation: conversions checked against the sources' own
forward, the losses against their definitions, exact resume, and `ldot train decompose` end to end (train, then
index, search and evaluate with the result)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ldot_testing import (
    WORDS,
    install_tiny_detector,
    install_tiny_reranker,
    make_photos,
    planted_pairs,
)
from typer.testing import CliRunner

import models
from models.hub.decompose import decomposed_model, read_decompose_source
from models.nn import losses
from models.nn.tokenizer import Tokenizer
from models.training.data import TrainData

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, no OpenMP contention

runner = CliRunner()


def _spread(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" not in name and "layer_norm" not in name:
                p.normal_(0, 0.2)


def _inputs(img_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    feat = torch.randn(3, 4, img_dim, generator=gen)
    x1y1 = torch.rand(3, 4, 2, generator=gen) * 0.5
    wh = torch.rand(3, 4, 2, generator=gen) * 0.4 + 0.1
    bb = torch.cat([x1y1, x1y1 + wh, wh], dim=-1)
    vmask = torch.ones(3, 4, dtype=torch.long)
    vmask[2, 3:] = 0
    return ids, mask, feat, bb, vmask


@pytest.mark.slow  # importing transformers' VisualBERT takes most of its ~10 s
def test_visualbert_conversion_equals_transformers_visualbertmodel(tmp_path, tokenizer):
    from transformers import VisualBertConfig, VisualBertForPreTraining

    cfg = VisualBertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128, max_position_embeddings=64, visual_embedding_dim=32)
    torch.manual_seed(0)
    source_model = VisualBertForPreTraining(cfg).eval()
    _spread(source_model)
    hub = tmp_path / "visualbert"  # the hub layout: config.json (model_type visual_bert) + pytorch_model.bin
    hub.mkdir()
    (hub / "config.json").write_text(cfg.to_json_string())
    torch.save(source_model.state_dict(), hub / "pytorch_model.bin")
    source = read_decompose_source(hub)
    assert source.kind == "visualbert" and source.config.tokenizer == "bert-base-uncased" and source.config.lowercase
    model = decomposed_model(source, tokenizer).eval()
    ids, mask, feat, bb, vmask = _inputs(32)
    with torch.no_grad():
        want = source_model.visual_bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                                        visual_embeds=feat, visual_attention_mask=vmask).last_hidden_state
        got = model.bert(ids, mask, torch.zeros_like(ids), feat, bb, vmask)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # the padding row (no gradient) is the config's pad_token_id, as in VisualBertEmbeddings (1 by default)
    ours = next(m for n, m in model.named_modules() if n.endswith("word_embeddings"))
    assert ours.padding_idx == source_model.visual_bert.embeddings.word_embeddings.padding_idx == cfg.pad_token_id == 1
    # the same weights, keys of a bare VisualBertModel (no visual_bert. prefix, no heads)
    bare = {k[len("visual_bert."):]: v for k, v in source_model.state_dict().items() if k.startswith("visual_bert.")}
    from models.hub.decompose import visualbert_to_decomposed

    assert visualbert_to_decomposed(bare).keys() == source.state.keys()


def test_uniter_conversion_equals_the_cross_encoders_own_forward(tmp_path, tokenizer, vocab_dir, ldot_home):
    install_tiny_reranker("tiny-cross", vocab_dir, img_dim=32)
    cross = models.load_reranker("tiny-cross", device="cpu").model
    model = decomposed_model(read_decompose_source("tiny-cross"), tokenizer).eval()
    ids, mask, feat, bb, vmask = _inputs(32, seed=1)
    from models.nn.layers import box7_from_norm_bb

    with torch.no_grad():
        want = cross.bert(ids, mask, feat, box7_from_norm_bb(bb), vmask)
        got = model.bert(ids, mask, None, feat, bb, vmask)
    assert torch.allclose(got, want, atol=1e-5)
    # an official UNITER .pt (body under `uniter.`, old LayerNorm names, an itm head) converts the same way
    official = {}
    for key, value in cross.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        official[key.replace("bert.", "uniter.", 1) if key.startswith("bert.") else key] = value
    official["itm_output.weight"] = torch.zeros(2, 128)
    torch.save(official, tmp_path / "uniter.pt")
    from_pt = read_decompose_source(tmp_path / "uniter.pt")
    assert all(torch.equal(from_pt.state[k], v) for k, v in model.state_dict().items())


def test_a_bare_uniter_pt_reads_its_head_count_beside_it_or_says_what_it_assumed(tmp_path, tokenizer):
    """A 64-wide UNITER with 4 heads: hidden / 64 would say 1 head and every score would change."""
    from dataclasses import replace

    from models.core.errors import LdotWarning
    from models.nn.config import CROSS_PRESETS
    from models.nn.cross_encoder import CrossEncoder
    from models.nn.layers import box7_from_norm_bb

    tiny = CROSS_PRESETS["tiny"]
    config = replace(tiny, img_dim=32, body=replace(tiny.body, hidden_size=64, num_heads=4, intermediate_size=128))
    torch.manual_seed(0)
    cross = CrossEncoder(config).eval()
    _spread(cross)
    torch.save({k.replace("bert.", "uniter.", 1): v for k, v in cross.state_dict().items()}, tmp_path / "uniter.pt")
    ids, mask, feat, bb, vmask = _inputs(32, seed=1)
    with torch.no_grad():
        want = cross.bert(ids, mask, feat, box7_from_norm_bb(bb), vmask)
    with pytest.warns(LdotWarning, match="assumed 1 .*num_attention_heads"):
        assumed = read_decompose_source(tmp_path / "uniter.pt")
    assert assumed.config.body.num_heads == 1
    (tmp_path / "uniter.json").write_text(json.dumps({"num_attention_heads": 4, "hidden_size": 64}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", LdotWarning)
        read = read_decompose_source(tmp_path / "uniter.pt")
    assert read.config.body.num_heads == 4
    with torch.no_grad():
        got = decomposed_model(read, tokenizer).eval().bert(ids, mask, None, feat, bb, vmask)
        wrong = decomposed_model(assumed, tokenizer).eval().bert(ids, mask, None, feat, bb, vmask)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(wrong, want, atol=1e-3)


def test_decomposed_vectors_are_unit_norm_batch_independent_and_use_tags(tokenizer, vocab_dir, ldot_home):
    install_tiny_reranker("tiny-cross", vocab_dir, img_dim=32)
    tags = ("dog", "beach", "red car")
    model = decomposed_model(read_decompose_source("tiny-cross"), tokenizer, tags=tags, text_len=8,
                             max_regions=5).eval()
    texts = ["a dog", "a dog on the beach with a red car near the tree and two people"]
    both = model.encode_text(texts)
    assert torch.allclose(both.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(model.encode_text(texts[:1]), both[:1], atol=1e-5)  # fixed lengths: padding never differs
    ids, mask, tag_types = model.tag_rows(torch.tensor([[0, 2, -1]]), 1)
    assert ids[0, :6].tolist() == [tokenizer.cls_id, *tokenizer.encode("dog red car")[1:-1], tokenizer.sep_id, 0]
    assert tag_types[0].tolist() == mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    _, _, feat, bb, vmask = _inputs(32)
    classes = torch.tensor([[0, 1, 2, 0]] * 3)
    batch = model.encode_regions(feat, bb, vmask, classes)
    alone = model.encode_regions(feat[2:, :3], bb[2:, :3], None, classes[2:, :3])
    assert torch.allclose(batch[2:], alone, atol=1e-5)
    assert not torch.allclose(model.encode_regions(feat, bb, vmask), batch, atol=1e-3)  # the tags count
    assert torch.allclose(model.score(both, batch), both @ batch.T)


def test_losses_equal_their_definitions():
    gen = torch.Generator().manual_seed(0)
    text, image = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    ids = torch.tensor([0, 1, 1, 2])
    from models.nn.pretraining import PairBatch

    batch = PairBatch(None, None, None, None, None, ids)
    assert torch.allclose(losses.contrastive_loss(text, image, batch), losses.cmr_loss(text, image, ids))
    # hard negatives appended: 4 captions vs 4 + 8 images; image 1's copy is no negative of captions 1 and 2
    neg_image, neg_text = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    neg = PairBatch(None, None, None, None, None, torch.tensor([3, 1, 4, 5, 0, 6, 7, 3]), None, None,
                    torch.tensor([5, 6, 2, 7, 3, 1, 0, 4]))
    batch.negatives = neg
    got = losses.contrastive_loss(text, image, batch, neg_text, neg_image, temperature=0.1, weight=1.0)
    keys_i, key_ids_i = torch.cat([image, neg_image]), torch.cat([ids, neg.image_ids])
    keys_t, key_ids_t = torch.cat([text, neg_text]), torch.cat([ids, neg.text_image_ids])
    want = 0.0
    for q in range(4):
        for queries, keys, key_ids in ((text, keys_i, key_ids_i), (image, keys_t, key_ids_t)):
            allowed = [j for j in range(12) if j == q or key_ids[j] != ids[q]]
            logits = torch.stack([queries[q] @ keys[j] / 0.1 for j in allowed])
            want += -torch.log_softmax(logits, 0)[allowed.index(q)] / 4
    assert torch.allclose(got, want, atol=1e-5)
    student, teacher = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    q = F.softmax(teacher / 2, -1)
    explicit = (q * (q.log() - F.log_softmax(student / 2, -1))).sum() / 15 * 4
    assert torch.allclose(losses.distill_loss(student, teacher, 2.0), explicit, atol=1e-6)


def test_distillation_student_is_the_official_mean_of_both_directions_rows_0_to_m():
    """train_itm.py: scores = 0.5 * scores_txt + 0.5 * scores_img, where scores_txt are the image->text loss's scores
    (images query captions) and scores_img the text->image loss's (captions query images); the student is its
    first M rows; KL(teacher || student) at T, x T^2, mean over the M x B entries."""
    from types import SimpleNamespace

    from models.nn.pretraining import PairBatch
    from models.training.loop import TrainConfig, _Trainer, distill_student

    gen = torch.Generator().manual_seed(3)
    b, m, d, scale = 5, 3, 4, 20.0
    text, image = torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen)
    hand = torch.empty(m, b)
    for i in range(m):
        for j in range(b):
            hand[i, j] = 0.5 * (float(image[i] @ text[j]) + float(text[i] @ image[j])) * scale
    assert torch.allclose(distill_student(text, image, m, scale), hand, atol=1e-5)
    assert not torch.allclose(distill_student(text, image, m, scale), (image[:m] @ text.T) * scale, atol=1e-2)
    # the trainer's distillation term: the teacher's (M, B) scores against that student
    teacher_scores = torch.randn(m, b, generator=gen)
    teacher = SimpleNamespace(score=lambda texts, f, bb, mask: teacher_scores.reshape(-1))
    stub = SimpleNamespace(config=TrainConfig(distill_images=m, distill_temperature=2.0, distill_from="t"),
                           model=SimpleNamespace(logit_scale=scale), teacher=teacher,
                           _caption_texts=lambda batch: [str(j) for j in range(b)])
    batch = PairBatch(torch.zeros(b, 3, dtype=torch.long), torch.ones(b, 3, dtype=torch.bool), torch.zeros(b, 2, 3),
                      torch.zeros(b, 2, 6), torch.ones(b, 2, dtype=torch.bool), torch.arange(b))
    q = F.softmax(teacher_scores / 2, -1)
    want = (q * (q.log() - F.log_softmax(hand / 2, -1))).sum() / (m * b) * 4
    assert torch.allclose(_Trainer._distill(stub, batch, text, image), want, atol=1e-5)


def test_mining_draws_from_the_top_pool_and_never_a_true_match():
    from models.training.negatives import mine, pool_size

    assert (pool_size(1, 10_000), pool_size(30, 10_000), pool_size(600, 10_000), pool_size(5, 20)) == (50, 70, 1000, 20)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(60, 16)).astype(np.float32)
    owner = [i // 2 for i in range(120)]
    captions = images[owner] + 0.3 * rng.normal(size=(120, 16)).astype(np.float32)
    hn = mine(captions, images, owner, 3, seed=1, step=0)
    assert hn.images.shape == (120, 3) and hn.captions.shape == (60, 3)
    assert all(owner[c] not in hn.images[c] for c in range(120))
    assert all(owner[c] != j for j in range(60) for c in hn.captions[j])
    top = np.argsort(-(captions @ images.T), axis=1)[:, :50]
    assert all(set(hn.images[c]) <= set(top[c]) for c in range(120))
    again = mine(captions, images, owner, 3, seed=1, step=0)
    assert np.array_equal(again.images, hn.images)  # a function of (vectors, seed, step): resume-safe


def test_pool_concentration_and_chance_recalls_by_construction():
    import learnset

    from models.training.metrics import chance_recalls
    from models.training.negatives import STALLED, mine, pool_concentration

    same = np.tile(np.arange(50), (120, 1))
    assert pool_concentration(same, 300) == 1.0
    # images on a circle, each caption at its image: every pool is the arc around its own image, and every image is
    # in the same number of pools, so the pools are spread as evenly as they can be
    angles = 2 * np.pi * np.arange(300) / 300
    images = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    owner = [i // 2 for i in range(600)]
    spread = mine(images[owner], images, owner, 4, seed=0, step=0)
    assert spread.concentration < 0.01
    # a model that ranks every caption's images alike (constant vectors): every caption mines the same pool
    flat = mine(np.ones((600, 2), np.float32), np.ones((300, 2), np.float32), owner, 4, seed=0, step=0)
    assert flat.concentration >= STALLED and flat.concentration == 1.0
    assert pool_concentration(same[:, :40], 60) == 0.0  # pools over most of the set tell nothing
    for n in (8, 40, 300):
        got, want = chance_recalls([i // 2 for i in range(2 * n)], n).to_dict(), learnset.chance(n)
        for side in ("text_to_image", "image_to_text"):
            assert got[side] == pytest.approx(want[side], abs=1e-9)


def _ranks_alike(model):
    """A model whose every caption and image vector is the same (zeroed last projections): it ranks at random."""
    with torch.no_grad():
        for tower in (model.bert.txt_model, model.bert.img_model):
            tower.encode_proj[3].weight.zero_()
    return model


@pytest.mark.parametrize("gate", [0.1, 0.0])
def test_hard_negatives_from_a_model_that_ranks_at_random_say_so_and_the_gate_keeps_in_batch(tmp_path, tokenizer,
                                                                                          gate):
    from models.nn.config import preset
    from models.nn.pretraining import BiEncoderForPretraining
    from models.training.loop import TrainConfig, hard_negative_gate, train

    torch.manual_seed(0)
    model = _ranks_alike(BiEncoderForPretraining(preset("tiny"), 11))
    pairs, lookup = planted_pairs(n_images=120)  # more images than twice the pool (50): the pools can tell
    seen = []
    config = TrainConfig(batch_size=16, lr=1e-3, epochs=1, hard_negatives=2, hard_negatives_gate=gate)
    train(tmp_path / "run", TrainData(pairs, lookup, val=pairs), config, model, tokenizer, device="cpu",
          progress=seen.append)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    decided = [r for r in log if r["event"] == "negatives"]
    notes = [p.info["message"] for p in seen if p.event == "note"]
    assert len(decided) == 1 and decided[0]["step"] == 0 and len(notes) == 1
    mined = [p for p in seen if getattr(p, "stage", "") == "mining hard negatives"]
    if gate:  # recall at chance: no mining, in-batch negatives, and the user is told why
        assert decided[0]["mined"] is False and not mined
        assert decided[0]["mean_recall"] < decided[0]["needed"] and "chance" in notes[0]
    else:  # the official schedule mines anyway, and says the pools are all alike
        assert decided[0]["mined"] is True and decided[0]["concentration"] == 1.0 and mined
        assert "same images for every caption" in notes[0]
    ready, chance, needed = hard_negative_gate(90.0, pairs, 0.1)
    assert ready and needed == pytest.approx(chance + 0.1 * (100 - chance))
    assert not hard_negative_gate(chance + 1.0, pairs, 0.1)[0] and hard_negative_gate(chance, pairs, 0.0)[0]


def test_hard_negative_and_distilled_runs_resume_exactly(tmp_path, tokenizer, vocab_dir, ldot_home):
    from models.nn.config import preset
    from models.nn.pretraining import BiEncoderForPretraining
    from models.training.initialization import bert_init_
    from models.training.loop import TrainConfig, train

    install_tiny_reranker("teacher", vocab_dir, img_dim=32)
    teacher = models.load_reranker("teacher", device="cpu")

    def model():
        torch.manual_seed(0)
        m = BiEncoderForPretraining(preset("tiny"), 11)
        bert_init_(m)
        return m

    pairs, lookup = planted_pairs(n_images=8)
    data = TrainData(pairs, lookup, val=pairs)
    config = TrainConfig(batch_size=4, lr=1e-3, epochs=2, hard_negatives=2, hard_negatives_gate=0.0,
                         distill_from="teacher", distill_images=2, checkpoint_every=3)  # the official schedule
    seen = []
    train(tmp_path / "a", data, config, model(), tokenizer, device="cpu", teacher=teacher, progress=seen.append)
    assert [p.info for p in seen if getattr(p, "stage", "") == "mining hard negatives" and p.done == 3]  # mined
    assert len([p for p in seen if getattr(p, "stage", "") == "encoding images" and p.done == 8]) == 2  # 2 minings
    train(tmp_path / "b", data, config, model(), tokenizer, device="cpu", teacher=teacher, stop_at_step=5)
    train(tmp_path / "b", data, config, resume=True, device="cpu", teacher=teacher)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / r / "checkpoint" / "model.safetensors") for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "log.jsonl").read_text() == (tmp_path / "b" / "log.jsonl").read_text()
    steps = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert {"itm", "distill"} <= set(next(r for r in steps if r["event"] == "step")["tasks"])


@pytest.mark.slow
def test_decompose_with_distillation_and_hard_negatives_then_index_search_eval(tmp_path, vocab_dir, ldot_home,
                                                                               monkeypatch):
    """`ldot train decompose` on tiny models, then the result indexes photos, searches, and evaluates."""
    from ldot_cli.main import app

    _, dim = install_tiny_detector()
    install_tiny_reranker("tiny-cross", vocab_dir, img_dim=dim)
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("\n".join(f"{w},{w}s" for w in [w for w in WORDS if w.islower()][:20]) + "\n")
    pairs, lookup = planted_pairs(n_images=16, img_dim=dim, labels=21)
    monkeypatch.setattr("ldot_cli.train.driver.check_training_data", lambda spec: None)  # planted data below
    monkeypatch.setattr("ldot_cli.train.driver.open_training_data",
                        lambda spec, tok, **_: TrainData(pairs, lookup, val=pairs, description="planted"))
    args = ["train", "decompose", "--init", "tiny-cross", "--out", "dec", "--epochs", "2", "--batch-size", "8",
            "--lr", "1e-3", "--warmup", "0.1", "--hard-negatives", "2", "--distill-from", "tiny-cross",
            "--tag-vocab", str(vocab), "--text-len", "12", "--max-regions", "6", "--save-every", "1", "--plot",
            "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (ldot_home / "runs" / "dec" / "curves.png").stat().st_size > 1000
    meta = json.loads((ldot_home / "models" / "dec" / "config.json").read_text())
    assert meta["kind"] == "decomposed" and meta["config"]["tags"][:2] == ["a", "dog"]
    assert meta["source"]["train_config"]["hard_negatives"] == 2
    model = models.load_bi_encoder("dec")
    assert type(model).__name__ == "DecomposedEncoder" and model.config.text_len == 12
    shown = runner.invoke(app, ["train", "show", "dec", "--out", str(tmp_path / "c.png")])
    assert shown.exit_code == 0 and (tmp_path / "c.png").is_file()
    # index, search (and re-rank) with it
    photos = make_photos(tmp_path / "photos", 4, size=(64, 48))
    indexed = runner.invoke(app, ["index", str(tmp_path / "photos"), "--model", "dec", "--detector", "tiny-det",
                                  "--batch-size", "2", "--workers", "1"])
    assert indexed.exit_code == 0, indexed.output
    searched = runner.invoke(app, ["search", "a dog on the beach", "--json", "-k", "3"])
    assert searched.exit_code == 0, searched.output
    hits = json.loads(searched.stdout)
    assert len(hits) == 3 and {h["path"] for h in hits} <= {str(p) for p in photos}
    assert all(-1.0 <= h["score"] <= 1.0 + 1e-6 for h in hits)  # cosine
    # evaluate on a UNITER-layout benchmark
    from evalsets import region_arrays, write_image_db, write_text_db

    tok = Tokenizer.from_path(vocab_dir)
    rows, records = [], {}
    for j in range(6):
        key = f"flickr30k_{3000 + j:012d}.npz"
        records[key] = region_arrays(j, 5 + j % 3, dim=dim)
        text = " ".join(WORDS[j:j + 4])
        rows.append({"sentid": j, "raw": text, "input_ids": tok.encode(text)[1:-1], "img_fname": key})
    write_text_db(tmp_path / "data" / "txt_db" / "itm_flickr30k_test.db", rows,
                  {"CLS": tok.cls_id, "SEP": tok.sep_id, "MASK": 4, "UNK": 1, "v_range": [5, 128]})
    write_image_db(tmp_path / "data" / "img_db" / "flickr30k", records)
    evaluated = runner.invoke(app, ["eval", "flickr30k", "--data", str(tmp_path / "data"), "--model", "dec",
                                    "--reranker", "tiny-cross", "--rerank-k", "3", "--json", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert 0 <= report["recall"]["rsum"] <= 600 and "3" in report["rerank"]


@pytest.mark.slow  # transformers' LXMERT import
def test_a_live_lxmert_teacher_scores_decoded_captions_with_its_own_tokenizer(tmp_path, tokenizer, vocab_dir):
    from transformers import LxmertConfig, LxmertForPreTraining

    from models.training.loop import TrainConfig, train

    torch.manual_seed(0)
    cfg = LxmertConfig(vocab_size=128, hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1,
                       x_layers=1, r_layers=1, visual_feat_dim=32, num_object_labels=10, num_attr_labels=5,
                       num_qa_labels=3)
    LxmertForPreTraining(cfg).save_pretrained(tmp_path / "lxmert")
    (tmp_path / "lxmert" / "vocab.txt").write_text((vocab_dir / "vocab.txt").read_text())
    teacher = models.load_reranker(tmp_path / "lxmert", device="cpu")
    seen = []
    score = teacher.score

    def recording(texts, features, norm_bb, mask=None):
        seen.append((list(texts), tuple(features.shape)))
        return score(texts, features, norm_bb, mask)

    teacher.score = recording
    pairs, lookup = planted_pairs(n_images=8)
    from models.nn.config import preset
    from models.nn.pretraining import BiEncoderForPretraining

    torch.manual_seed(0)
    model = BiEncoderForPretraining(preset("tiny"), 11)
    train(tmp_path / "run", TrainData(pairs, lookup), TrainConfig(batch_size=4, lr=1e-3, epochs=None, steps=2,
                                                                  distill_from=str(tmp_path / "lxmert")),
          model, tokenizer, device="cpu", teacher=teacher)
    texts, shape = seen[0]
    assert shape[:2] == (4 * 4, 4) and len(texts) == 16  # 4 images x 4 captions (distill_images caps at B)
    decoded = {tokenizer.backend.decode(list(ids)) for ids in pairs.token_ids}
    assert set(texts) <= decoded and all("[CLS]" not in t and "[PAD]" not in t for t in texts)
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["tasks"]["distill"]) for r in steps)


@pytest.mark.slow  # ~5 s alone
def test_decomposition_resumes_exactly_and_installs_a_decomposed_model(tmp_path, tokenizer, vocab_dir, ldot_home):
    from models.training.loop import decompose_config, export_model, train

    install_tiny_reranker("tiny-cross", vocab_dir, img_dim=32)

    def model():
        return decomposed_model(read_decompose_source("tiny-cross"), tokenizer, tags=("dog", "cat", "car"),
                                text_len=10, max_regions=5, temperature=0.05)

    pairs, lookup = planted_pairs(n_images=8)
    data = TrainData(pairs, lookup, val=pairs)
    config = decompose_config(batch_size=4, lr=1e-3, epochs=None, steps=4, warmup=1, eval_every=2,
                              hard_negatives=1)
    train(tmp_path / "a", data, config, model(), tokenizer, device="cpu")
    train(tmp_path / "b", data, config, model(), tokenizer, device="cpu", stop_at_step=3)
    train(tmp_path / "b", data, config, resume=True, device="cpu")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / r / "checkpoint" / "model.safetensors") for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "log.jsonl").read_text() == (tmp_path / "b" / "log.jsonl").read_text()
    target = export_model(tmp_path / "b", "dec")
    loaded = models.load_bi_encoder("dec")
    assert loaded.config.tags == ("dog", "cat", "car") and loaded.config.temperature == 0.05
    assert json.loads((target / "ldot-manifest.json").read_text())["kind"] == "decomposed"


@pytest.mark.slow  # transformers' LXMERT import
def test_distilling_lxmert_on_features_of_other_than_36_boxes_says_so(tmp_path, vocab_dir):
    """As `ldot search --rerank lxmert-*` does for an index of other boxes: LXMERT learnt from 36 boxes."""
    from transformers import LxmertConfig, LxmertForPreTraining

    from ldot_cli.train.driver import _teacher
    from models.training.loop import TrainConfig

    torch.manual_seed(0)
    cfg = LxmertConfig(vocab_size=128, hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1,
                       x_layers=1, r_layers=1, visual_feat_dim=32, num_object_labels=10, num_attr_labels=5,
                       num_qa_labels=3)
    LxmertForPreTraining(cfg).save_pretrained(tmp_path / "lxmert")
    (tmp_path / "lxmert" / "vocab.txt").write_text((vocab_dir / "vocab.txt").read_text())
    config = TrainConfig(distill_from=str(tmp_path / "lxmert"))
    for regions, noted in ((4, True), (36, False)):
        pairs, lookup = planted_pairs(n_images=4, regions=regions)
        seen = []
        assert _teacher(config, "cpu", TrainData(pairs, lookup), seen.append) is not None
        notes = [p.info["message"] for p in seen if p.event == "note"]
        assert bool(notes) == noted and all("36 boxes per image" in n and "hold 4" in n for n in notes)
    install_tiny_reranker("uniter-teacher", vocab_dir, img_dim=32)  # a UNITER teacher: 10-100 boxes are its own
    seen = []
    pairs, lookup = planted_pairs(n_images=4, regions=4)
    _teacher(TrainConfig(distill_from="uniter-teacher"), "cpu", TrainData(pairs, lookup), seen.append)
    assert not [p for p in seen if p.event == "note"]


@pytest.mark.parametrize("recipe", [None, "vldeformer"])
def test_decompose_recipes_set_temperature_batch_and_count_epochs_in_images(tmp_path, vocab_dir, ldot_home,
                                                                          monkeypatch, recipe):
    """Default: T 0.05, batch 300 (ldot's sources learn with it); `--recipe vldeformer`: VLDeformer's own T 0.005 and
    batch 1800. An epoch draws as many pairs as there are training images (VLDeformer's epoch)."""
    from ldot_cli.main import app

    install_tiny_reranker("tiny-cross", vocab_dir, img_dim=32)
    pairs, lookup = planted_pairs(n_images=12, captions_per_image=3)
    monkeypatch.setattr("ldot_cli.train.driver.check_training_data", lambda spec: None)
    monkeypatch.setattr("ldot_cli.train.driver.open_training_data",
                        lambda spec, tok, **_: TrainData(pairs, lookup, val=pairs, description="planted"))
    args = ["train", "decompose", "--init", "tiny-cross", "--out", "dec", "--epochs", "3", "--no-tags",
            "--text-len", "8", "--max-regions", "4", "--device", "cpu", "--batch-size", "4", "--warmup", "1"]
    result = runner.invoke(app, args + (["--recipe", recipe] if recipe else []))
    assert result.exit_code == 0, result.output
    run = json.loads((ldot_home / "runs" / "dec" / "run.json").read_text())
    assert run["model_config"]["temperature"] == (0.005 if recipe else 0.05)
    assert run["train_config"]["epoch_unit"] == "images" and run["init"]["recipe"] == (recipe or "ldot")
    log = [json.loads(line) for line in (ldot_home / "runs" / "dec" / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 3 * (12 // 4)  # 3 epochs of 12 pairs (the 12 images), not of 36 captions
    from models.training.loop import DECOMPOSE_RECIPES, decompose_config

    assert decompose_config().batch_size == 300 and decompose_config("vldeformer").batch_size == 1800
    assert DECOMPOSE_RECIPES["vldeformer"]["temperature"] == 0.005
    bad = runner.invoke(app, args[:6] + ["--recipe", "paper"])
    assert bad.exit_code == 2 and "ldot or vldeformer" in bad.output
