"""int8 query encoders (`models.nn.quantize`): every linear layer of any torch module, the same vectors within
int8's rounding, and the precision each kind of process uses (`benchmarks/quantize.py` measures speed and recall)."""

from __future__ import annotations

import copy

import pytest
import torch
from fakes import FakeDetector
from ldot_testing import install_tiny_model, make_photos
from torch import nn

from models.nn.quantize import Int8Linear, int8_available, int8_linears, query_precision

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not int8_available(), reason="this torch has no int8 kernels")]


def _linears(module: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in module.modules() if isinstance(m, (nn.Linear, Int8Linear))})


def test_every_linear_layer_of_the_text_tower_becomes_int8(tiny_model, tokenizer):
    tiny_model._tokenizer = tokenizer
    texts = ["a dog on the beach", "a red car in the street", "two people on a bench"]
    before = tiny_model.encode_text(texts)
    quantised = int8_linears(copy.deepcopy(tiny_model))
    assert _linears(quantised.txt_model) == ["Int8Linear"]  # the layers' own nn.Linear subclass included
    after = quantised.encode_text(texts)
    assert after.shape == before.shape and after.dtype == before.dtype
    assert torch.nn.functional.cosine_similarity(before, after).min() > 0.98
    assert not torch.equal(before, after)  # really int8


def test_any_module_opts_in_and_unloaded_towers_are_left_alone():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Sequential(nn.Linear(32, 8)))
    with torch.device("meta"):
        plain.append(nn.Linear(8, 8))  # a tower that was never loaded
    x = torch.randn(4, 16)
    reference = plain[:3](x)
    int8_linears(plain)
    assert [type(m).__name__ for m in (plain[0], plain[2][0], plain[3])] == ["Int8Linear", "Int8Linear", "Linear"]
    assert torch.allclose(plain[:3](x), reference, atol=0.05 * reference.abs().max().item())


def test_the_searcher_encodes_in_int8_when_asked(monkeypatch, vocab_dir, tmp_path):
    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions
    from ldot_cli.index.search import Searcher

    install_tiny_model("tiny", vocab_dir)
    make_photos(tmp_path / "photos", 3)
    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([tmp_path / "photos"])
    for setting, expected in ((None, "Linear"), ("fp32", "Linear"), ("int8", "Int8Linear"), ("bogus", "Linear")):
        if setting is None:
            monkeypatch.delenv("LDOT_QUERY_PRECISION", raising=False)
        else:
            monkeypatch.setenv("LDOT_QUERY_PRECISION", setting)
        assert query_precision() == ("int8" if setting == "int8" else "fp32")
        searcher = Searcher("default")
        try:
            assert _linears(searcher.encoder.txt_model) == [expected]
            assert len(searcher.search("a dog on the beach", k=3)) == 3
        finally:
            searcher.close()
