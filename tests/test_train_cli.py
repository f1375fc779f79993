"""`ldot train` through typer's CliRunner, from a fake hub `bert-base-cased` and a planted data set."""

from __future__ import annotations

import json

import pytest
from ldot_testing import planted_pairs, write_tiny_hf_bert
from typer.testing import CliRunner

import models
from ldot_cli.main import app
from models.training.data import TrainData

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, no OpenMP contention

runner = CliRunner()


@pytest.fixture
def planted(monkeypatch, ldot_home):
    """bert-base-cased in the cache, and the data readers answering with a planted set."""
    write_tiny_hf_bert(ldot_home / "models" / "bert-base-cased")
    pairs, lookup = planted_pairs(n_images=16)
    seen = []

    def fake_open(spec, tokenizer, **kw):
        seen.append(spec)
        return TrainData(pairs, lookup, val=None if spec.no_val else pairs, description="planted")

    monkeypatch.setattr("ldot_cli.train.driver.open_training_data", fake_open)
    monkeypatch.setattr("ldot_cli.train.driver.check_training_data", lambda spec: None)  # the files are planted
    return seen


def test_finetune_installs_a_model_that_lists_loads_and_resumes(planted, ldot_home):
    args = ["train", "finetune", "--data", str(ldot_home), "--out", "mine", "--epochs", "2", "--batch-size", "8",
            "--lr", "1e-3", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"mine\t{ldot_home / 'models' / 'mine'}" in result.stdout
    assert "mean recall" in result.output and "ldot index PHOTOS --model mine" in result.output
    assert planted[0].dataset == "flickr30k" and planted[0].data == ldot_home
    listed = runner.invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert "local (train)" in listed.output.split("mine", 1)[1].splitlines()[0]
    model = models.load_bi_encoder("mine")
    assert model.encode_text(["a dog"]).shape == (1, 128)
    source = json.loads((ldot_home / "models" / "mine" / "config.json").read_text())["source"]
    assert source["origin"] == "train" and source["steps"] == 8 and source["init"]["text"] == "bert-base-cased"
    assert source["train_config"]["lr"] == 1e-3 and source["train_config"]["epochs"] == 2
    # the same command again: the run exists
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output and len(again.output.strip().splitlines()) == 1
    # resuming a finished run re-installs it; changing a setting on resume is refused
    assert runner.invoke(app, [*args[:-2], "--resume"]).exit_code == 0
    changed = runner.invoke(app, ["train", "finetune", "--out", "mine", "--lr", "5e-4", "--resume"])
    assert changed.exit_code == 2 and "lr 0.001 -> 0.0005" in changed.output
    # --force starts over
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_pretrain_mixes_the_tasks_and_keeps_the_heads(planted, ldot_home):
    result = runner.invoke(app, ["train", "pretrain", "--out", "pre", "--steps", "6", "--batch-size", "8",
                                 "--tasks", "itm,mlm,mrfr,mrckl", "--mix", "2,1,1,1", "--no-val", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (ldot_home / "models" / "pre" / "heads.safetensors").is_file()
    run = json.loads((ldot_home / "runs" / "pre" / "run.json").read_text())
    assert run["train_config"]["tasks"] == [["itm", 2.0], ["mlm", 1.0], ["mrfr", 1.0], ["mrckl", 1.0]]
    assert run["train_config"]["betas"] == [0.9, 0.98] and run["num_region_labels"] == 11
    assert models.load_bi_encoder("pre").config.img_dim == 32


@pytest.mark.parametrize("extra, message", [
    (["--mix", "1,2"], "2 ratios for 4 tasks"),
    (["--tasks", "itm,vqa", "--mix", "1,1"], "unknown task(s) vqa"),
    (["--out", "lightningdot"], "registry name"),
    (["--out", "../x"], "invalid model name"),
    (["--batch-size", "1"], "at least 2"),
    (["--precision", "fp16"], "fp16 training needs a CUDA device"),
])
def test_bad_input_is_one_clear_line(planted, extra, message):
    args = ["train", "pretrain", "--out", "x", "--steps", "2", "--device", "cpu", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_resume_of_an_unknown_run_says_so(planted):
    result = runner.invoke(app, ["train", "finetune", "--out", "nope", "--resume"])
    assert result.exit_code == 2 and "no run named 'nope' to resume" in result.output


def test_missing_bert_says_how_to_get_it():  # before fetching any training data
    result = runner.invoke(app, ["train", "finetune", "--out", "x", "--init", "bert-base-cased"])
    assert result.exit_code == 2 and "ldot models download bert-base-cased" in result.output


def test_warmup_longer_than_the_run_warns_and_save_every_checkpoints(planted, ldot_home):
    result = runner.invoke(app, ["train", "pretrain", "--out", "w", "--steps", "4", "--warmup", "100", "--batch-size",
                                 "8", "--tasks", "itm", "--mix", "1", "--no-val", "--save-every", "1", "--device",
                                 "cpu"])
    assert result.exit_code == 0, result.output
    assert "warning: the warm-up (100 steps) is longer than the run (4 steps)" in " ".join(result.output.split())
    run = ldot_home / "runs" / "w"
    assert json.loads((run / "checkpoint" / "state.json").read_text())["config"]["checkpoint_every"] == 1
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and steps[-1]["lr"] == pytest.approx(5e-5 * 4 / 100)


def test_show_draws_the_curves_and_names_a_missing_run(planted, ldot_home, tmp_path):
    assert runner.invoke(app, ["train", "finetune", "--data", str(ldot_home), "--out", "c", "--epochs", "2",
                               "--batch-size", "8", "--device", "cpu"]).exit_code == 0
    shown = runner.invoke(app, ["train", "show", "c", "--out", str(tmp_path / "c.png")])
    assert shown.exit_code == 0 and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    missing = runner.invoke(app, ["train", "show", "nope"])
    assert missing.exit_code == 2 and "no run named 'nope'" in missing.output


def test_decompose_without_the_object_vocabulary_says_how_to_get_it(planted, ldot_home, vocab_dir):
    from ldot_testing import install_tiny_reranker

    install_tiny_reranker("cross", vocab_dir, img_dim=32)
    args = ["train", "decompose", "--init", "cross", "--out", "d", "--epochs", "1", "--batch-size", "8", "--device",
            "cpu"]
    result = runner.invoke(app, args)  # the planted records hold soft labels: tags are on by default
    assert result.exit_code == 2 and "ldot models download butd-r101-vg" in result.output and "--no-tags" in result.output
    assert runner.invoke(app, [*args, "--no-tags"]).exit_code == 0
    assert models.load_bi_encoder("d").config.tags == ()
