"""`ldot serve`: the page in a real browser (headless Chromium driven by selenium), the API with an HTTP
client (bad and huge queries, path traversal, the access token), and `ldot search` through a running server.

Two real `ldot serve` processes over one tiny index: one on loopback, one bound to 0.0.0.0 (which needs the
token; the tests reach it through 127.0.0.1 only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fakes import FakeDetector
from ldot_testing import (
    install_tiny_model,
    install_tiny_reranker,
    make_photos,
    write_vocab,
)
from typer.testing import CliRunner

from ldot_cli.main import app

pytestmark = pytest.mark.slow
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900"]
QUERY = "a dog on the beach"
runner = CliRunner()


def _ldot(*args: str) -> list[str]:
    return [sys.executable, "-c", "from ldot_cli.main import run; run()", *args]


class Served:
    def __init__(self, home: Path, host: str) -> None:
        env = {**os.environ, "LDOT_HOME": str(home), "LDOT_NO_PROGRESS": "1", "COLUMNS": "300"}
        self.proc = subprocess.Popen(_ldot("serve", "--port", "0", "--host", host), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.url = ""
        self.stderr = ""

    def wait(self) -> Served:
        line = self.proc.stdout.readline().strip()  # the URL, printed once the socket listens
        if not line.startswith("http://"):
            self.proc.kill()
            raise AssertionError(f"no URL from ldot serve: {line!r} {self.proc.stderr.read()}")
        self.url = line
        return self

    @property
    def base(self) -> str:
        return self.url.split("?")[0].rstrip("/")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.stderr = self.proc.stderr.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("serve_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDOT_HOME", str(home))
        vocab = write_vocab(home / "vocab").parent
        install_tiny_model("tiny", vocab)
        install_tiny_reranker("uniter-base", vocab)  # the page's re-rank toggle
        folder = home / "photos"
        make_photos(folder, 8, size=(96, 64))
        from ldot_cli.index.indexer import Indexer
        from ldot_cli.index.options import IndexOptions

        Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([folder])
    shutil.copytree(home / "models", home / "x" / "models")  # the second server has a home of its own
    shutil.copytree(home / "indexes", home / "x" / "indexes")
    local, public = Served(home, "127.0.0.1"), Served(home / "x", "0.0.0.0")  # started together
    try:
        yield home, local.wait(), public.wait()
    finally:
        for server in (local, public):
            server.proc.terminate()
        local.stop()
        public.stop()
    assert not (home / "serve" / "default.json").exists()  # the announcement goes with the server


@pytest.fixture
def env(served, monkeypatch):
    home = served[0]
    monkeypatch.setenv("LDOT_HOME", str(home))
    return {**os.environ, "LDOT_HOME": str(home), "COLUMNS": "300"}


def api(base: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{base}/api/search", json=body, timeout=120, **kw)


def local_hits(body: dict) -> list[dict]:
    from ldot_cli.index.search import Request, Searcher

    searcher = Searcher("default")
    try:
        answer = searcher.answer(Request(text=body.get("q"), vector_id=body.get("id"), k=body.get("k", 10),
                                         regions=body.get("regions", False)))
        return [h.api_json() for h in answer.hits]
    finally:
        searcher.close()


# -- the API -------------------------------------------------------------------------------------------------
def test_api_answers_as_the_library_does(served, env):
    _, local, _ = served
    info = httpx.get(f"{local.base}/api/info", timeout=60).json()
    assert info["index"] == "default" and info["model"] == "tiny" and info["images"] == 8
    got = api(local.base, {"q": QUERY, "k": 5, "regions": True})
    assert got.status_code == 200, got.text
    data = got.json()
    want = local_hits({"q": QUERY, "k": 5, "regions": True})
    assert [h["path"] for h in data["hits"]] == [h["path"] for h in want]
    assert [h["score"] for h in data["hits"]] == pytest.approx([h["score"] for h in want], abs=1e-4)
    assert all(h["boxes"] and len(h["regions"][0]) == 5 for h in data["hits"])
    assert data["timings"]["total_ms"] > 0
    assert info["reranker"] == "uniter-base"
    reranked = api(local.base, {"q": QUERY, "k": 4, "rerank": True, "rerank_k": 6}).json()
    scores = [h["rerank_score"] for h in reranked["hits"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True) and reranked["timings"]["rerank_ms"] > 0
    assert {h["path"] for h in reranked["hits"]} <= {h["path"] for h in local_hits({"q": QUERY, "k": 6})}


@pytest.mark.parametrize("body, status, message", [
    ({"q": ""}, 400, "empty query"),
    ({"q": "   "}, 400, "empty query"),
    ({}, 400, "give exactly one of"),
    ({"q": "dog", "id": 1}, 400, "give exactly one of"),
    ({"q": "dog", "k": 0}, 422, "k"),
    ({"q": "dog", "k": "many"}, 422, "k"),
    ({"q": "dog", "min_score": "lots"}, 400, "`min_score` must be a number"),
    ({"q": "dog", "min_score": "auto"}, 400, "no score calibration"),
    ({"q": "x" * 20_000}, 422, "q"),  # under the body limit, over the query limit
    ({"q": ["dog"]}, 422, "q"),
    ({"id": 99999}, 400, "no indexed image has id 99999"),
    ({"sha256": "../../etc/passwd"}, 422, "sha256"),
])
def test_bad_queries_get_a_clear_error(served, body, status, message):
    got = api(served[1].base, body)
    assert got.status_code == status, got.text
    assert message in got.json()["error"]


def test_huge_and_malformed_requests_are_refused(served):
    base = served[1].base
    huge = httpx.post(f"{base}/api/search", content=b'{"q": "' + b"a" * 200_000 + b'"}',
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert huge.status_code == 413
    chunked = httpx.post(f"{base}/api/search", content=iter([b'{"q": "', b"a" * 1000, b'"}']),
                         headers={"Content-Type": "application/json"}, timeout=60)
    assert chunked.status_code == 411  # no length announced: refused before reading
    bad = httpx.post(f"{base}/api/search", content=b"{not json", headers={"Content-Type": "application/json"},
                     timeout=60)
    assert bad.status_code == 422
    odd = api(base, {"q": "dog\x00\x01\u200b\U0001F415 x\ud800y".encode("utf-8", "surrogatepass").decode(
        "utf-8", "replace"), "k": 2})
    assert odd.status_code == 200 and len(odd.json()["hits"]) == 2


@pytest.mark.parametrize("route", [
    "/thumb/../../etc/passwd", "/photo/..%2f..%2fetc%2fpasswd", "/thumb/%2e%2e/%2e%2e/etc/passwd",
    "/photo/-1", "/photo/99999", "/thumb/1.5", "/photo//etc/passwd", "/thumb/1?path=/etc/passwd/../passwd",
    "/photo/0x1", "/static/../app.py", "/api/../../etc/passwd",
])
def test_only_indexed_files_are_served(served, route):
    got = httpx.get(served[1].base + route, timeout=60)
    if route.startswith("/thumb/1?"):  # an indexed image: the extra parameter is ignored
        assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
        return
    assert got.status_code in (404, 422), (route, got.status_code)
    assert b"root:" not in got.content and b"import" not in got.content


def test_thumbnails_and_photos(served):
    home, local, _ = served
    hit = api(local.base, {"q": QUERY, "k": 1}).json()["hits"][0]
    thumb = httpx.get(f"{local.base}/thumb/{hit['id']}", timeout=60)
    photo = httpx.get(f"{local.base}/photo/{hit['id']}", timeout=60)
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
    assert photo.status_code == 200 and photo.content == Path(hit["path"]).read_bytes()
    assert list((home / "indexes" / "default" / "thumbs").rglob("*.jpg"))  # cached beside the index


def test_loopback_server_refuses_foreign_host_names(served):
    got = httpx.get(f"{served[1].base}/api/info", headers={"Host": "attacker.example:80"}, timeout=60)
    assert got.status_code == 403


def test_non_local_bind_needs_the_token(served):
    _, _, public = served
    assert "token=" in public.url
    token = public.url.split("token=")[1]
    base = public.base
    assert httpx.get(f"{base}/api/info", timeout=60).status_code == 403
    assert httpx.get(f"{base}/api/info", params={"token": token[:-1] + "x"}, timeout=60).status_code == 403
    assert httpx.get(f"{base}/", timeout=60).status_code == 403
    assert httpx.get(f"{base}/thumb/1", timeout=60).status_code == 403
    assert api(base, {"q": QUERY}, headers={"X-Ldot-Token": "wrong"}).status_code == 403
    assert httpx.get(f"{base}/api/info", params={"token": token}, timeout=60).status_code == 200
    assert api(base, {"q": QUERY}, headers={"X-Ldot-Token": token}).status_code == 200
    assert httpx.get(public.url, timeout=60).status_code == 200  # the printed URL opens the page


# -- ldot search through the server --------------------------------------------------------------------------
def test_cli_search_uses_the_running_server_with_the_same_output(served, env):
    _, local, _ = served
    before = httpx.get(f"{local.base}/api/info", timeout=60).json()["answered"]
    for args in (["--json", "--regions"], ["-0"], ["--image", None]):
        if args and args[-1] is None:
            photo = api(local.base, {"q": QUERY, "k": 1}).json()["hits"][0]["path"]
            args = ["--image", photo, "--json"]
            query: list[str] = []
        else:
            query = [QUERY]
        through = subprocess.run(_ldot("search", *query, "-k", "4", *args), capture_output=True, timeout=120,
                                 env=env)
        plain = runner.invoke(app, ["search", *query, "-k", "4", *args], env={"LDOT_NO_SERVER": "1",
                                                                              "COLUMNS": "300"})
        assert through.returncode == 0 and plain.exit_code == 0, (through.stderr, plain.output)
        assert through.stdout == plain.stdout_bytes, args
    after = httpx.get(f"{local.base}/api/info", timeout=60).json()["answered"]
    assert after - before >= 3  # each of the three went through the server (the info call itself is no query)
    failing = subprocess.run(_ldot("search", "  ", "--json"), capture_output=True, text=True, timeout=120, env=env)
    assert failing.returncode == 2 and "empty query" in failing.stderr


# -- the page in a real browser ------------------------------------------------------------------------------
def _browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.binary_location = chromium
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


def test_the_page_in_a_real_browser(served, env, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    _, local, _ = served
    want = [h["path"] for h in api(local.base, {"q": QUERY, "k": 20, "regions": True}).json()["hits"]]
    driver = _browser(tmp_path)
    try:
        wait = WebDriverWait(driver, 90)
        driver.get(local.url)
        wait.until(lambda d: "8 images" in d.find_element(By.ID, "status").text)
        assert "index default" in driver.find_element(By.ID, "status").text
        assert driver.find_element(By.ID, "rerank").is_enabled()  # a cross-encoder is installed
        box = driver.find_element(By.ID, "q")
        box.send_keys(QUERY, Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == len(want))
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
        assert [c.get_attribute("data-path") for c in cards] == want  # the expected thumbnails, in order
        assert [c.get_attribute("data-rank") for c in cards] == [str(i) for i in range(1, len(want) + 1)]
        assert "score" in cards[0].text
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                                 for i in d.find_elements(By.CSS_SELECTOR, "#results .card img")))
        assert not driver.find_elements(By.CSS_SELECTOR, "#results .box")  # results first: boxes only on demand
        assert "boxes on results" in driver.find_element(By.ID, "boxes-label").text
        driver.find_element(By.ID, "boxes").click()  # the switch: boxes for every result, fetched after the grid
        wait.until(lambda d: all(c.find_elements(By.CSS_SELECTOR, ".box") for c in cards))
        assert "boxes of" in driver.find_element(By.ID, "status").text
        assert " for 20)" in driver.find_element(By.ID, "boxes-cost").text  # the measured cost, said
        driver.find_element(By.ID, "boxes").click()  # off again: the opened photo still gets its boxes
        assert "query" in driver.find_element(By.ID, "status").text and "ms" in driver.find_element(By.ID, "status").text
        keep = os.environ.get("LDOT_SCREENSHOTS")
        if keep:
            driver.save_screenshot(str(Path(keep) / "serve-results.png"))
        target = cards[2]
        similar_want = [h["path"] for h in api(local.base, {"id": int(target.get_attribute("data-id")), "k": 20,
                                                            "regions": True}).json()["hits"]]
        target.click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#similar .card")) == len(similar_want))
        similar = driver.find_elements(By.CSS_SELECTOR, "#similar .card")
        assert [c.get_attribute("data-path") for c in similar] == similar_want
        wait.until(lambda d: d.execute_script("const i = document.getElementById('photo');"
                                              "return i.complete && i.naturalWidth > 0"))
        frame = driver.find_element(By.ID, "photo-pic")
        wait.until(lambda d: frame.find_elements(By.CSS_SELECTOR, ".box"))  # asked for when the photo opened
        boxes = frame.find_elements(By.CSS_SELECTOR, ".box")
        assert boxes and boxes[0].size["width"] > 2 and boxes[0].size["height"] > 2  # the region, drawn
        assert driver.find_element(By.ID, "photo-path").text == want[2]
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        keep = os.environ.get("LDOT_SCREENSHOTS")
        if keep:
            shutil.copy(shot, Path(keep) / "serve-page.png")
    finally:
        driver.quit()
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "the screenshot is (nearly) blank"
    accent = sum(n for n, c in colours if abs(c[0] - 232) < 20 and abs(c[1] - 89) < 25 and c[2] < 60)
    assert accent > 100  # the orange region boxes are on screen


def test_the_server_follows_index_updates_without_a_restart(served, monkeypatch):
    """New photos indexed while the server runs are searchable at once; a rebuilt index (--reindex) too."""
    home, _, public = served
    token = public.url.split("token=")[1]
    headers = {"X-Ldot-Token": token}

    def info() -> dict:
        return httpx.get(f"{public.base}/api/info", headers=headers, timeout=60).json()

    assert info()["images"] == 8
    monkeypatch.setenv("LDOT_HOME", str(home / "x"))
    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions

    more = home / "x" / "more"
    make_photos(more, 3, start=50, size=(96, 64))
    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([more])
    assert info()["images"] == 11
    hits = api(public.base, {"q": QUERY, "k": 20}, headers=headers).json()["hits"]
    assert len(hits) == 11 and sum(h["path"].startswith(str(more)) for h in hits) == 3
    new = next(h for h in hits if h["path"].startswith(str(more)))
    assert httpx.get(f"{public.base}/thumb/{new['id']}", headers=headers, timeout=60).status_code == 200
    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([more], reindex=True)
    assert info()["images"] == 3
    hits = api(public.base, {"q": QUERY, "k": 20}, headers=headers).json()["hits"]
    assert sorted(h["path"] for h in hits) == sorted(str(p) for p in more.iterdir())
