"""Weight layouts: hub state dict, py-bottom-up-attention pickle, our safetensors dir; the safe unpickler."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from feature_extraction.detector.config import (
    DetectorConfig,
    RuntimeOptions,
    tiny_config,
)
from feature_extraction.detector.preprocess import preprocess
from feature_extraction.detector.weights import (
    DetectorWeightsError,
    UnsafePickleError,
    convert_d2_state_dict,
    convert_hub_state_dict,
    detect_layout,
    expected_shapes,
    load_detector,
    read_restricted_pickle,
    save_detector,
)
from tests.detector_fixtures import (
    KEYS_FILE,
    hub_key_shapes,
    random_hub_state_dict,
    synthetic_image,
    to_d2_payload,
)

CFG = tiny_config()


@pytest.fixture(scope="module")
def hub_state() -> dict[str, torch.Tensor]:
    return random_hub_state_dict(CFG, seed=1)


@pytest.fixture(scope="module")
def images():
    return [preprocess(synthetic_image(120, 150, 7), CFG), preprocess(synthetic_image(90, 200, 8), CFG)]


def _outputs(model, images):
    return [(r.proposals, r.features, r.cls_logits, r.attr_logits, r.box_deltas) for r in model.detect(images)]


def _assert_same(a, b):
    for xs, ys in zip(a, b):
        for x, y in zip(xs, ys):
            assert torch.equal(x, y)


def read_hub_key_list() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in KEYS_FILE.read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        shapes[name] = tuple(json.loads(shape))
    return shapes


def test_full_hub_key_list_maps_exactly():
    """Every one of the 640 live hub keys maps to the full model, shapes included (no network run)."""
    listed = read_hub_key_list()
    assert len(listed) == 640
    assert hub_key_shapes(DetectorConfig()) == listed
    with torch.device("meta"):
        state = {k: torch.empty(s, dtype=torch.int64 if k.endswith("tracked") else torch.float32) for k, s in listed.items()}
    converted = convert_hub_state_dict(state, DetectorConfig())
    assert len(converted) == 640 - sum(k.endswith("num_batches_tracked") for k in listed)
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected_shapes(DetectorConfig())


def test_hub_converter_handles_old_names_and_counters(hub_state, images):
    plain = load_detector(hub_state, CFG, options=RuntimeOptions.plain())
    old = {}
    for k, v in hub_state.items():
        if k.endswith(".norm.weight"):
            k = k[: -len("weight")] + "gamma"
        elif k.endswith(".norm.bias"):
            k = k[: -len("bias")] + "beta"
        old[k] = v
    renamed = load_detector(old, CFG, options=RuntimeOptions.plain())
    _assert_same(_outputs(plain, images), _outputs(renamed, images))


def test_converter_lists_missing_unexpected_and_misshaped(hub_state):
    broken = dict(hub_state)
    del broken["roi_heads.box_predictor.attr_score.bias"]
    broken["roi_heads.extra.weight"] = torch.zeros(3)
    broken["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(7)
    with pytest.raises(DetectorWeightsError) as err:
        convert_hub_state_dict(broken, CFG)
    msg = str(err.value)
    assert "attr_score.bias" in msg and "roi_heads.extra.weight" in msg and "cls_score.bias: file (7,)" in msg


def test_converter_rejects_a_checkpoint_for_another_config(hub_state):
    with pytest.raises(DetectorWeightsError, match="shape mismatches"):
        convert_hub_state_dict(hub_state, DetectorConfig())


def test_d2_pickle_layout_loads_like_the_hub_layout(tmp_path, hub_state, images):
    path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    with open(path, "wb") as f:
        pickle.dump(to_d2_payload(hub_state, drop_stats=True), f, protocol=2)
    assert detect_layout(read_restricted_pickle(path)) == "d2"
    from_pkl = load_detector(path, CFG, options=RuntimeOptions.plain())
    from_hub = load_detector(hub_state, CFG, options=RuntimeOptions.plain())
    _assert_same(_outputs(from_hub, images), _outputs(from_pkl, images))


def test_d2_norms_without_statistics_get_identity_statistics(hub_state):
    payload = to_d2_payload(hub_state)
    for k in [k for k in payload["model"] if k.endswith(("running_mean", "running_var"))]:
        del payload["model"][k]
    state = convert_d2_state_dict(payload, CFG)
    assert torch.equal(state["backbone.stem.conv1.norm.running_mean"], torch.zeros(CFG.stem_channels))
    assert torch.equal(state["backbone.stem.conv1.norm.running_var"], torch.ones(CFG.stem_channels))


def test_d2_rejects_caffe2_blob_names():
    with pytest.raises(DetectorWeightsError, match="Caffe2"):
        convert_d2_state_dict({"model": {"conv1_w": np.zeros((2, 2), np.float32)}}, CFG)


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.stem.conv1.weight": _Evil(str(marker))}}, f)
    with pytest.raises(UnsafePickleError, match="system"):
        read_restricted_pickle(path)
    with pytest.raises(UnsafePickleError):
        load_detector(path, CFG)
    assert not marker.exists()


def test_torch_bin_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"backbone.stem.conv1.weight": _Evil(str(marker))}, path)
    with pytest.raises(UnsafePickleError):
        load_detector(path, CFG)
    assert not marker.exists()


def test_restricted_unpickler_reads_numpy_payloads(tmp_path):
    data = {"model": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(2.5)}, "__author__": "x"}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"p{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=protocol)
        back = read_restricted_pickle(path)
        assert np.array_equal(back["model"]["a"], data["model"]["a"]) and back["model"]["b"] == 2.5


def test_save_and_load_safetensors_dir(tmp_path, hub_state, images):
    model = load_detector(hub_state, CFG)  # folded, channels-last
    save_detector(model, tmp_path / "det")
    meta = json.loads((tmp_path / "det" / "config.json").read_text())
    assert meta["format"] == "ldot-butd-detector" and meta["config"]["num_classes"] == CFG.num_classes
    again = load_detector(tmp_path / "det")  # config comes from the directory
    assert again.config == CFG
    for a, b in zip(_outputs(model, images), _outputs(again, images)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    meta["format_version"] = 99
    (tmp_path / "det" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(DetectorWeightsError, match="newer"):
        load_detector(tmp_path / "det")


def test_unknown_inputs_are_refused(tmp_path):
    with pytest.raises(DetectorWeightsError, match="unrecognised"):
        load_detector({"foo": torch.zeros(1)}, CFG)
    with pytest.raises(DetectorWeightsError, match="not found: .*missing.bin"):
        load_detector(tmp_path / "missing.bin", CFG)
    odd = tmp_path / "w.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(DetectorWeightsError, match="format"):
        load_detector(odd, CFG)


def test_half_precision_is_cuda_only(hub_state):
    with pytest.raises(ValueError, match="CUDA"):
        load_detector(hub_state, CFG, dtype=torch.bfloat16)
