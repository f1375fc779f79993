"""`ldot eval` on image files: features extracted once into the cache (fake detector), then only re-encoded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from evalsets import (
    PlantedEncoder,
    expected_recalls,
    karpathy_json,
    make_plant,
    region_arrays,
)

import feature_extraction.pipeline  # noqa: F401 - the extraction `ensure_features` runs: an ImportError fails
from feature_extraction.types import RegionFeatures, normalize_boxes
from ldot_cli.data.errors import DatasetError
from ldot_cli.data.features import ensure_features, feature_cache_dir
from ldot_cli.data.retrieval_sets import DataPaths, locate
from ldot_cli.eval.evaluation import evaluate


def colour_preprocess(rgb: np.ndarray) -> tuple[torch.Tensor, float]:
    """(H, W, 3) uint8 -> ((3, H, W) float32, 1.0): no resizing, so the fake can read the colour back."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)).astype(np.float32)), 1.0


class ColourDetector:
    """Region features of image j (an image whose red channel is j): feature[:, 0] = j, 12 boxes."""

    preprocess = staticmethod(colour_preprocess)

    def __init__(self, fail: bool = False) -> None:
        self.images = 0
        self.fail = fail

    def extract(self, batch, preset, with_soft_labels=False):
        if self.fail:
            raise AssertionError("the detector must not run: every feature is cached")
        out = []
        for pixels, _, (h, w) in batch:
            self.images += 1
            j = int(pixels[0, 0, 0])
            rec = region_arrays(j, 12)
            boxes = (rec["norm_bb"][:, :4].astype(np.float32) * np.array([w, h, w, h], np.float32))  # (12, 4)
            out.append(RegionFeatures(features=rec["features"], boxes=boxes, norm_bb=normalize_boxes(boxes, h, w),
                                      conf=np.linspace(0.9, 0.3, 12).astype(np.float32),
                                      object_ids=np.zeros(12, np.int64), attr_ids=np.zeros(12, np.int64),
                                      attr_conf=np.ones(12, np.float32), image_size=(h, w)))
        return out


def _images(root, plant):
    from PIL import Image

    folder = root / "flickr30k-images"
    folder.mkdir(parents=True)
    for j in range(plant.n_img):
        Image.new("RGB", (24, 16), (j, 0, 0)).save(folder / f"{1000 + j}.png")
    data = karpathy_json(plant)
    for entry in data["images"]:
        entry["filename"] = entry["filename"].replace(".jpg", ".png")
    (root / "dataset_flickr30k.json").write_text(json.dumps(data))
    return folder


def test_features_are_extracted_once_then_reused(tmp_path, ldot_home):
    plant = make_plant([1, 4, 2, 6, 5, 3, 5, 1, 2, 7, 3, 5], [0, 0, 1, 0, 4, 0, 9, 0, 2, 11], seed=6)
    folder = _images(tmp_path, plant)
    rset = locate("flickr30k", DataPaths(data=tmp_path))
    assert rset.image_db is None and rset.image_root == folder
    detector = ColourDetector()
    cache = ensure_features(rset, detector=detector, num_workers=0)
    assert detector.images == plant.n_img and cache == feature_cache_dir(folder)
    assert cache.is_relative_to(ldot_home / "features")
    report = evaluate(rset, PlantedEncoder(plant))
    want = expected_recalls(plant)
    assert report.recalls.to_dict()["text_to_image"] == pytest.approx(want["text_to_image"])
    assert report.recalls.to_dict()["image_to_text"] == pytest.approx(want["image_to_text"])
    # a second run finds every feature cached: the detector is not even asked
    again = locate("flickr30k", DataPaths(data=tmp_path))
    assert ensure_features(again, detector=ColourDetector(fail=True), num_workers=0) == cache
    # a changed file is extracted again, alone
    from PIL import Image

    Image.new("RGB", (32, 16), (3, 0, 0)).save(folder / "1003.png")
    detector = ColourDetector()
    ensure_features(locate("flickr30k", DataPaths(data=tmp_path)), detector=detector, num_workers=0)
    assert detector.images == 1


def test_a_broken_image_is_a_clear_error(tmp_path):
    plant = make_plant([2, 3, 1], [0], seed=0)
    folder = _images(tmp_path, plant)
    (folder / "1001.png").write_bytes(b"\x89PNG truncated")
    rset = locate("flickr30k", DataPaths(data=tmp_path))
    with pytest.raises(DatasetError, match=r"feature extraction failed for 1 image\(s\) .*1001\.png"):
        ensure_features(rset, detector=ColourDetector(), num_workers=0)
