"""Model ``config.json`` values are range-checked where they are read: an absurd value is one
line naming the file and the key, never a ZeroDivisionError, a 110 s build ending in MemoryError, or an
"unexpected RuntimeError"; a config.json of the wrong JSON shape is one line too."""

from __future__ import annotations

import json

import pytest
from ldot_testing import install_tiny_model, install_tiny_reranker
from typer.testing import CliRunner

from ldot_cli.main import app
from models.core.errors import LdotError

runner = CliRunner()


def _edit(path, section: str | None, key: str, value) -> None:
    meta = json.loads(path.read_text())
    target = meta["config"] if section is None else meta["config"][section]
    target[key] = value
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("section, key, value", [
    ("text", "num_heads", 0),  # was ZeroDivisionError
    (None, "project_dim", -1),  # was RuntimeError
    ("image", "num_layers", 100_000),  # was 110 s, then MemoryError
    ("text", "hidden_size", 10**6),
    ("text", "num_heads", 7),  # 128 not divisible by 7
    ("text", "dropout", float("nan")),
    (None, "img_dim", 0),
])
def test_an_absurd_bi_encoder_config_value_is_one_line_naming_the_file_and_key(vocab_dir, ldot_home, section, key,
                                                                              value):
    from models.hub.load import load_bi_encoder

    path = install_tiny_model("odd", vocab_dir, img_dim=32) / "config.json"
    _edit(path, section, key, value)
    (path.parent / "ldot-manifest.json").unlink(missing_ok=True)  # not a damaged file: a bad value
    with pytest.raises(LdotError) as caught:
        load_bi_encoder(path.parent, device="cpu")
    message = str(caught.value)
    assert str(path) in message and key in message and "\n" not in message


def test_an_absurd_reranker_config_value_is_refused(vocab_dir, ldot_home):
    from models.hub.load import load_reranker

    path = install_tiny_reranker("odd-rr", vocab_dir, img_dim=32) / "config.json"
    _edit(path, "body", "num_heads", 0)
    (path.parent / "ldot-manifest.json").unlink(missing_ok=True)
    with pytest.raises(LdotError, match="num_heads"):
        load_reranker(path.parent, device="cpu")


@pytest.mark.parametrize("key, value", [("hidden_size", 10**6), ("num_attention_heads", 0), ("x_layers", 100_000),
                                        ("visual_feat_dim", -1), ("hidden_size", 33)])
def test_an_absurd_lxmert_config_is_refused_before_transformers_builds_it(tmp_path, vocab_dir, key, value):
    from transformers import LxmertConfig, LxmertForPreTraining

    from models.hub.load import load_reranker

    cfg = LxmertConfig(vocab_size=128, hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1,
                       x_layers=1, r_layers=1, visual_feat_dim=32, num_object_labels=10, num_attr_labels=5,
                       num_qa_labels=3)
    LxmertForPreTraining(cfg).save_pretrained(tmp_path / "lxmert")
    (tmp_path / "lxmert" / "vocab.txt").write_text((vocab_dir / "vocab.txt").read_text())
    config = tmp_path / "lxmert" / "config.json"
    raw = json.loads(config.read_text())
    raw[key] = value
    config.write_text(json.dumps(raw))
    with pytest.raises(LdotError) as caught:
        load_reranker(tmp_path / "lxmert", device="cpu")
    assert str(config) in str(caught.value) and key in str(caught.value)
    result = runner.invoke(app, ["models", "import", str(tmp_path / "lxmert"), "--as", "odd-lxmert"])
    assert result.exit_code == 2 and key in result.output and "unexpected" not in result.output


def test_an_absurd_visualbert_config_is_refused(tmp_path):
    from models.hub.decompose import read_decompose_source

    folder = tmp_path / "vb"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "visual_bert", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 0, "intermediate_size": 64, "max_position_embeddings": 64,
        "visual_embedding_dim": 16}))
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LdotError) as caught:
        read_decompose_source(folder)
    assert str(folder / "config.json") in str(caught.value) and "num_attention_heads" in str(caught.value)


@pytest.mark.parametrize("text", ["[]", "3", '"x"', "null"])
def test_import_of_a_folder_whose_config_is_not_an_object_is_one_line(tmp_path, ldot_home, text):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    result = runner.invoke(app, ["models", "import", str(folder), "--as", "odd"])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "unexpected" not in line and str(folder / "config.json") in " ".join(line.split()) and "object" in line


def test_a_bert_config_used_to_initialise_training_is_range_checked_too(tmp_path):
    from models.training.initialization import bert_config, read_source

    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 100_000,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}))
    with pytest.raises(LdotError, match="'num_hidden_layers' is 100000") as caught:
        bert_config(folder, {})
    assert str(folder / "config.json") in str(caught.value)
    (folder / "config.json").write_text("[]")
    with pytest.raises(LdotError, match="not an object"):
        read_source(folder)
