"""`ldot serve` attacked on its inputs, in-process (FastAPI's test client, no browser, no second process):
request values that must be refused with a 422, not a 500."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fakes import FakeDetector
from ldot_testing import install_tiny_model, install_tiny_reranker, make_photos, write_vocab

pytest.importorskip("fastapi")  # the serve extra is optional for users; the test extra installs it
from fastapi.testclient import TestClient

from ldot_cli.index.search import Request
from ldot_cli.serve.app import ServeState, create_app

QUERY = "a dog on the beach"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("serve_hard_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDOT_HOME", str(home))
        vocab = write_vocab(home / "vocab").parent
        install_tiny_model("tiny", vocab)
        install_tiny_reranker("uniter-base", vocab)
        make_photos(home / "photos", 6, size=(96, 64))
        from ldot_cli.index.indexer import Indexer
        from ldot_cli.index.options import IndexOptions

        Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([home / "photos"])
    return home


@pytest.fixture
def client(home, monkeypatch):
    monkeypatch.setenv("LDOT_HOME", str(home))
    state = ServeState("default")
    with TestClient(create_app(state), base_url="http://127.0.0.1:8765", raise_server_exceptions=False) as client:
        client.app_state = state
        yield client
    state.close()


def search(client, body):
    return client.post("/api/search", json=body)


@pytest.mark.parametrize("value", [0.1, 0, -3, 5, 10**30, 1e300])
def test_any_json_number_is_a_min_score(client, value):
    got = search(client, {"q": QUERY, "min_score": value})
    assert got.status_code == 200, got.text
    assert got.json()["min_score"] == pytest.approx(float(value))


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"true", b"[0.5]",
                                 b'{"a": 1}', b'"' + b"1" * 40 + b'"', b"1" + b"0" * 400])
def test_non_finite_or_wrong_typed_min_score_is_a_422(client, raw):
    got = client.post("/api/search", content=b'{"q": "dog", "min_score": ' + raw + b"}",
                      headers={"Content-Type": "application/json"})
    assert got.status_code == 422, (raw, got.status_code, got.text)
    assert "min_score" in got.json()["error"]


@pytest.mark.parametrize("route", ["/thumb/{}", "/photo/{}"])
@pytest.mark.parametrize("number", [10**23, 2**63, 2**64 + 5])
def test_huge_ids_are_a_422(client, route, number):
    got = client.get(route.format(number))
    assert got.status_code == 422, got.text
    body = client.post("/api/search", content=b'{"id": ' + str(number).encode() + b"}",
                       headers={"Content-Type": "application/json"})
    assert body.status_code == 422, body.text
    assert "id" in body.json()["error"]


def test_the_largest_sqlite_id_is_just_not_found(client):
    assert client.get(f"/thumb/{2**63 - 1}").status_code == 404
    assert search(client, {"id": 2**63 - 1}).status_code == 400


# -- only the indexed bytes are served ----------------------------------------------------------------------
def _first(client, home, name):
    hits = search(client, {"q": QUERY, "k": 10}).json()["hits"]
    return next(h for h in hits if h["path"].endswith(name))


def test_a_symlink_swapped_in_for_an_indexed_photo_is_not_served(home, client, tmp_path):
    import os
    import shutil

    hit = _first(client, home, "img_001.png")
    photo = Path(hit["path"])
    saved = tmp_path / "saved.png"
    shutil.copy2(photo, saved)  # same bytes, size and mtime: restored below
    secret = tmp_path / "secret.png"
    make_photos(tmp_path / "other", 1, start=77, size=(96, 64))[0].rename(secret)
    photo.unlink()
    os.symlink(secret, photo)
    try:
        assert client.get(f"/photo/{hit['id']}").status_code == 404
        assert client.get(f"/thumb/{hit['id']}").status_code == 404
        # same size and mtime as the indexed file, other bytes: the content hash refuses it, and no thumbnail of
        # those bytes is cached under the indexed content's name
        photo.unlink()
        data = bytearray(saved.read_bytes())
        data[-20] ^= 0xFF
        photo.write_bytes(bytes(data))
        stamp = saved.stat()
        os.utime(photo, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert client.get(f"/photo/{hit['id']}").status_code == 404
        assert client.get(f"/thumb/{hit['id']}").status_code == 404
        from ldot_cli.index.layout import index_path
        from ldot_cli.index.store import IndexStore
        from ldot_cli.index.thumbs import thumb_path

        with IndexStore(index_path("default")) as store:
            digest = store.content_hashes([hit["id"]])[hit["id"]]
        assert not thumb_path(index_path("default"), digest).exists()
    finally:
        photo.unlink()
        shutil.copy2(saved, photo)
    photo_ok = client.get(f"/photo/{hit['id']}")
    assert photo_ok.status_code == 200 and photo_ok.content == saved.read_bytes()
    thumb = client.get(f"/thumb/{hit['id']}")
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
    from PIL import Image

    from ldot_cli.index.thumbs import thumbnail

    want = thumbnail(tmp_path, digest, lambda: saved.read_bytes())  # made fresh from the indexed bytes
    assert thumb.content == want
    assert Image.open(io.BytesIO(thumb.content)).size == Image.open(io.BytesIO(want)).size


def test_a_changed_photo_is_refused_until_re_indexed(home, client):
    import os

    hit = _first(client, home, "img_002.png")
    photo = Path(hit["path"])
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))  # a stamp that differs
    try:
        assert client.get(f"/photo/{hit['id']}").status_code == 404
        got = client.get(f"/thumb/{hit['id']}")
        assert got.status_code == 404 and "changed since it was indexed" in got.json()["error"]
    finally:
        os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns - 10**9))
    assert client.get(f"/photo/{hit['id']}").status_code == 200


# -- the host and index removal ------------------------------------------------------------------------------
@pytest.mark.parametrize("bound, header, status", [
    ("127.0.0.2", "127.0.0.2:8765", 200),
    ("127.0.0.2", "127.0.0.2", 200),
    ("127.0.0.1", "localhost:8765", 200),
    ("::1", "[::1]:8765", 200),
    ("::1", "[::1]", 200),
    ("127.0.0.2", "evil.example:8765", 403),
    ("127.0.0.2", "localtest.me:8765", 403),  # a DNS name for 127.0.0.1 (rebinding)
])
def test_a_loopback_server_accepts_its_own_address(home, monkeypatch, bound, header, status):
    monkeypatch.setenv("LDOT_HOME", str(home))
    state = ServeState("default")
    try:
        client = TestClient(create_app(state, host=bound))
        assert client.get("/api/info", headers={"Host": header}).status_code == status
    finally:
        state.close()


def test_a_thumbnail_racing_index_rm_does_not_recreate_the_index(home, client, monkeypatch, tmp_path):
    import shutil

    from ldot_cli.index import thumbs
    from ldot_cli.index.indexer import remove_index
    from ldot_cli.index.layout import index_path

    work = tmp_path / "home"
    shutil.copytree(home / "models", work / "models")
    shutil.copytree(home / "indexes", work / "indexes")
    monkeypatch.setenv("LDOT_HOME", str(work))
    state = ServeState("default")
    hit = state.search(Request(text=QUERY, k=1))["hits"][0]
    original = thumbs._oriented

    def removed_meanwhile(data, name):  # `ldot index rm` runs while the thumbnail is being made
        remove_index("default")
        return original(data, name)

    monkeypatch.setattr(thumbs, "_oriented", removed_meanwhile)
    try:
        with TestClient(create_app(state), base_url="http://127.0.0.1:8765") as racing:
            got = racing.get(f"/thumb/{hit['id']}")
        assert got.status_code == 200  # this request still gets its thumbnail...
        assert not index_path("default").exists()  # ...but the removed index is not brought back
    finally:
        state.close()


# -- re-rankers a request may name ---------------------------------------------------------------------------
def test_a_request_names_only_catalogue_re_rankers(home, client):
    folder = str(home / "models" / "uniter-base")
    for spelling in (folder, folder + "/", "/" + folder, folder + "/.", "../../models/uniter-base", "~/x"):
        got = search(client, {"q": QUERY, "k": 2, "rerank": True, "rerank_k": 3, "reranker": spelling})
        assert got.status_code == 422, (spelling, got.text)
        assert "not one this server offers" in got.json()["error"] and "uniter-base" in got.json()["error"]
    searcher = client.app_state.searcher
    assert searcher is None or not searcher.rerankers.loaded  # nothing was loaded for them
    ok = search(client, {"q": QUERY, "k": 2, "rerank": True, "rerank_k": 3, "reranker": "uniter-base"})
    assert ok.status_code == 200 and ok.json()["hits"][0]["rerank_score"] is not None
    default = search(client, {"q": QUERY, "k": 2, "rerank": True, "rerank_k": 3})
    assert default.status_code == 200
    assert len(client.app_state.searcher.rerankers.loaded) == 1


def test_the_server_s_own_re_ranker_may_be_a_path(home, monkeypatch):
    monkeypatch.setenv("LDOT_HOME", str(home))
    folder = str(home / "models" / "uniter-base")
    state = ServeState("default", reranker=folder)
    try:
        client = TestClient(create_app(state), base_url="http://127.0.0.1:8765")
        assert client.get("/api/info").json()["reranker"] == folder
        got = search(client, {"q": QUERY, "k": 2, "rerank": True, "rerank_k": 3, "reranker": folder})
        assert got.status_code == 200, got.text
        assert search(client, {"q": QUERY, "k": 2, "rerank": True, "reranker": folder + "/"}).status_code == 422
    finally:
        state.close()


def test_loaded_re_rankers_are_bounded_and_shared_by_spellings(home, monkeypatch, tmp_path):
    import shutil

    from ldot_cli.index.rerank import RERANKER_CACHE
    from ldot_cli.index.search import Searcher

    monkeypatch.setenv("LDOT_HOME", str(home))
    copies = []
    for i in range(RERANKER_CACHE + 2):
        copies.append(tmp_path / f"r{i}")
        shutil.copytree(home / "models" / "uniter-base", copies[-1])
    searcher = Searcher("default", device="cpu")
    try:
        first = searcher.reranker(str(copies[0]))
        for spelling in (f"{copies[0]}/", f"/{copies[0]}", f"{copies[0]}/."):
            assert searcher.reranker(spelling) is first  # one copy for every spelling of one folder
        assert len(searcher.rerankers.loaded) == 1
        for folder in copies[1:]:
            searcher.reranker(str(folder))
            assert len(searcher.rerankers.loaded) <= RERANKER_CACHE
        assert searcher.reranker(str(copies[-1])) is searcher.reranker(f"{copies[-1]}/")
        assert searcher.reranker(str(copies[0])) is not first  # the least recently used one was let go
    finally:
        searcher.close()


def test_a_heic_photo_is_shown_as_a_jpeg(tmp_path):
    """The page cannot show HEIC: `/photo/` sends it decoded as the indexer decodes it (pillow-heif, test extra)."""
    import pillow_heif
    from imagegen import pattern, save
    from PIL import Image

    from ldot_cli.index.thumbs import browser_image

    pillow_heif.register_heif_opener()
    path = save(pattern(64, 32), tmp_path / "photo.heic", fmt="HEIF", quality=95)
    data, kind = browser_image(path.read_bytes(), "photo.heic")
    assert kind == "image/jpeg" and data[:3] == b"\xff\xd8\xff"
    assert Image.open(io.BytesIO(data)).size == (64, 32)


# -- region boxes on demand ----------------------------------------------------------------------------------
def test_boxes_are_asked_for_after_the_results(client):
    plain = search(client, {"q": QUERY, "k": 4})
    assert plain.status_code == 200 and all("boxes" not in h for h in plain.json()["hits"])
    assert plain.json()["timings"]["regions_ms"] == 0  # the results cost no attribution
    ids = [h["id"] for h in plain.json()["hits"]]
    got = client.post("/api/regions", json={"q": QUERY, "ids": ids[:2], "of": 4})  # 2 of a grid of 4
    assert got.status_code == 200, got.text
    data = got.json()
    with_boxes = search(client, {"q": QUERY, "k": 4, "regions": True}).json()["hits"]
    for hit in with_boxes[:2]:  # the same boxes as asked for with the whole search (the same effort per image)
        got_boxes = data["regions"][str(hit["id"])]["boxes"]
        assert len(got_boxes) == len(hit["boxes"])
        assert sum(got_boxes, []) == pytest.approx(sum(hit["boxes"], []), rel=1e-4, abs=1e-4)
        assert data["regions"][str(hit["id"])]["size"] == hit["size"]
    assert set(data["regions"]) == {str(i) for i in ids[:2]}
    assert data["timings"]["per_image_ms"] > 0
    assert client.get("/api/info").json()["regions_ms_per_image"] > 0  # the page says the cost from this
    similar = client.post("/api/regions", json={"id": ids[0], "ids": ids[1:3]})
    assert similar.status_code == 200 and len(similar.json()["regions"]) == 2


@pytest.mark.parametrize("body", [
    {"q": QUERY, "ids": []}, {"q": QUERY, "ids": list(range(51))}, {"q": QUERY, "ids": [10**23]},
    {"ids": [1]}, {"q": QUERY, "id": 1, "ids": [1]}, {"q": QUERY, "ids": "1"}, {"q": QUERY, "ids": [1], "of": 0},
])
def test_bad_region_requests_are_refused(client, body):
    got = client.post("/api/regions", json=body)
    assert got.status_code in (400, 422), got.text
