"""The UNITER image DB: naming, round trip, reading official DBs, safety, locking, resume."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import msgpack
import numpy as np
import pytest

from feature_extraction.errors import DBLockedError, DetectorError, ImageDBError
from feature_extraction.types import RegionFeatures, normalize_boxes
from feature_extraction.uniter_db import (
    BOX_PRESETS,
    BoxCut,
    FailureRecord,
    SourceStamp,
    UniterImageDB,
    UniterImageDBWriter,
    decode_value,
    regions_to_record,
    soft_labels_from_uniter,
)

REPO = Path(__file__).resolve().parents[1]


def make_regions(n: int, n_confident: int, seed: int = 0, dim: int = 2048, soft: bool = True) -> RegionFeatures:
    rng = np.random.default_rng(seed)
    h, w = 480, 640
    x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1).astype(np.float32)
    conf = np.concatenate([rng.uniform(0.3, 1, n_confident), rng.uniform(0, 0.19, n - n_confident)]).astype(np.float32)
    soft_labels = rng.dirichlet(np.ones(1601), n).astype(np.float16) if soft else None
    return RegionFeatures(
        features=rng.standard_normal((n, dim)).astype(np.float16), boxes=boxes,
        norm_bb=normalize_boxes(boxes, h, w), conf=conf, object_ids=rng.integers(0, 1600, n),
        attr_ids=rng.integers(0, 400, n), attr_conf=rng.uniform(0, 1, n).astype(np.float32),
        image_size=(h, w), soft_labels=soft_labels,
    )


def test_names_match_uniter() -> None:
    uniter, lxmert = BOX_PRESETS["uniter"], BOX_PRESETS["lxmert36"]
    assert uniter.db_name() == "feat_th0.2_max100_min10"
    assert uniter.db_name(compress=True) == "feat_th0.2_max100_min10_compressed"
    assert uniter.nbb_name == "nbb_th0.2_max100_min10.json"
    assert lxmert.db_name() == "feat_numbb36" and lxmert.nbb_name is None


@pytest.mark.parametrize("n_conf,expected", [(0, 10), (3, 10), (10, 10), (57, 57), (100, 100), (150, 100)])
def test_num_boxes_is_uniters_formula(n_conf: int, expected: int) -> None:
    conf = np.concatenate([np.full(n_conf, 0.9), np.full(160 - n_conf, 0.2)])  # 0.2 itself is not > 0.2
    assert BoxCut().num_boxes(conf) == expected
    assert BoxCut().num_boxes(conf.reshape(-1, 1)) == expected


def test_record_is_official_layout() -> None:
    regions = make_regions(40, 25)
    record = regions_to_record(regions, BOX_PRESETS["uniter"], with_soft_labels=True)
    assert set(record) == {"features", "norm_bb", "conf", "soft_labels"}
    assert all(v.dtype == np.float16 for v in record.values())
    assert record["features"].shape == (25, 2048) and record["norm_bb"].shape == (25, 6)
    assert record["conf"].shape == (25, 1) and record["soft_labels"].shape == (25, 1601)
    # background: last in our detector output, first in UNITER's DB
    np.testing.assert_array_equal(record["soft_labels"][:, 0], regions.soft_labels[:25, -1])
    np.testing.assert_array_equal(soft_labels_from_uniter(record["soft_labels"]), regions.soft_labels[:25])
    assert "soft_labels" not in regions_to_record(regions, BOX_PRESETS["uniter"])


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("preset", ["uniter", "lxmert36"])
def test_round_trip(tmp_path: Path, compress: bool, preset: str) -> None:
    cases = {"a.jpg": make_regions(40, 25, 1), "b/c.png": make_regions(12, 2, 2), "é 🙂.jpg": make_regions(36, 36, 3)}
    with UniterImageDBWriter(tmp_path, preset, compress=compress) as db:
        for key, regions in cases.items():
            db.put(key, regions, SourceStamp(f"/src/{key}", 10, 20), with_soft_labels=True)
        db.commit()
    cut = BOX_PRESETS[preset]
    assert (tmp_path / cut.db_name(compress) / "data.mdb").exists()
    reader = UniterImageDB(tmp_path, preset)
    assert reader.compressed == compress
    assert sorted(reader.keys()) == sorted(cases) and len(reader) == 3
    for key, regions in cases.items():
        nbb = min(cut.num_boxes(regions.conf), regions.num_boxes)
        rec = reader[key]
        assert rec.num_boxes == nbb == reader.nbb(key) if preset == "uniter" else rec.num_boxes == nbb
        assert rec.features.dtype == np.float32
        np.testing.assert_array_equal(rec.features, regions.features[:nbb].astype(np.float32))
        np.testing.assert_array_equal(rec.norm_bb, regions.norm_bb[:nbb].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(rec.conf, regions.conf[:nbb].astype(np.float16).astype(np.float32))
        assert rec.soft_labels is not None and rec.soft_labels.shape == (nbb, 1601)
        assert reader.sources()[key] == SourceStamp(f"/src/{key}", 10, 20)
    if cut.nbb_name:
        nbb_json = json.loads((tmp_path / cut.nbb_name).read_text())
        assert nbb_json == {k: reader.nbb(k) for k in cases}
    assert reader.verify() == []
    assert "missing" not in reader and "__keys__" not in reader


def _official_build(img_dir: Path, records: dict[str, dict[str, np.ndarray]], compress: bool, with_nbb: bool) -> None:
    """Build a DB with the exact calls of UNITER's scripts/convert_imgdir.py, in a fresh interpreter
    (msgpack_numpy.patch() changes msgpack globally)."""
    npz_dir = img_dir.parent / "npz"
    npz_dir.mkdir(exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)  # the official script makes {output}/{split}
    for name, arrays in records.items():
        np.savez_compressed(npz_dir / name, **arrays)
    code = f"""
        import glob, io, json, os
        from os.path import basename
        import lmdb, msgpack, msgpack_numpy, numpy as np
        msgpack_numpy.patch()
        conf_th, max_bb, min_bb, compress, with_nbb = 0.2, 100, 10, {compress}, {with_nbb}
        db_name = f'feat_th{{conf_th}}_max{{max_bb}}_min{{min_bb}}' if with_nbb else 'all'
        if compress:
            db_name += '_compressed'
        env = lmdb.open(f'{img_dir}/{{db_name}}', map_size=1024**4)
        txn = env.begin(write=True)
        name2nbb = {{}}
        for i, fname in enumerate(sorted(glob.glob('{npz_dir}/*.npz'))):
            img_dump = np.load(fname, allow_pickle=True)
            nbb = int(min(max_bb, max(min_bb, (img_dump['conf'] > conf_th).sum())))
            dump = {{}}
            for key, arr in img_dump.items():
                if arr.dtype == np.float32:
                    arr = arr.astype(np.float16)
                dump[key] = arr[:nbb, :] if arr.ndim == 2 else arr[:nbb]
            if compress:
                with io.BytesIO() as writer:
                    np.savez_compressed(writer, **dump)
                    value = writer.getvalue()
            else:
                value = msgpack.dumps(dump, use_bin_type=True)
            txn.put(key=basename(fname).encode('utf-8'), value=value)
            if i % 1000 == 0:
                txn.commit()
                txn = env.begin(write=True)
            name2nbb[basename(fname)] = nbb
        txn.put(key=b'__keys__', value=json.dumps(list(name2nbb.keys())).encode('utf-8'))
        txn.commit()
        env.close()
        if with_nbb:
            with open(f'{img_dir}/nbb_th{{conf_th}}_max{{max_bb}}_min{{min_bb}}.json', 'w') as f:
                json.dump(name2nbb, f)
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def _butd_npz(seed: int, n: int, n_conf: int) -> dict[str, np.ndarray]:
    """What BUTD-UNITER-NLVR2's tools/generate_npz.py saves (float16, conf of shape (n, 1))."""
    r = make_regions(n, n_conf, seed)
    return {"norm_bb": r.norm_bb.astype(np.float16), "features": r.features.astype(np.float16),
            "conf": r.conf.reshape(-1, 1).astype(np.float16), "soft_labels": r.soft_labels.astype(np.float16)}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("with_nbb", [True, False])
def test_reads_db_built_the_official_way(tmp_path: Path, compress: bool, with_nbb: bool) -> None:
    img_dir = tmp_path / "flickr30k"
    records = {"flickr30k_000000000001.npz": _butd_npz(1, 100, 30),
               "flickr30k_000000000002.npz": _butd_npz(2, 100, 4),
               "flickr30k_000000000003.npz": _butd_npz(3, 100, 100)}
    _official_build(img_dir, records, compress, with_nbb)
    db = UniterImageDB(img_dir)
    assert db.db_path.name == ("feat_th0.2_max100_min10" if with_nbb else "all") + ("_compressed" if compress else "")
    assert sorted(db.keys()) == sorted(records)
    for name, arrays in records.items():
        nbb = min(100, max(10, int((arrays["conf"] > 0.2).sum())))
        assert db.nbb(name) == nbb
        rec = db[name]
        np.testing.assert_array_equal(rec.features, arrays["features"][:nbb].astype(np.float32))
        np.testing.assert_array_equal(rec.norm_bb, arrays["norm_bb"][:nbb].astype(np.float32))
        np.testing.assert_array_equal(rec.conf, arrays["conf"][:nbb, 0].astype(np.float32))
        np.testing.assert_array_equal(rec.soft_labels, arrays["soft_labels"][:nbb].astype(np.float32))
        assert set(db.get_dump(name)) == set(arrays)
    assert db.verify() == [] and db.sources() == {} and db.failures() == {}


def test_official_reader_reads_our_db(tmp_path: Path) -> None:
    """Replay DetectFeatLmdb.__getitem__/get_dump's calls (compress=False) on a DB we wrote."""
    regions = make_regions(50, 20, 7)
    with UniterImageDBWriter(tmp_path, "uniter") as db:
        db.put("x.jpg", regions, with_soft_labels=True)
    code = f"""
        import json, lmdb, msgpack, msgpack_numpy, numpy as np
        msgpack_numpy.patch()
        img_dir, db_name = {str(tmp_path)!r}, 'feat_th0.2_max100_min10'
        name2nbb = json.load(open(f'{{img_dir}}/nbb_th0.2_max100_min10.json'))
        env = lmdb.open(f'{{img_dir}}/{{db_name}}', readonly=True, create=False, readahead=True)
        txn = env.begin(buffers=True)
        img_dump = msgpack.loads(txn.get('x.jpg'.encode('utf-8')), raw=False)
        nbb = name2nbb['x.jpg']
        feat = img_dump['features'][:nbb, :].astype(np.float32)
        dump = {{k: arr[:nbb, ...] for k, arr in img_dump.items()}}
        print(nbb, feat.shape, img_dump['norm_bb'].shape, sorted(dump), json.loads(bytes(txn.get(b'__keys__'))))
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "20 (20, 2048) (20, 6) ['conf', 'features', 'norm_bb', 'soft_labels'] ['x.jpg']"


def test_pickled_object_arrays_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    value = msgpack.packb({"features": {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1],
                                        b"data": pickle.dumps(Evil())}}, use_bin_type=True)
    with pytest.raises(ImageDBError, match="refused"):
        decode_value(value)
    assert not marker.exists()
    npz = tmp_path / "evil.npz"
    np.savez(npz, features=np.array([Evil()], dtype=object), allow_pickle=True)
    with pytest.raises(ImageDBError):
        decode_value(npz.read_bytes(), compressed=True)
    assert not marker.exists()
    with pytest.raises(ImageDBError):
        decode_value(b"\x93garbage")


def test_second_writer_is_refused(tmp_path: Path) -> None:
    with UniterImageDBWriter(tmp_path, "uniter"):
        with pytest.raises(DBLockedError, match="another process"):
            UniterImageDBWriter(tmp_path, "uniter")
    with UniterImageDBWriter(tmp_path, "uniter"):  # released on close
        pass


def test_uncommitted_batch_is_lost_whole_and_reopen_resumes(tmp_path: Path) -> None:
    with UniterImageDBWriter(tmp_path, "uniter") as db:
        db.put("a.jpg", make_regions(20, 15, 1))
        db.commit()
        db.put("b.jpg", make_regions(20, 15, 2))
        db._env.close()  # simulate a crash: the staged batch never committed
        db._lock.release()
        db._closed = True
    with UniterImageDBWriter(tmp_path, "uniter") as db:
        assert db.keys() == ["a.jpg"]
        db.put("b.jpg", make_regions(20, 15, 2))
    assert sorted(UniterImageDB(tmp_path).keys()) == ["a.jpg", "b.jpg"]


def test_stale_nbb_json_is_rebuilt_on_reopen(tmp_path: Path) -> None:
    with UniterImageDBWriter(tmp_path, "uniter") as db:
        db.put("a.jpg", make_regions(30, 22, 1))
        db.put("b.jpg", make_regions(30, 3, 2))
    nbb_path = tmp_path / "nbb_th0.2_max100_min10.json"
    nbb_path.write_text(json.dumps({"a.jpg": 22}))  # as if the writer died before refreshing it
    assert UniterImageDB(tmp_path).nbb("b.jpg") == 10  # computed from conf meanwhile
    with UniterImageDBWriter(tmp_path, "uniter"):
        pass
    assert json.loads(nbb_path.read_text()) == {"a.jpg": 22, "b.jpg": 10}


def test_exception_in_with_block_discards_staged(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with UniterImageDBWriter(tmp_path, "uniter") as db:
            db.put("a.jpg", make_regions(20, 15, 1))
            db.commit()
            db.put("b.jpg", make_regions(20, 15, 2))
            raise RuntimeError("boom")
    assert UniterImageDB(tmp_path).keys() == ["a.jpg"]


def test_failures_recorded_and_cleared(tmp_path: Path) -> None:
    bad = "/photos/caf\udce9.jpg"  # a non-UTF-8 file name, as os.fsdecode gives it
    with UniterImageDBWriter(tmp_path, "uniter") as db:
        db.put_failure(bad, FailureRecord("empty file (0 bytes)", 0, 5))
        db.put_failure("/photos/x.heic", FailureRecord("needs pillow-heif", 9, 5, permanent=False))
        db.commit()
        assert db.failures()[bad].reason == "empty file (0 bytes)"
    side = json.loads((tmp_path / "feat_th0.2_max100_min10.failed.json").read_text())
    assert side["/photos/caf\\xe9.jpg"]["reason"] == "empty file (0 bytes)"
    assert UniterImageDB(tmp_path).failures()[bad].size == 0
    with UniterImageDBWriter(tmp_path, "uniter") as db:
        db.clear_failure(bad)
    with UniterImageDBWriter(tmp_path, "uniter") as db:
        assert list(db.failures()) == ["/photos/x.heic"] and not db.failures()["/photos/x.heic"].permanent


def test_bad_keys_and_bad_detector_output(tmp_path: Path) -> None:
    with UniterImageDBWriter(tmp_path, "uniter") as db:
        for key in ["", "__keys__", "__ldot_sources__", "caf\udce9.jpg", "x" * 600]:
            with pytest.raises(ValueError):
                db.put(key, make_regions(12, 12))
        broken = make_regions(12, 12)
        broken.norm_bb = broken.norm_bb[:5]
        with pytest.raises(DetectorError, match="norm_bb"):
            db.put("a.jpg", broken)
        nan = make_regions(12, 12)
        nan.features[0, 0] = np.nan
        with pytest.raises(DetectorError, match="non-finite"):
            db.put("a.jpg", nan)
        with pytest.raises(DetectorError, match="soft labels"):
            db.put("a.jpg", make_regions(12, 12, soft=False), with_soft_labels=True)


def _count_in_subprocess(img_dir: Path) -> str:
    code = f"from feature_extraction.uniter_db import UniterImageDB; db = UniterImageDB({str(img_dir)!r}); " \
           "print(sorted(db.keys()), [db[k].num_boxes for k in sorted(db.keys())])"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120).stdout.strip()


def test_reader_sees_commits_while_writer_is_open(tmp_path: Path) -> None:
    with UniterImageDBWriter(tmp_path, "uniter") as db:
        db.put("a.jpg", make_regions(20, 15, 1))
        db.commit()
        assert _count_in_subprocess(tmp_path) == "['a.jpg'] [15]"
        db.put("b.jpg", make_regions(20, 12, 2))
        assert _count_in_subprocess(tmp_path) == "['a.jpg'] [15]"  # staged is invisible
        db.commit()
        assert _count_in_subprocess(tmp_path) == "['a.jpg', 'b.jpg'] [15, 12]"
        with pytest.raises(ImageDBError, match="close the writer"):
            UniterImageDB(tmp_path).keys()


def test_missing_db_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageDBError, match="no image feature DB"):
        UniterImageDB(tmp_path)


def test_map_grows_when_full(tmp_path: Path) -> None:
    with UniterImageDBWriter(tmp_path, "uniter", map_size=1 << 20) as db:
        for i in range(8):
            db.put(f"{i}.jpg", make_regions(100, 100, i))  # ~410 KB each
            db.commit()
    assert len(UniterImageDB(tmp_path).keys()) == 8


def test_env_handles_are_per_process(tmp_path: Path) -> None:
    with UniterImageDBWriter(tmp_path, "uniter") as db:
        db.put("a.jpg", make_regions(20, 15, 1))
    reader = UniterImageDB(tmp_path)
    assert reader.keys() == ["a.jpg"]
    pid = os.fork()
    if pid == 0:  # child: must reopen, not reuse the parent's environment
        try:
            ok = reader["a.jpg"].num_boxes == 15
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert isinstance(reader.env, lmdb.Environment)
