"""The training loop on a tiny planted data set: it learns, resumes exactly, and installs a loadable model."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from ldot_testing import planted_pairs

import models
import models.hub.load
from models.nn import losses
from models.nn.config import preset
from models.nn.pretraining import BiEncoderForPretraining
from models.training.data import PairSet, SpecialIds, TrainData, batch_indices, collate
from models.training.loop import (
    TrainConfig,
    TrainingError,
    build_optimizer,
    encode_pairs,
    evaluate,
    export_model,
    finetune_config,
    lr_at,
    pretrain_config,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, no OpenMP contention


def _model(seed: int = 0) -> BiEncoderForPretraining:
    """A tiny model with BERT's init (what `initial_model` gives fresh parts)."""
    from models.training.initialization import bert_init_

    torch.manual_seed(seed)
    model = BiEncoderForPretraining(preset("tiny"), num_region_labels=11)
    bert_init_(model)
    return model


def _config(**kw) -> TrainConfig:
    base = dict(batch_size=8, lr=1e-3, warmup=0.1, epochs=None, steps=6, grad_clip=2.0, eval_every=3)
    return TrainConfig(**{**base, **kw})


def _fixed_batch_metrics(model, pairs, lookup, tokenizer):
    batch = collate(pairs, range(0, len(pairs), 2), lookup, SpecialIds.of(tokenizer), 128)  # one caption per image
    model.eval()
    with torch.no_grad():
        text = model.bert.txt_model.encode_proj(model.text_states(batch)[:, 0])
        image = model.bert.img_model.encode_proj(model.image_states(batch)[:, 0])
    model.train()
    return losses.cmr_loss(text, image).item(), losses.in_batch_accuracy(text, image)


def test_schedule_optimizer_groups_and_presets():
    assert [round(lr_at(s, 1.0, 4, 10), 3) for s in range(10)] == [0.25, 0.5, 0.75, 1.0, 0.833, 0.667, 0.5,
                                                                  0.333, 0.167, 0.0]
    opt = build_optimizer(_model(), TrainConfig(weight_decay=0.01))
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in plain["params"])
    n_params = len({id(p) for p in _model().parameters()})
    assert len(decay["params"]) + len(plain["params"]) == n_params  # tied weights once
    ft, pt = finetune_config("coco"), pretrain_config()
    assert (ft.batch_size, ft.lr, ft.warmup, ft.grad_clip, ft.epochs, ft.betas, ft.weight_decay) == (
        96, 2e-5, 0.1, 2.0, 20, (0.9, 0.999), 0.0)
    assert dict(pt.tasks) == {"itm": 16, "mlm": 8, "mrfr": 4, "mrckl": 4}
    assert (pt.betas, pt.weight_decay, pt.lr, pt.warmup, pt.steps, pt.grad_clip) == ((0.9, 0.98), 0.01, 5e-5, 0.1,
                                                                                      300_000, 5.0)
    cosine = [lr_at(s, 1.0, 2, 10, "cosine") for s in range(10)]
    assert cosine[0] == 0.5 and cosine[1] == 1.0 and cosine[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:]))
    with pytest.raises(TrainingError, match="unknown task"):
        TrainConfig(tasks=(("itm", 1.0), ("vqa", 1.0)))


def test_recalls_match_brute_force():
    rng = np.random.default_rng(0)
    text, image = rng.normal(size=(30, 8)), rng.normal(size=(10, 8))
    owner = np.repeat(np.arange(10), 3)
    scores = text @ image.T
    from models.training.metrics import recalls_from_vectors

    got = recalls_from_vectors(text, image, owner)
    for k in (1, 5, 10):
        t2i = np.mean([owner[i] in np.argsort(-scores[i])[:k] for i in range(30)]) * 100
        i2t = np.mean([bool(set(np.argsort(-scores[:, j])[:k]) & set(np.flatnonzero(owner == j)))
                       for j in range(10)]) * 100
        assert got.text_to_image[k] == pytest.approx(t2i) and got.image_to_text[k] == pytest.approx(i2t)


def test_batches_are_a_pure_function_of_seed_and_position():
    a = [batch_indices(20, 8, 42, p) for p in range(5)]
    assert a == [batch_indices(20, 8, 42, p) for p in range(5)]
    assert sorted(a[0] + a[1]) != sorted(range(16)) or len(set(a[0] + a[1])) == 16  # no repeats within an epoch
    assert a[2] != a[0]  # a new epoch reshuffles


def test_long_captions_are_dropped_in_training_only():
    pairs = PairSet([(5,) * 3, (5,) * 61, (5,) * 60], [0, 0, 1], ["a", "b"])
    assert len(pairs.drop_long(60)) == 2 and len(pairs) == 3


def test_finetuning_lowers_cmr_and_raises_in_batch_accuracy(tmp_path, tokenizer):
    pairs, lookup = planted_pairs()
    model = _model()
    loss0, acc0 = _fixed_batch_metrics(model, pairs, lookup, tokenizer)
    result = train(tmp_path / "run", TrainData(pairs, lookup, val=pairs), _config(steps=100, eval_every=25), model,
                   tokenizer, device="cpu")
    loss1, acc1 = _fixed_batch_metrics(model, pairs, lookup, tokenizer)
    assert result.finished and result.step == 100
    assert loss1 < 0.6 * loss0 and acc1 > acc0 + 0.4, (loss0, loss1, acc0, acc1)  # measured: 2.77 -> 1.17, .06 -> .66
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    log = [r for r in lines if r["event"] == "eval"]
    assert [r["step"] for r in log] == [25, 50, 75, 100]
    steps = [r for r in lines if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 101)) and set(steps[0]["tasks"]) == {"itm"}
    assert steps[0]["lr"] < steps[9]["lr"] and steps[-1]["lr"] < steps[50]["lr"]
    assert result.best["mean_recall"] == max(r["mean_recall"] for r in log) > log[0]["mean_recall"] - 1e-9


def test_resume_equals_an_uninterrupted_run(tmp_path, tokenizer):
    pairs, lookup = planted_pairs(n_images=8)
    data = TrainData(pairs, lookup, val=pairs)
    config = _config(tasks=(("itm", 2.0), ("mlm", 1.0), ("mrfr", 1.0), ("mrckl", 1.0)), steps=6, grad_accum=2,
                     eval_every=2, checkpoint_every=5)
    full = _model()
    train(tmp_path / "a", data, config, full, tokenizer, device="cpu")
    first = train(tmp_path / "b", data, config, _model(), tokenizer, device="cpu", stop_at_step=3)
    assert not first.finished and first.step == 3
    with pytest.raises(TrainingError, match="`resume`"):
        train(tmp_path / "b", data, config, _model(), tokenizer, device="cpu")
    with pytest.raises(TrainingError, match="lr 0.001 -> 0.002"):
        train(tmp_path / "b", data, replace(config, lr=2e-3), resume=True, device="cpu")
    torch.manual_seed(1234)  # the resumed run must not depend on the caller's RNG
    second = train(tmp_path / "b", data, config, resume=True, device="cpu")
    assert second.finished and second.step == 6
    from models.training.loop import _rebuild

    resumed, _ = _rebuild(tmp_path / "b")
    from safetensors.torch import load_file

    from models.nn.pretraining import with_tied_aliases

    resumed.load_state_dict(with_tied_aliases(load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")))
    ref = full.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in resumed.state_dict().items())
    assert (tmp_path / "a" / "best.json").read_text() == (tmp_path / "b" / "best.json").read_text()
    assert (tmp_path / "a" / "log.jsonl").read_text() == (tmp_path / "b" / "log.jsonl").read_text()  # per-step log


def _head_losses(model, pairs, lookup, tokenizer):
    ids = SpecialIds.of(tokenizer)
    batch = collate(pairs, range(len(pairs)), lookup, ids, 128, soft_labels=True)
    gen = torch.Generator().manual_seed(5)
    maskable = batch.text_mask.clone()
    maskable[:, 0] = maskable[:, -1] = False
    masked_ids, labels = losses.mask_tokens(batch.input_ids, maskable, ids.mask, ids.vocab_range, gen)
    regions = losses.mask_regions(batch.region_mask, gen)
    model.eval()
    with torch.no_grad():
        out = {"mlm": model.mlm(batch, masked_ids, labels)[0].item(), "mrfr": model.mrfr(batch, regions)[0].item(),
               "mrckl": model.mrc(batch, regions)[0].item()}
    model.train()
    return out


def test_pretraining_heads_learn_and_the_model_installs_with_them(tmp_path, tokenizer, ldot_home):
    pairs, lookup = planted_pairs(n_images=8)
    config = _config(tasks=(("mlm", 1.0), ("mrfr", 1.0), ("mrckl", 1.0)), steps=24, eval_every=100, lr=2e-3)
    seen = []
    model = _model()
    before = _head_losses(model, pairs, lookup, tokenizer)
    train(tmp_path / "run", TrainData(pairs, lookup), config, model, tokenizer, device="cpu",
          progress=lambda p: seen.append((p.event, dict(p.info.get("task_losses", {})))))
    after = _head_losses(model, pairs, lookup, tokenizer)
    assert all(after[t] < before[t] for t in before), (before, after)
    events = [e for e, _ in seen]
    assert events[0] == "start" and events[-1] == "done" and events.count("step") == 24
    assert set([lo for e, lo in seen if e == "step"][-1]) == {"mlm", "mrfr", "mrckl"}
    target = export_model(tmp_path / "run", "mine-pre")
    assert (target / "heads.safetensors").is_file()
    from models.training.initialization import initial_model

    again, report = initial_model("mine-pre")
    assert report.heads.startswith("cls+feat_regress+region_classifier+itm_output")
    assert torch.equal(again.region_classifier.net[3].weight, model.region_classifier.net[3].weight)


def test_the_installed_model_loads_by_name_and_encodes_like_the_best_weights(tmp_path, tokenizer, ldot_home):
    pairs, lookup = planted_pairs(n_images=8)
    model = _model()
    result = train(tmp_path / "run", TrainData(pairs, lookup, val=pairs), _config(steps=4, eval_every=2), model,
                   tokenizer, device="cpu")
    target = export_model(tmp_path / "run", "mine")
    manifest = json.loads((target / "ldot-manifest.json").read_text())
    assert manifest["origin"] == "train" and manifest["kind"] == "bi-encoder" and manifest["complete"]
    from models.hub.installed import local_models

    assert [(m.name, m.origin, m.kind) for m in local_models()] == [("mine", "train", "bi-encoder")]
    assert len(models.hub.load.fingerprint("mine")) == 16  # what an index records
    loaded = models.load_bi_encoder("mine")
    assert loaded.tokenizer.tokenize("a dog") == ["a", "dog"]  # bundled tokenizer
    best = _model()
    from safetensors.torch import load_file

    best.bert.load_state_dict(load_file(tmp_path / "run" / "best.safetensors"))
    ids = SpecialIds.of(tokenizer)
    got = evaluate(best, pairs, lookup, ids, torch.device("cpu"))
    assert got["mean_recall"] == pytest.approx(result.best["mean_recall"])
    ref = models.bi_encoder_from_state(load_file(tmp_path / "run" / "best.safetensors"), loaded.config,
                                       tokenizer=tokenizer)
    text = ["a dog on the beach"]
    assert torch.allclose(loaded.encode_text(text), ref.encode_text(text), atol=1e-6)
    # the best weights' score calibration on the validation pairs comes along (`--min-score auto`)
    from models.training.calibration import AUTO_QUANTILE, load_calibration

    calibration = load_calibration(target)
    text, image = encode_pairs(best, pairs, lookup, ids, torch.device("cpu"), None)
    scores = text @ image.T
    match = np.zeros_like(scores, dtype=bool)
    match[np.arange(len(text)), pairs.caption_image] = True
    assert calibration["auto"]["threshold"] == pytest.approx(np.quantile(scores[~match], AUTO_QUANTILE), abs=1e-3)
    assert calibration["pairs"] == {"match": len(text), "non_match": int((~match).sum())}
    assert f"step {result.best['step']}" in calibration["source"]
    with pytest.raises(TrainingError, match="`force`"):
        export_model(tmp_path / "run", "mine")
    with pytest.raises(TrainingError, match="registry name"):
        export_model(tmp_path / "run", "lightningdot")


def test_bad_inputs_are_clear_errors(tmp_path, tokenizer):
    pairs, lookup = planted_pairs(n_images=4)
    with pytest.raises(TrainingError, match="32 dims but the model expects 2048"):
        big = BiEncoderForPretraining(replace(preset("tiny"), img_dim=2048), 11)
        train(tmp_path / "a", TrainData(pairs, lookup), _config(), big, tokenizer, device="cpu")
    with pytest.raises(TrainingError, match="only 0 training pair"):
        long = PairSet([(5,) * 70] * 3, [0, 1, 2], pairs.image_keys[:3])
        train(tmp_path / "b", TrainData(long, lookup), _config(), _model(), tokenizer, device="cpu")
    with pytest.raises(TrainingError, match="fp16 training needs a CUDA device"):
        train(tmp_path / "c", TrainData(pairs, lookup), _config(precision="fp16"), _model(), tokenizer, device="cpu")
    assert not (tmp_path / "c").exists()  # refused before anything was written: the same name can be retried
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(tmp_path / "d", TrainData(pairs, lookup), _config(), resume=True, device="cpu")


def test_ctrl_c_mid_step_saves_a_checkpoint_that_resumes_exactly(tmp_path, tokenizer):
    from models.training.loop import TrainingInterrupted

    pairs, lookup = planted_pairs(n_images=8)
    config = _config(tasks=(("itm", 1.0), ("mlm", 1.0)), steps=4, grad_accum=2, eval_every=10)
    full = _model()
    train(tmp_path / "a", TrainData(pairs, lookup), config, full, tokenizer, device="cpu")
    interrupted = _model()
    calls = []
    itm = interrupted.itm

    def ctrl_c_on_the_third_itm_batch(batch):  # mid-step: after other micro-batches ran backward
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return itm(batch)

    interrupted.itm = ctrl_c_on_the_third_itm_batch
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step [0-3] of 4.*`resume`"):
        train(tmp_path / "b", TrainData(pairs, lookup), config, interrupted, tokenizer, device="cpu")
    train(tmp_path / "b", TrainData(pairs, lookup), config, resume=True, device="cpu")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_trains_on_cpu(tmp_path, tokenizer):
    pairs, lookup = planted_pairs(n_images=8)
    seen = []
    model = _model()
    config = _config(tasks=(("itm", 1.0), ("mrfr", 1.0)), steps=2, precision="bf16")
    train(tmp_path / "run", TrainData(pairs, lookup, val=pairs), config, model, tokenizer, device="cpu",
          progress=seen.append)
    assert all(np.isfinite(p.info["loss"]) for p in seen if p.event == "step")
    assert model.bert.txt_model.encode_proj[0].weight.dtype == torch.float32  # weights stay fp32 (autocast)


def test_the_grad_scaler_path_steps_checkpoints_and_resumes(tmp_path, tokenizer, monkeypatch):
    """The fp16 path's GradScaler (scale, unscale before clipping, step, update, state in the checkpoint),
    run on CPU by asking for a scaler with bf16 autocast (CPU has no fast fp16)."""
    import models.training.loop as training

    monkeypatch.setattr(training, "resolve_precision", lambda precision, device: (torch.bfloat16, True))
    pairs, lookup = planted_pairs(n_images=8)
    config = _config(steps=4, eval_every=10)
    full = _model()
    train(tmp_path / "a", TrainData(pairs, lookup), config, full, tokenizer, device="cpu")
    train(tmp_path / "b", TrainData(pairs, lookup), config, _model(), tokenizer, device="cpu", stop_at_step=2)
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["scaler"]["scale"] == 65536.0
    train(tmp_path / "b", TrainData(pairs, lookup), config, resume=True, device="cpu")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "bert.txt_model.encode_proj.0.weight"
    assert not torch.equal(a[key], _model().state_dict()[key])  # the scaler let the optimizer step
