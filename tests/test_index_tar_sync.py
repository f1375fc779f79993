"""`ldot index --ray` keeps tar shard and file-list SOURCEs in step, as plain `ldot index` keeps folders: the
driver-side planning and merging, without Ray or models (tests/test_ray_index.py runs the whole thing)."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest
from ldot_testing import make_photos

from ldot_cli.index import shards as shard_io
from ldot_cli.index.catalogue import FileRow
from ldot_cli.index.distributed import decode_unit
from ldot_cli.index.indexer import Indexer, IndexReport
from ldot_cli.index.options import IndexOptions, RayOptions
from ldot_cli.index.ray_inputs import (
    SourceError,
    TarSource,
    Unit,
    plan_sources,
    read_unit,
    tar_bytes,
)
from ldot_cli.index.store import IndexStore


def write_shard(path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(members))


def test_tar_sources_name_their_missing_shards_and_file_lists_are_roots_even_when_empty(tmp_path):
    write_shard(tmp_path / "s" / "00000.tar", {"a.png": b"x"})
    spec = str(tmp_path / "s" / "{00000..00002}.tar")
    [source] = plan_sources([spec]).tar_sources
    assert source.root == spec and [u.tar for u in source.units] == [str(tmp_path / "s" / "00000.tar")]
    assert all(u.root == spec for u in source.units)
    assert source.missing == [str(tmp_path / "s" / "00001.tar"), str(tmp_path / "s" / "00002.tar")]
    with pytest.raises(SourceError, match="none of the 2 tar shards"):  # a typo, not a dataset that is gone
        plan_sources([str(tmp_path / "s" / "{00001..00002}.tar")])
    with pytest.raises(SourceError, match="00009.tar does not exist"):
        plan_sources([str(tmp_path / "s" / "00009.tar")])
    listed = tmp_path / "list.txt"
    listed.write_text("# every entry taken off\n")
    plan = plan_sources([str(listed)])
    assert plan.file_roots == [str(listed)] and plan.files == []


def test_a_shard_that_cannot_be_looked_at_is_failed_not_missing(monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    fs.pipe("/web/00000.tar", tar_bytes({"a.png": b"x"}))
    fs.pipe("/web/00001.tar", tar_bytes({"b.png": b"y"}))
    real = MemoryFileSystem.info

    def info(self, path, **kwargs):
        if path.endswith("00001.tar"):
            raise ConnectionError("connection reset by peer")
        return real(self, path, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "info", info)
    [source] = plan_sources(["memory://web/{00000..00002}.tar"]).tar_sources
    assert [u.tar for u in source.units] == ["memory://web/00000.tar"]
    assert source.missing == ["memory://web/00002.tar"]
    why = "cannot look at tar shard memory://web/00001.tar (ConnectionError: connection reset by peer)"
    assert source.failed == [("memory://web/00001.tar", why)]


def test_a_tar_cut_short_or_damaged_is_a_failed_read_not_a_shorter_shard(tmp_path):
    data = tar_bytes({"a.png": b"x" * 1000, "b.png": b"y" * 700})
    shard = tmp_path / "00000.tar"

    def read(payload: bytes) -> list[str]:
        shard.write_bytes(payload)
        unit = Unit("u", str(shard), tar=str(shard), size=len(payload))
        return [item.path.rsplit("#", 1)[1] for item, _, _ in read_unit(unit)]

    assert read(data) == ["a.png", "b.png"]
    with pytest.raises(SourceError, match="without the end-of-archive blocks"):
        read(data[:1536])  # cut right after the first member: a valid-looking shorter tar
    with pytest.raises(SourceError, match="00000.tar could not be read to its end"):
        read(data[:1000])  # cut inside a member
    with pytest.raises(SourceError, match="its rows are kept"):
        read(b"not a tar " * 100)


def test_decoding_skips_members_whose_content_is_indexed_and_reports_a_damaged_shard(tmp_path):
    photos = make_photos(tmp_path / "p", 2)
    shard = tmp_path / "00000.tar"
    write_shard(shard, {"0.png": photos[0].read_bytes(), "1.png": photos[1].read_bytes()})
    known = hashlib.sha256(photos[0].read_bytes()).hexdigest()
    calls = []

    def preprocess(rgb):
        calls.append(rgb.shape)
        return np.zeros((3, 4, 4), dtype=np.float32), 1.0

    def decode(unit: Unit) -> list[dict]:
        return [pickle.loads(r["blob"]) for r in decode_unit({"unit": pickle.dumps(unit)}, preprocess, None)]

    unit = Unit("u", str(shard), tar=str(shard), size=shard.stat().st_size, known=(known,))
    first, second, end = decode(unit)
    assert first["known"] and first["hash"] == known and "pixels" not in first  # neither decoded nor extracted
    assert "pixels" in second and len(calls) == 1
    assert end == {"end": "u", "tar": str(shard), "complete": True, "total": 2,
                   "members": [f"{shard}#0.png", f"{shard}#1.png"]}
    shard.write_bytes(b"damaged " * 100)
    failed, end = decode(unit)
    assert failed["failed"] == "u" and "could not be read to its end" in failed["reason"]
    assert end == {"end": "u", "tar": str(shard), "complete": False}


class Index:
    """A store with tar member rows, and the Ray driver's planning and merging run against it."""

    def __init__(self, tmp_path) -> None:
        self.indexer = Indexer("tars", IndexOptions(ray=RayOptions(shards_dir=str(tmp_path / "out"))))
        self.ray = self.indexer.executor  # the Ray driver's planning and merging
        self.indexer.dir.mkdir(parents=True)
        self.store = IndexStore(self.indexer.dir, create=True)
        self.store.db.executescript(shard_io.TABLES)
        self.store.update_meta(dim=4)

    def index(self, source: TarSource, shard: str, members: dict[str, bytes]) -> None:
        """Rows as a complete read of ``shard`` leaves them (and its unit's record)."""
        unit = next(u for u in source.units if u.tar == shard)
        with self.store.transaction() as db:
            rows = []
            for name, data in members.items():
                digest = hashlib.sha256(data).hexdigest()
                vid = self.store.vector_for_hash(digest) or self.store.add_vector(db, digest, np.ones(4), 1)
                rows.append(FileRow(os.fsencode(f"{shard}#{name}"), os.fsencode(source.root), len(data), 0, digest,
                                    "indexed", None, 0, vid))
            self.store.put_files(db, rows)
            db.execute("INSERT OR REPLACE INTO units (id, source, size, mtime_ns, total) VALUES (?, ?, ?, ?, ?)",
                       (unit.id, shard, unit.size, unit.mtime_ns, len(members)))

    def plan(self, spec_or_source: str | TarSource) -> tuple[list[Unit], IndexReport]:
        source = spec_or_source if isinstance(spec_or_source, TarSource) else \
            plan_sources([spec_or_source]).tar_sources[0]
        report = IndexReport("tars")
        return self.ray._plan_tars(self.store, [source], False, report), report

    def rows(self) -> dict[str, tuple[str, str]]:
        return {os.path.basename(os.fsdecode(r.path)): (os.path.basename(os.fsdecode(r.root)), r.status)
                for r in self.store.file_rows()}


def test_tar_sources_are_kept_in_step_like_folders(tmp_path):
    shards = tmp_path / "s"
    members = {n: {f"{n}-{i}.png": f"{n}/{i}".encode() for i in range(2)} for n in range(3)}
    for n, group in members.items():
        write_shard(shards / f"{n:05d}.tar", group)
    index = Index(tmp_path)
    whole = plan_sources([str(shards / "{00000..00002}.tar")]).tar_sources[0]
    for n in range(3):
        index.index(whole, str(shards / f"{n:05d}.tar"), members[n])

    todo, report = index.plan(whole.root)  # nothing changed: nothing to read, nothing removed
    assert todo == [] and (report.found, report.unchanged, report.removed) == (6, 6, 0)

    todo, report = index.plan(str(shards / "{00000..00001}.tar"))  # shard 2 is gone from the SOURCE
    assert todo == [] and (report.unchanged, report.removed) == (4, 2)
    assert index.rows() == {f"{n:05d}.tar#{n}-{i}.png": ("{00000..00001}.tar", "indexed")
                            for n in range(2) for i in range(2)}  # the SOURCE that took them over is their root

    write_shard(shards / "00007.tar", {"7-0.png": b"7"})  # another range of the same folder: another root
    later = plan_sources([str(shards / "{00007..00008}.tar")]).tar_sources[0]
    todo, report = index.plan(later)
    assert [u.tar for u in todo] == [str(shards / "00007.tar")] and report.removed == 0 and len(index.rows()) == 4

    (shards / "00001.tar").unlink()  # no longer there
    write_shard(shards / "00000.tar", {"0-0.png": b"0/0", "0-5.png": b"new"})  # changed
    todo, report = index.plan(str(shards / "{00000..00001}.tar"))
    assert report.removed == 2 and sorted(index.rows()) == ["00000.tar#0-0.png", "00000.tar#0-1.png"]
    [unit] = todo  # read again, its indexed contents passed along so the workers skip their model work
    assert unit.tar == str(shards / "00000.tar") and sorted(unit.known) == sorted(
        hashlib.sha256(members[0][f"0-{i}.png"]).hexdigest() for i in range(2))

    # the changed shard read to its end: a member it no longer holds goes, an unchanged one counts unchanged
    shard = shard_io.ShardRows(rows=[
        {"path": f"{unit.tar}#0-0.png", "root": unit.root, "size": 3, "mtime_ns": 0, "unit": unit.id,
         "hash": hashlib.sha256(b"0/0").hexdigest(), "known": True},
        {"end": unit.id, "tar": unit.tar, "complete": True, "total": 2,
         "members": [f"{unit.tar}#0-0.png", f"{unit.tar}#0-5.png"]}])
    shard_io.write(index.ray.shards_dir, "part-a", shard)
    report = IndexReport("tars")
    assert index.ray._merge(index.store, None, "part-a", report) == 1
    assert (report.found, report.unchanged, report.removed, report.encoded) == (1, 1, 1, 0)
    assert sorted(index.rows()) == ["00000.tar#0-0.png"]

    # a shard that cannot be read keeps its rows: one skipped row of its own says why
    broken = TarSource(str(shards / "{00000..00001}.tar"), failed=[(unit.tar, "cannot look at it (timeout)")])
    with pytest.warns(Warning, match="cannot look at it"):
        todo, report = index.plan(broken)
    assert todo == [] and report.removed == 0 and report.skipped == [(unit.tar, "cannot look at it (timeout)")]
    assert index.rows() == {"00000.tar#0-0.png": ("{00000..00001}.tar", "indexed"),
                            "00000.tar": ("{00000..00001}.tar", "skipped")}
    index.index(later, str(shards / "00007.tar"), {"7-0.png": b"7"})
    index.store.close()

    from ldot_cli.index.indexer import remove_folder

    assert remove_folder("tars", shards / "00000.tar") == 2  # `ldot index rm tars --folder SHARD`: its rows go
    assert remove_folder("tars", str(shards / "{00007..00008}.tar")) == 1  # ... or a whole tar SOURCE's
    with IndexStore(index.indexer.dir) as store:
        assert store.file_rows() == [] and store.counts()["vectors"] == 0


def test_a_listed_file_that_cannot_be_looked_at_keeps_its_row(tmp_path, monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    from ldot_cli.index.runs import Scan
    from models.core.errors import LdotWarning

    fs = MemoryFileSystem()
    fs.pipe("/listed/a.png", b"a")
    fs.pipe("/listed/b.png", b"b")
    real = MemoryFileSystem.info

    def info(self, path, **kwargs):
        if path.endswith("b.png"):
            raise TimeoutError("read timed out")
        return real(self, path, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "info", info)
    listed = tmp_path / "list.txt"
    listed.write_text("memory://listed/a.png\nmemory://listed/b.png\n")
    plan = plan_sources([str(listed)])
    assert list(plan.unknown) == ["memory://listed/b.png"]
    index = Index(tmp_path)
    with index.store.transaction() as db:
        for name, size, mtime in (("a", 1, 0), ("b", 1, 5)):
            vid = index.store.add_vector(db, name, np.ones(4), 1)
            index.store.put_files(db, [FileRow(f"memory://listed/{name}.png".encode(), os.fsencode(listed), size,
                                               mtime, name, "indexed", None, 0, vid)])
    with pytest.warns(LdotWarning, match="cannot look at memory://listed/b.png .*TimeoutError.* is kept"):
        files = index.ray._keep_unknown(index.store, plan)
    report = IndexReport("tars")
    assert index.indexer.plan_files(index.store, Scan([str(listed)], files, []), False, report) == []
    assert (report.unchanged, report.removed) == (2, 0)  # not read again, not replaced by a skipped row
    index.store.close()
