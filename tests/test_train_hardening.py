"""`ldot train` after a kill -9 (its temp folders cleaned, a live run's left alone) and on damaged
features (named as such)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from ldot_testing import planted_pairs

from models.nn.config import preset
from models.nn.pretraining import BiEncoderForPretraining
from models.training.data import FeatureValueError, TrainData
from models.training.loop import TrainConfig, TrainingError, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> BiEncoderForPretraining:
    torch.manual_seed(0)
    return BiEncoderForPretraining(preset("tiny"), num_region_labels=11)


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(batch_size=8, lr=1e-3, warmup=0.1, epochs=None, steps=2, eval_every=2), **kw})


def _leftovers(run):
    """What a kill -9 during a checkpoint (and during a best-model write) leaves behind."""
    stale = run / ".checkpoint.k2x9q1.tmp"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)  # a full model + optimizer copy, in real life
    best = run / ".best.tmp-424242.safetensors"
    best.write_bytes(b"\0" * 1024)
    return stale, best


def test_a_killed_checkpoint_s_temp_folders_are_removed_at_the_next_start(tmp_path, tokenizer):
    pairs, lookup = planted_pairs(n_images=8)
    data = TrainData(pairs, lookup, val=pairs)
    run = tmp_path / "run"
    train(run, data, _config(steps=4), _model(), tokenizer, device="cpu", stop_at_step=2)
    stale, best = _leftovers(run)
    result = train(run, data, _config(steps=4), resume=True, device="cpu")
    assert result.finished and not stale.exists() and not best.exists()
    assert not list(run.glob(".checkpoint.*.tmp"))


def test_temp_folders_of_a_live_run_are_left_alone(tmp_path, tokenizer):
    """Only the run's lock holder may clean: a second `train` on a run in progress is refused, touching nothing."""
    pairs, lookup = planted_pairs(n_images=8)
    data = TrainData(pairs, lookup, val=pairs)
    run = tmp_path / "run"
    train(run, data, _config(steps=4), _model(), tokenizer, device="cpu", stop_at_step=2)
    stale, best = _leftovers(run)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from models.training.loop import run_lock
        with run_lock(Path({str(run)!r})):
            print("held", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainingError, match="being trained by another process"):
            train(run, data, _config(steps=4), resume=True, device="cpu")
        assert stale.is_dir() and best.is_file()  # the live run's files
    finally:
        holder.kill()
        holder.wait()
    assert train(run, data, _config(steps=4), resume=True, device="cpu").finished  # its lock died with it
    assert not stale.exists() and not best.exists()


def test_nan_features_are_named_not_blamed_on_the_learning_rate(tmp_path, tokenizer):
    pairs, lookup = planted_pairs(n_images=8)
    broken = pairs.image_keys[3]
    features = np.array(lookup[broken].features)
    features[1, 5] = np.nan
    lookup[broken] = type(lookup[broken])(features, lookup[broken].norm_bb, lookup[broken].soft_labels)
    data = TrainData(pairs, lookup, val=pairs, description="the test's planted image DB")
    with pytest.raises(FeatureValueError) as caught:
        train(tmp_path / "run", data, _config(steps=4), _model(), tokenizer, device="cpu")
    message = str(caught.value)
    assert f"image {broken!r}" in message and "features" in message and "NaN/Inf" in message
    assert "planted image DB" in message and "lr" not in message
    boxes = np.array(lookup[pairs.image_keys[0]].norm_bb)
    boxes[0, 0] = np.inf
    lookup[broken] = type(lookup[broken])(np.nan_to_num(features), lookup[broken].norm_bb, lookup[broken].soft_labels)
    lookup[pairs.image_keys[0]] = type(lookup[broken])(lookup[pairs.image_keys[0]].features, boxes,
                                                        lookup[pairs.image_keys[0]].soft_labels)
    with pytest.raises(FeatureValueError, match=f"region norm_bb of image {pairs.image_keys[0]!r}"):
        train(tmp_path / "run2", data, _config(steps=4), _model(), tokenizer, device="cpu")
