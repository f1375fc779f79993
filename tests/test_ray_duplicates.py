"""Tar shards with duplicate member names and link members, on the driver-side planning and
merging of `ldot index --ray` without Ray or models: one rule (the first member of a name wins, later ones and
links are skipped with a reason, each with a row of its own), the same rows whatever order the output shards are
merged in, a shard that is "unchanged" on the next run, and counts that add up."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
from ldot_testing import make_photos
from test_index_tar_sync import Index

from ldot_cli.index import shards as shard_io
from ldot_cli.index.distributed import _row, decode_unit
from ldot_cli.index.ray_inputs import plan_sources, read_unit
from ldot_cli.index.runs import IndexReport


def _shard_with_duplicates(path, photos) -> dict[str, bytes]:
    """a.png, dup.png (first), dup.png (second: other bytes), a symlink and a hard link to a.png."""
    first, second = photos[0].read_bytes(), photos[1].read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("a.png", photos[2].read_bytes()), ("dup.png", first), ("dup.png", second)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in (("link.png", tarfile.SYMTYPE), ("hard.png", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.png"
            tar.addfile(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return {"first": first, "second": second}


def _preprocess(rgb):
    return np.zeros((3, 4, 4), dtype=np.float32), 1.0


def _worker_rows(unit) -> list[dict]:
    """What the decoding tasks + the model actor write for a unit (a fake vector per decoded image)."""
    rows = []
    for blob in decode_unit({"unit": pickle.dumps(unit)}, _preprocess, None):
        entry = pickle.loads(blob["blob"])
        if "end" in entry or "failed" in entry:
            rows.append(entry)
        elif "pixels" in entry:
            rows.append(_row(entry, vec=0, boxes=1))
        elif "known" in entry:
            rows.append(_row(entry, known=True))
        else:
            rows.append(_row(entry, reason=entry["reason"], retry=entry["retry"]))
    return rows


def _merge(index: Index, parts: list[list[dict]], report: IndexReport) -> None:
    for n, rows in enumerate(parts):
        shard = shard_io.ShardRows(rows=[{**r, "vec": 0} if "vec" in r else r for r in rows],
                                   vectors=[np.ones(4, dtype=np.float32)], records=[None])
        shard_io.write(index.ray.shards_dir, f"part-{n}", shard)
        index.ray._merge(index.store, None, f"part-{n}", report)


def test_read_unit_gives_every_member_a_row_and_the_first_of_a_name_wins(tmp_path):
    shard = tmp_path / "s" / "00000.tar"
    data = _shard_with_duplicates(shard, make_photos(tmp_path / "p", 3))
    [unit] = plan_sources([str(shard)]).tar_sources[0].units
    got = list(read_unit(unit))
    assert [item.path.split("#", 1)[1] for item, _, _ in got] == ["a.png", "dup.png", "dup.png#2", "link.png",
                                                                  "hard.png"]
    assert got[1][1] == data["first"]
    assert got[2][1] is None and "only the first is indexed" in got[2][2]
    assert got[3][1] is None and "symbolic link" in got[3][2] and "not followed" in got[3][2]
    assert got[4][1] is None and "hard link" in got[4][2]
    rows = _worker_rows(unit)
    assert rows[-1]["total"] == 5 and len(rows[-1]["members"]) == 5
    assert all(r["retry"] is False for r in rows[2:5])  # skipped for good: the same shard skips them again


def test_duplicates_merge_to_the_same_rows_in_any_order_and_the_shard_is_then_unchanged(tmp_path, monkeypatch):
    shard = tmp_path / "s" / "00000.tar"
    data = _shard_with_duplicates(shard, make_photos(tmp_path / "p", 3))
    results = []
    for order in ("clean", "resumed"):
        monkeypatch.setenv("LDOT_HOME", str(tmp_path / order / "home"))
        index = Index(tmp_path / order)
        todo, plan_report = index.plan(str(shard))
        [unit] = todo
        rows = _worker_rows(unit)
        report = IndexReport("tars")
        if order == "clean":  # one output shard
            _merge(index, [rows], report)
        else:  # two output shards, merged the other way round (as a killed driver's re-run may)
            _merge(index, [rows[2:], rows[:2]], report)
        table = {os.fsdecode(r.path).split("#", 1)[1]: (r.content_hash, r.status, r.reason)
                 for r in index.store.file_rows()}
        results.append(table)
        assert table["dup.png"][:2] == (hashlib.sha256(data["first"]).hexdigest(), "indexed")
        assert table["dup.png#2"][1] == "skipped" and "only the first" in table["dup.png#2"][2]
        assert table["link.png"][1] == table["hard.png"][1] == "skipped"
        assert (report.found, report.encoded, len(report.skipped)) == (5, 2, 3)  # found = indexed + skipped
        counts = index.store.counts()
        assert (counts["indexed"], counts["skipped"]) == (2, 3)
        again, second = index.plan(str(shard))
        assert again == []  # the shard is unchanged: not read again
        assert (second.found, second.unchanged, second.skipped_before) == (5, 2, 3)
        index.store.close()
    assert results[0] == results[1]
