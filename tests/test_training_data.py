"""The training-data adapter on real files: a UNITER text DB, a Karpathy split file and UNITER image DBs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ldot_testing import write_vocab

import feature_extraction.uniter_db as uniter_db
from ldot_cli.data.training_data import DataSpec, TrainDataError, open_training_data
from models.nn.tokenizer import Tokenizer


def _image_db(directory, keys, labels=1601, seed=0):
    rng = np.random.default_rng(seed)
    with uniter_db.UniterImageDBWriter(directory, "uniter") as db:
        for key in keys:
            n = 12
            soft = rng.dirichlet(np.ones(labels), size=n)
            db.put(key, {"features": rng.normal(size=(n, 2048)).astype(np.float16),
                         "norm_bb": rng.uniform(0, 1, size=(n, 6)).astype(np.float16),
                         "conf": np.full((n, 1), 0.9, np.float16), "soft_labels": soft.astype(np.float16)})
        db.commit()


def _text_db(directory, rows):
    """rows: (sentence id, word-piece ids, image name)."""
    import lmdb
    import lz4.frame
    import msgpack

    directory.mkdir(parents=True)
    env = lmdb.open(str(directory), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for sid, ids, img in rows:
            txn.put(sid.encode(), lz4.frame.compress(msgpack.packb({"input_ids": ids, "img_fname": img, "raw": "x"})))
    env.close()
    (directory / "meta.json").write_text(json.dumps({"CLS": 2, "SEP": 3, "MASK": 4, "v_range": [5, 128]}))
    (directory / "id2len.json").write_text(json.dumps({sid: len(ids) for sid, ids, _ in rows}))
    (directory / "txt2img.json").write_text(json.dumps({sid: img for sid, _, img in rows}))


@pytest.fixture
def tokenizer(tmp_path):
    return Tokenizer.from_path(write_vocab(tmp_path / "tok"))


def test_flickr_text_dbs_and_image_db_under_data(tmp_path, tokenizer):
    keys = [f"flickr30k_{i:012d}.npz" for i in range(1, 5)]
    _image_db(tmp_path / "img" / "flickr30k", keys)
    _text_db(tmp_path / "txt_db" / "itm_flickr30k_train_base-cased.db",
             [(f"s{i}", [10 + i, 11], keys[i % 3]) for i in range(6)] + [("long", [12] * 61, keys[0])])
    _text_db(tmp_path / "txt_db" / "itm_flickr30k_val_base-cased.db", [("v0", [20, 21], keys[3])])
    data = open_training_data(DataSpec("flickr30k", tmp_path), tokenizer)
    assert len(data.train) == 7 and data.train.drop_long(60).token_ids[0] == (10, 11)
    assert sorted(data.train.image_keys) == sorted(keys[:3]) and data.val.image_keys == [keys[3]]
    record = data.features[keys[0]]
    assert record.features.shape == (12, 2048) and record.soft_labels.shape == (12, 1601)


def test_coco_karpathy_spans_two_image_dbs(tmp_path, tokenizer):
    images = [{"filepath": fp, "filename": f"COCO_{fp}_{i:012d}.jpg", "split": split,
               "sentences": [{"raw": "a dog on the beach", "sentid": i}]}
              for i, (fp, split) in enumerate([("train2014", "train"), ("val2014", "restval"), ("val2014", "val")])]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    _image_db(tmp_path / "coco_train2014", ["coco_train2014_000000000000.npz"])
    _image_db(tmp_path / "coco_val2014", ["coco_val2014_000000000001.npz", "coco_val2014_000000000002.npz"])
    data = open_training_data(DataSpec("coco", tmp_path), tokenizer)
    assert data.train.image_keys == ["coco_train2014_000000000000.npz", "coco_val2014_000000000001.npz"]
    assert data.val.image_keys == ["coco_val2014_000000000002.npz"]
    expected = tokenizer.backend.encode("a dog on the beach", add_special_tokens=False).ids
    assert data.train.token_ids[0] == tuple(expected)
    assert data.features["coco_val2014_000000000001.npz"].features.shape == (12, 2048)


def test_missing_features_are_named(tmp_path, tokenizer):
    _image_db(tmp_path / "flickr30k", ["flickr30k_000000000001.npz"])
    _text_db(tmp_path / "itm_flickr30k_train.db", [("s0", [10], "flickr30k_000000000009.npz")])
    with pytest.raises(TrainDataError, match="1 of the 1 training images have no features.*000000000009"):
        open_training_data(DataSpec("flickr30k", tmp_path, no_val=True), tokenizer)
    with pytest.raises(TrainDataError, match="no training captions"):
        open_training_data(DataSpec("flickr30k", tmp_path / "flickr30k"), tokenizer)
