"""`ldot serve` attacked on its inputs, in-process (FastAPI's test client, no browser, no second process):
request values that must be refused with a 422, not a 500."""

from __future__ import annotations

import pytest
from fakes import FakeDetector
from ldot_testing import install_tiny_model, make_photos, write_vocab

pytest.importorskip("fastapi")  # the serve extra is optional for users; the test extra installs it
from fastapi.testclient import TestClient  # noqa: E402

from ldot_cli.serve.app import ServeState, create_app  # noqa: E402

QUERY = "a dog on the beach"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("serve_hard_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDOT_HOME", str(home))
        install_tiny_model("tiny", write_vocab(home / "vocab").parent)
        make_photos(home / "photos", 6, size=(96, 64))
        from ldot_cli.index.indexer import Indexer

        Indexer("default", model="tiny", detector=FakeDetector(), num_workers=0).run([home / "photos"])
    return home


@pytest.fixture
def client(home, monkeypatch):
    monkeypatch.setenv("LDOT_HOME", str(home))
    state = ServeState("default")
    with TestClient(create_app(state), base_url="http://127.0.0.1:8765", raise_server_exceptions=False) as client:
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
