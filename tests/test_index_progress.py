"""`ldot index` shows progress per image and, on Ctrl-C, says what a re-run reuses."""

from __future__ import annotations

import pytest
from ldot_testing import install_tiny_detector, install_tiny_model, make_photos
from typer.testing import CliRunner

from ldot_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture
def tiny(vocab_dir, tmp_path):
    _, dim = install_tiny_detector("tiny-det")
    install_tiny_model("tiny", vocab_dir, img_dim=dim)
    folder = tmp_path / "photos"
    make_photos(folder, 5, size=(64, 48))
    return folder


def test_extraction_progress_advances_per_image_within_a_batch(tiny):
    from feature_extraction.detector.weights import open_detector
    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions

    events = []
    detector = open_detector("tiny-det", device="cpu")
    Indexer("default", IndexOptions(model="tiny", batch_size=8, num_workers=0, device="cpu"), detector=detector, progress=events.append).run([tiny])
    extracting = [p.done for p in events if p.stage == "extracting" and p.total == 5]
    assert set(range(1, 6)) <= set(extracting), extracting  # one batch of 5, yet every image shows
    assert extracting == sorted(extracting)


def test_ctrl_c_says_what_a_re_run_reuses(tiny, monkeypatch):
    from ldot_cli.index import hooks

    def interrupted(done: int) -> None:
        if done >= 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(hooks, "committed", [interrupted])
    args = ["index", str(tiny), "--model", "tiny", "--detector", "tiny-det", "--workers", "0", "--device", "cpu",
            "--batch-size", "2"]
    stopped = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert stopped.exit_code == 130, stopped.output
    message = " ".join(stopped.output.split())
    assert "keeps the 2 images already in it" in message and "run the same command again" in message
    monkeypatch.setattr(hooks, "committed", [])
    again = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert again.exit_code == 0, again.output
    assert "3 encoded" in " ".join(again.output.split())  # the 2 committed ones were not redone


def test_ctrl_c_counts_regions_extracted_but_not_yet_encoded(tiny, monkeypatch):
    from ldot_cli.index import encoding

    def stop(self) -> None:
        if self.items:
            raise KeyboardInterrupt

    monkeypatch.setattr(encoding.Batcher, "flush", stop)
    stopped = runner.invoke(app, ["index", str(tiny), "--model", "tiny", "--detector", "tiny-det", "--workers", "0",
                                  "--device", "cpu", "--batch-size", "2"], env={"COLUMNS": "400"})
    assert stopped.exit_code == 130, stopped.output
    message = " ".join(stopped.output.split())
    assert "keeps the 0 images" in message and "the regions of 2 more are extracted" in message
