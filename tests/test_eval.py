"""`ldot eval`'s library: every recall, with and without re-ranking, on planted benchmarks in every layout."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from evalsets import (
    PlantedEncoder,
    PlantedReranker,
    expected_ranks,
    expected_recalls,
    karpathy_json,
    karpathy_layout,
    make_plant,
    mean_recalls,
    region_arrays,
    uniter_layout,
    write_image_db,
    write_multi30k,
    write_text_db,
)

from ldot_cli.data.errors import DatasetError
from ldot_cli.data.features import ensure_features
from ldot_cli.data.retrieval_sets import (
    DataPaths,
    image_file_from_uniter_key,
    locate,
    read_karpathy,
    uniter_image_key,
)
from ldot_cli.eval.evaluation import evaluate
from models.training.metrics import (
    Recalls,
    image_to_text_ranks,
    recalls_from_vectors,
    text_to_image_ranks,
)

# 14 images with 1..8 captions (fewer and more than 5); rank designs reach past 10.
COUNTS = [1, 7, 2, 5, 6, 3, 5, 4, 8, 1, 5, 2, 5, 3]
# Most captions find their image first; a few have it at rank 1..10 (the row's number of "high" cells).
ROW_HIGHS = [0, 0, 0, 1, 0, 0, 3, 0, 0, 6, 0, 0, 2, 0, 0, 2, 0, 8, 0, 1, 0, 4, 0, 0, 0, 0, 0, 0, 7, *[0] * 13, 10,
             0, 0, 0, 5, 9, *[0] * 9]


@pytest.fixture(scope="module")
def plant():
    return make_plant(COUNTS, ROW_HIGHS, seed=1, decay=0.6)


def _as_dict(rec: Recalls) -> dict:
    return rec.to_dict()


def _check(report_recalls: dict, expected: dict) -> None:
    for direction in ("text_to_image", "image_to_text"):
        for k, v in expected[direction].items():
            assert report_recalls[direction][k] == pytest.approx(v), (direction, k)
    assert report_recalls["rsum"] == pytest.approx(expected["rsum"])


def test_plant_is_discriminative(plant):
    """The design must spread ranks across 1/5/10 in both directions, or the tests below prove little."""
    t2i, i2t = expected_ranks(plant)
    for ranks in (t2i, i2t):
        assert (ranks == 0).any() and ((ranks >= 1) & (ranks < 5)).any() and ((ranks >= 5) & (ranks < 10)).any()
        assert (ranks >= 10).any()
    for m in (3, 10):
        assert expected_recalls(plant, m=m) != expected_recalls(plant)


def test_rank_functions_by_hand():
    # captions 0,1 -> image 0; caption 2 -> image 1; caption 3 -> image 2; lists cut at k=2 (2 = absent)
    caption_image = np.array([0, 0, 1, 2])
    ranked_images = np.array([[0, 1], [1, 0], [2, 1], [0, 1]])
    assert text_to_image_ranks(ranked_images, caption_image).tolist() == [0, 1, 1, 2]
    ranked_texts = np.array([[2, 1], [3, 0], [3, 0]])  # image 0 finds c1 second; image 1 never finds c2
    assert image_to_text_ranks(ranked_texts, caption_image).tolist() == [1, 2, 0]
    scores = np.array([[3.0, 2, 1], [2, 3, 1], [1, 3, 2], [3, 2, 1]])  # captions x images
    rec = recalls_from_vectors(scores, np.eye(3), caption_image, ks=(1, 2))
    assert rec.text_to_image == {1: 50.0, 2: 75.0}  # ranks 0, 1, 0, 2
    assert rec.image_to_text == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3)}  # ranks 0, 1, 3
    assert rec.rsum == pytest.approx(225.0)


@pytest.mark.parametrize("layout", ["uniter", "karpathy"])
def test_recalls_and_reranking_are_exact(tmp_path, plant, layout):
    root = (uniter_layout if layout == "uniter" else karpathy_layout)(tmp_path / "data", plant)
    rset = locate("flickr30k", DataPaths(data=root))
    assert len(rset.images) == plant.n_img and len(rset.captions) == plant.n_txt
    assert ("txt_db" in rset.sources["captions"]) == (layout == "uniter")
    ensure_features(rset)  # the UNITER DB as it is; Karpathy: the cache written by the fixture
    encoder, reranker = PlantedEncoder(plant), PlantedReranker(plant)
    ms = (3, 5, 10, 20, 100)
    report = evaluate(rset, encoder, reranker=reranker, rerank_ks=ms, cross_sample=40)
    _check(_as_dict(report.recalls), expected_recalls(plant))
    for m in ms:
        _check(_as_dict(report.reranked[m]), expected_recalls(plant, m=m))
    # token ids from the text DB; raw captions otherwise
    assert report.text_input == ("token-ids" if layout == "uniter" else "raw-text")
    assert encoder.calls["token_ids" if layout == "uniter" else "text"] == plant.n_txt
    # each M scores only its new band: pairs = n_txt * min(M, n_img) + n_img * min(M, n_txt), none twice
    t = report.timings
    for m in ms:
        assert t.rerank_pairs[m] == plant.n_txt * min(m, plant.n_img) + plant.n_img * min(m, plant.n_txt)
    top = max(ms)
    assert reranker.pairs == t.rerank_pairs[top] + 40 + 4  # + the timed sample and its warm-up
    assert t.full_matrix_pairs == plant.n_txt * plant.n_img
    assert t.cross_full_matrix_s == pytest.approx(t.cross_per_pair_s * plant.n_txt * plant.n_img)
    assert t.speedup() == pytest.approx(t.cross_full_matrix_s / t.bi_encoder_s)
    assert all(t.rerank_s[a] <= t.rerank_s[b] for a, b in zip(ms, ms[1:]))
    assert report.text_vectors.shape == (plant.n_txt, plant.n_img)
    assert report.image_vectors.shape == (plant.n_img, plant.n_img)


def test_mixed_layout_karpathy_with_uniter_image_db(tmp_path, plant):
    uniter_layout(tmp_path, plant)
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "dataset_flickr30k.json").write_text(json.dumps(karpathy_json(plant)))
    rset = locate("flickr30k", DataPaths(karpathy=tmp_path / "ann" / "dataset_flickr30k.json",
                                         img_db=tmp_path / "img_db" / "flickr30k"))
    assert rset.images[0].key == "flickr30k_000000001000.npz"
    report = evaluate(rset, PlantedEncoder(plant))
    _check(_as_dict(report.recalls), expected_recalls(plant))


@pytest.mark.parametrize("layout", ["uniter", "karpathy"])
def test_coco_1k_folds_are_averaged(tmp_path, layout):
    # 3 folds of 5 images; a fold sees only its images and their captions
    plant = make_plant([1, 6, 2, 5, 3, 7, 1, 4, 5, 2, 3, 6, 1, 5, 4], [0, 2, 1, 4, 0, 3, 1, 0, 6], seed=5)
    root = (uniter_layout if layout == "uniter" else karpathy_layout)(tmp_path / "d", plant, "coco")
    rset = locate("coco", DataPaths(data=root))
    ensure_features(rset)
    folds = [np.arange(s, s + 5) for s in (0, 5, 10)]
    report = evaluate(rset, PlantedEncoder(plant), reranker=PlantedReranker(plant), rerank_ks=(2, 4),
                      fold_size=5, cross_sample=0)
    per_fold = [expected_recalls(plant, f) for f in folds]
    assert len(report.fold_recalls) == 3
    for got, want in zip(report.fold_recalls, per_fold):
        _check(got.to_dict(), want)
    _check(report.to_dict()["recall"], mean_recalls(per_fold))
    assert report.to_dict()["recall"] != expected_recalls(plant)  # folds differ from the whole set
    for m in (2, 4):
        _check(report.to_dict()["rerank"][str(m)], mean_recalls([expected_recalls(plant, f, m) for f in folds]))
    assert report.split == "1k" and report.timings.full_matrix_pairs == sum(
        int(np.isin(plant.caption_image, f).sum()) * 5 for f in folds)
    assert report.timings.cross_full_matrix_s is None  # cross_sample=0: not measured


def test_folds_need_a_multiple_of_the_fold_size(tmp_path, plant):
    rset = locate("flickr30k", DataPaths(data=uniter_layout(tmp_path, plant)))
    with pytest.raises(DatasetError, match="multiple of 5 images; this set has 14"):
        evaluate(rset, PlantedEncoder(plant), fold_size=5)


@pytest.mark.parametrize("gz", [True, False])
def test_multi30k_with_flickr_image_db(tmp_path, gz):
    plant = make_plant([1] * 13, [0, 1, 0, 4, 7, 11, 2, 0, 5], seed=2)
    texts = [plant.text(q) for q in range(plant.n_txt)]
    names = [f"{1000 + j}.jpg" for j in range(plant.n_img)]
    write_multi30k(tmp_path, texts, names, "fr", gz=gz)
    write_image_db(tmp_path / "img_db" / "flickr30k",
                   {f"flickr30k_{1000 + j:012d}.npz": region_arrays(j, 10) for j in range(plant.n_img)})
    rset = locate("multi30k", DataPaths(data=tmp_path), lang="fr")
    assert rset.lang == "fr" and [c.id for c in rset.captions[:2]] == ["fr:1", "fr:2"]
    report = evaluate(rset, PlantedEncoder(plant), reranker=PlantedReranker(plant), rerank_ks=(3,), cross_sample=0)
    _check(report.recalls.to_dict(), expected_recalls(plant))
    _check(report.reranked[3].to_dict(), expected_recalls(plant, m=3))


def test_uniter_names_round_trip():
    assert uniter_image_key("flickr30k", "1000092795.jpg") == "flickr30k_001000092795.npz"
    assert uniter_image_key("coco", "val2014/COCO_val2014_000000391895.jpg") == "coco_val2014_000000391895.npz"
    for key in ("flickr30k_001000092795.npz", "coco_val2014_000000391895.npz"):
        dataset = "coco" if key.startswith("coco") else "flickr30k"
        assert uniter_image_key(dataset, image_file_from_uniter_key(key)) == key
    with pytest.raises(DatasetError, match="naming"):
        uniter_image_key("flickr30k", "holiday.jpg")


def test_karpathy_reader_keeps_every_sentence_and_skips_other_splits(tmp_path, plant):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps(karpathy_json(plant)))
    files, captions = read_karpathy(path, "test")
    assert len(files) == plant.n_img and len(captions) == plant.n_txt
    assert captions[0] == ("7000", plant.text(0), 0, None)
    files, captions = read_karpathy(path, "train")
    assert files == ["999.jpg"] and captions[0][1] == "a train caption"


# ------------------------------------------------------------------------------------------ bad inputs
def _karpathy(tmp_path, obj) -> DataPaths:
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    (tmp_path / "flickr30k-images").mkdir(exist_ok=True)
    return DataPaths(data=tmp_path)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ({"dataset": "x"}, "has no 'images' list"),
    ({"images": [{"filename": "1.jpg"}]}, r"images\[0\] has no 'split'"),
    ({"images": [{"split": "test", "sentences": []}]}, r"images\[0\] lacks a 'filename'"),
    ({"images": [{"split": "test", "filename": "1.jpg", "sentences": [{"sentid": 1}]}]},
     r"images\[0\]\.sentences\[0\] lacks 'raw'"),
    ({"images": [{"split": "train", "filename": "1.jpg", "sentences": [{"raw": "a", "sentid": 1}]}]},
     "no captioned image in split 'test' \\(splits there: train\\)"),
])
def test_malformed_karpathy_file(tmp_path, content, message):
    with pytest.raises(DatasetError, match=message) as info:
        locate("flickr30k", _karpathy(tmp_path, content))
    assert "dataset_flickr30k.json" in str(info.value)


def test_missing_inputs_name_what_was_expected(tmp_path, plant):
    with pytest.raises(DatasetError, match="expected dataset_coco.json"):
        locate("coco", DataPaths(data=tmp_path))
    with pytest.raises(DatasetError, match="does not exist"):
        locate("coco", DataPaths(karpathy=tmp_path / "nope.json", images=tmp_path))
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy_json(plant)))
    with pytest.raises(DatasetError, match="no images for flickr30k"):
        locate("flickr30k", DataPaths(data=tmp_path))
    (tmp_path / "flickr30k-images").mkdir()
    (tmp_path / "flickr30k-images" / "1000.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"13 of the 14 flickr30k images are missing .*1001\.jpg"):
        locate("flickr30k", DataPaths(data=tmp_path))
    with pytest.raises(DatasetError, match="no Multi30K test_2016_flickr.cs"):
        locate("multi30k", DataPaths(data=tmp_path), lang="cs")


def test_broken_text_db(tmp_path, plant):
    root = uniter_layout(tmp_path, plant)
    db = root / "txt_db" / "itm_flickr30k_test_base-cased.db"
    (db / "meta.json").write_text(json.dumps({"SEP": 102}))
    with pytest.raises(DatasetError, match="meta.json lacks the integer 'CLS'"):
        locate("flickr30k", DataPaths(data=root))
    (db / "meta.json").unlink()
    with pytest.raises(DatasetError, match=r"meta.json does not exist \(expected the DB's meta"):
        locate("flickr30k", DataPaths(data=root))
    bad = write_text_db(tmp_path / "bad.db", [{"sentid": 1, "raw": "x", "input_ids": [5], "img_fname": "a"}])
    import lmdb

    env = lmdb.open(str(bad))
    with env.begin(write=True) as txn:
        txn.put(b"1", b"not lz4 at all")
    env.close()
    with pytest.raises(DatasetError, match="record '1' is not lz4-compressed msgpack"):
        locate("flickr30k", DataPaths(txt_db=bad, img_db=root / "img_db" / "flickr30k"))


def test_image_db_missing_images(tmp_path, plant):
    root = uniter_layout(tmp_path, plant)
    write_image_db(tmp_path / "small", {"flickr30k_000000001000.npz": region_arrays(0, 10)})
    rset = locate("flickr30k", DataPaths(data=root, img_db=tmp_path / "small"))
    with pytest.raises(DatasetError, match=r"no features for 13 of the 14 images \(first: flickr30k_000000001001"):
        evaluate(rset, PlantedEncoder(plant))
    with pytest.raises(DatasetError, match="is not a UNITER image DB"):
        locate("flickr30k", DataPaths(data=root, img_db=tmp_path))


def test_multi30k_misaligned_files(tmp_path):
    write_multi30k(tmp_path, ["ein Hund", "eine Katze", "zwei"], ["1.jpg", "2.jpg"], "de")
    with pytest.raises(DatasetError, match=r"test_2016_flickr.de.gz has 3 lines but .*test_2016_flickr.txt lists 2"):
        locate("multi30k", DataPaths(data=tmp_path, img_db=tmp_path))
    with gzip.open(tmp_path / "data/task1/raw/test_2016_flickr.de.gz", "wb") as handle:
        handle.write(b"\xff\xfe not utf-8\n\n")
    with pytest.raises(DatasetError, match="cannot read .*test_2016_flickr.de.gz"):
        locate("multi30k", DataPaths(data=tmp_path, img_db=tmp_path))


def test_non_finite_vectors_are_refused(tmp_path, plant):
    from models.core.errors import ModelError

    rset = locate("flickr30k", DataPaths(data=uniter_layout(tmp_path, plant)))
    encoder = PlantedEncoder(plant)
    encoder.image_vectors[3, 0] = np.nan
    with pytest.raises(ModelError, match="non-finite"):
        evaluate(rset, encoder)


def test_corrupt_cached_record_says_how_to_rebuild(tmp_path, plant):
    import lmdb

    from feature_extraction.errors import ImageDBError
    from ldot_cli.data.features import feature_cache_dir

    root = karpathy_layout(tmp_path, plant)
    cache = feature_cache_dir(root / "flickr30k-images")
    env = lmdb.open(str(cache / "feat_th0.2_max100_min10"))
    with env.begin(write=True) as txn:
        txn.put(b"1002.jpg", b"\x93garbage")
    env.close()
    rset = locate("flickr30k", DataPaths(data=root))
    ensure_features(rset)
    with pytest.raises(ImageDBError, match=r"cannot read '1002.jpg' .*delete that folder to extract again"):
        evaluate(rset, PlantedEncoder(plant))
