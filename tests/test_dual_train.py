"""`ldot train finetune --init clip-vit-b32`: the LightningDOT fine-tuning loop on a dual encoder's pixels."""

from __future__ import annotations

import json

import pytest
import torch
from dual_fixtures import install_tiny_dual
from ldot_testing import make_photos
from typer.testing import CliRunner

from ldot_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
WORDS = ["dog", "cat", "beach", "snow", "car", "sea"]


def _karpathy(root, n_train=8, n_val=4):
    photos = make_photos(root / "src", n_train + n_val, size=(48, 40))
    (root / "flickr30k-images").mkdir(parents=True)
    images = []
    for j, photo in enumerate(photos):
        name = f"{2000 + j}.jpg"
        photo.rename(root / "flickr30k-images" / name)
        split = "train" if j < n_train else "val"
        sentences = [{"raw": f"a {WORDS[j % 6]} on the {WORDS[(j + k + 1) % 6]}", "tokens": [], "sentid": 10 * j + k,
                      "imgid": j} for k in range(2)]
        images.append({"filename": name, "split": split, "imgid": j, "sentences": sentences})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def test_finetune_a_dual_encoder_logs_resumes_and_installs_a_loadable_model(tmp_path, ldot_home):
    from models.hub.installed import read_manifest
    from models.hub.load import load_bi_encoder

    install_tiny_dual("clip-vit-b32", "clip", seed=4)
    data = _karpathy(tmp_path / "flickr")
    before = load_bi_encoder("clip-vit-b32").encode_text(["a dog on the beach"])
    from ldot_cli.data.training_data import DataSpec
    from ldot_cli.train.driver import TrainRequest, run_training

    # time-boxed: stop after 2 of the 8 steps (what an interrupted run leaves), then `--resume` finishes it
    stopped = run_training(TrainRequest("finetune", "my-clip", DataSpec("flickr30k", data), init="clip-vit-b32",
                                        overrides={"epochs": 2, "batch_size": 4, "lr": 1e-3, "hard_negatives": 1},
                                        device="cpu", stop_at_step=2))
    assert stopped.result.step == 2 and not stopped.result.finished and stopped.model_dir is None
    run = ldot_home / "runs" / "my-clip"
    assert (run / "checkpoint" / "state.json").is_file() and not (ldot_home / "models" / "my-clip").exists()
    resumed = runner.invoke(app, ["train", "finetune", "--out", "my-clip", "--data", str(data), "--resume",
                                  "--device", "cpu"])
    assert resumed.exit_code == 0, resumed.output
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "step"] == list(range(1, 9))  # 16 pairs / 4 x 2 epochs
    assert any(r["event"] == "eval" and "mean_recall" in r for r in log)
    info = json.loads((run / "run.json").read_text())
    assert info["model_kind"] == "dual-encoder" and info["init"]["text"] == "clip-vit-b32"
    assert 0 < info["model_config"]["temperature"] < 1
    manifest = read_manifest(ldot_home / "models" / "my-clip")
    assert manifest["kind"] == "dual-encoder" and manifest["origin"] == "train"
    model = load_bi_encoder("my-clip")  # a save_pretrained folder: loads like any dual encoder
    after = model.encode_text(["a dog on the beach"])
    assert after.shape == before.shape and not torch.allclose(after, before, atol=1e-4)  # the weights moved
    assert (ldot_home / "models" / "my-clip" / "calibration.json").is_file()


def test_dual_encoder_is_not_pretrained_nor_distilled(tmp_path, ldot_home):
    install_tiny_dual("clip-vit-b32", "clip")
    data = _karpathy(tmp_path / "flickr", 4, 2)
    result = runner.invoke(app, ["train", "pretrain", "--init", "clip-vit-b32", "--data", str(data), "--out", "p",
                                 "--steps", "1", "--device", "cpu"])
    assert result.exit_code == 2 and "not pre-trained" in result.output
    result = runner.invoke(app, ["train", "finetune", "--init", "clip-vit-b32", "--data", str(data), "--out", "q",
                                 "--distill-from", "uniter-base", "--device", "cpu"])
    assert result.exit_code == 2 and "not offered for a dual encoder" in result.output
