"""The index's typed meta: every value checked once when the index is opened, the vector-file record read
leniently (a damaged one is rebuilt, never an error), and the stored key/value format unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ldot_testing import write_meta_rows

from ldot_cli.index.catalogue import FileRow
from ldot_cli.index.layout import IndexStoreError, index_path
from ldot_cli.index.meta import IndexMeta, VectorFileSet
from ldot_cli.index.store import IndexStore


def small_index(name: str = "m", count: int = 5) -> IndexStore:
    store = IndexStore(index_path(name), create=True)
    store.update_meta(model="tiny", dim=4, regions="none")
    rng = np.random.default_rng(0)
    with store.transaction() as db:
        for i in range(count):
            vid = store.add_vector(db, f"{i:064x}", rng.standard_normal(4), 0)
            store.put_files(db, [FileRow(f"/p/{i}.jpg".encode(), b"/p", 1, 1, f"{i:064x}", "indexed", None, 0, vid)])
    store.sync_faiss()
    return store


@pytest.mark.parametrize(("key", "value", "said"), [
    ("dim", "0", "dim 0 is out of range"),
    ("dim", "99999999", "dim 99999999 is out of range"),
    ("memory_budget", "-5", "memory_budget -5 is out of range"),
    ("ann_mode", "fast", "ann_mode 'fast' is not one of auto, exact, ivf, ivfpq"),
    ("regions", "some", "regions 'some' is not one of kept, none"),
    ("created", "yesterday", "created 'yesterday' is not a time"),
    ("format_version", "2", "newer ldot"),
])
def test_a_bad_meta_value_is_named_when_the_index_is_opened(key, value, said):
    small_index().close()
    with IndexStore(index_path("m")) as store:
        write_meta_rows(store, {key: value})
    with pytest.raises(IndexStoreError, match=said):
        IndexStore(index_path("m"))


def test_meta_is_typed_and_stored_as_before():
    with small_index() as store:
        meta = store.meta
        assert (meta.model, meta.dim, meta.regions, meta.keeps_regions, meta.box_preset) == ("tiny", 4, "none",
                                                                                               False, "uniter")
        rows = store.meta_rows()
        assert rows["dim"] == "4" and rows["model"] == "tiny" and rows["format_version"] == "1"
        files = store.vector_file_set()
        assert files.kind == "exact" and files.rows == 5 and files.max_id == 5 and files.token == rows["faiss_sha256"]
        assert json.loads(rows["faiss_parts"])[0]["file"] == "vectors.faiss"
        with pytest.raises(TypeError, match="no field 'colour'"):
            store.update_meta(colour="red")
        with pytest.raises(IndexStoreError, match="dim -1 is out of range"):
            store.update_meta(dim=-1)
        assert store.meta_rows()["dim"] == "4"  # a refused value is not written


@pytest.mark.parametrize("damage", [{"faiss_parts": "[{\"file\": \"../../etc/passwd\", \"first_id\": 0, \"rows\": 5, "
                                                     "\"sha256\": \"x\"}]"},
                                    {"faiss_parts": "not json"}, {"faiss_max_id": "many"}])
def test_a_damaged_vector_file_record_is_rebuilt_not_fatal(damage):
    with small_index() as store:
        write_meta_rows(store, damage)
        assert VectorFileSet.from_rows(store.meta_rows()).damage
        with pytest.raises(IndexStoreError, match="vector file list of index 'm' is damaged"):
            store.read_faiss()
        assert store.sync_faiss().startswith("built exact index of 5 vectors")
        index, max_id = store.read_faiss()
        assert index.ntotal == 5 and max_id == 5


def test_an_empty_meta_reads_as_a_new_index():
    assert IndexMeta() == IndexMeta.from_rows({}, index_path("none"))
