"""One registry per concept: the switches of the environment, the box presets, the device rule, the private
atomic write, the one tar reader and the paths under the ldot home are each defined once and read the same way
everywhere."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(("value", "on"), [(None, False), ("", False), ("0", False), ("false", False),
                                           ("No", False), (" off ", False), ("1", True), ("yes", True),
                                           ("true", True), ("anything", True)])
def test_every_switch_reads_the_same_way(monkeypatch, value, on):
    from ldot_cli.commands.console import progress_enabled
    from ldot_cli.serve.client import find_server
    from models.core.env import flag

    for name in ("LDOT_DEBUG", "LDOT_NO_PROGRESS", "LDOT_NO_SERVER"):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        assert flag(name) is on
    assert progress_enabled() is not on  # LDOT_NO_PROGRESS=0 shows progress (it used to hide it)
    if on:
        assert find_server("default") is None


def test_box_presets_are_defined_once():
    from feature_extraction.detector.selection import LXMERT36, UNITER, LxmertSelection, UniterSelection, get_preset
    from feature_extraction.errors import PresetError
    from feature_extraction.types import BOX_PRESETS
    from feature_extraction.uniter_db import resolve_cut

    uniter, lxmert = BOX_PRESETS["uniter"], BOX_PRESETS["lxmert36"]
    assert (UNITER.conf_thresh, UNITER.min_boxes, UNITER.max_boxes) == (uniter.conf_th, uniter.min_bb, uniter.max_bb)
    assert LXMERT36.max_boxes == lxmert.num_bb == 36
    assert UNITER == UniterSelection() and LXMERT36 == LxmertSelection()  # the published numbers, unchanged
    messages = []
    for lookup in (get_preset, resolve_cut):
        with pytest.raises(PresetError) as caught:
            lookup("bogus")
        messages.append(str(caught.value))
    assert messages[0] == messages[1] == "unknown preset 'bogus': choose uniter or lxmert36"


def test_one_device_rule(monkeypatch):
    import torch

    from models.core.device import pick_device
    from models.core.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == pick_device(None) == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    for asked in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(DeviceError, match="no CUDA device is available: use `device` auto or cpu"):
            pick_device(asked)
    with pytest.raises(DeviceError, match="not a device"):
        pick_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda:1")


def test_loaders_follow_the_device_rule(monkeypatch, vocab_dir):
    """An explicit cuda without CUDA is one line from the loader (it used to crash inside torch)."""
    import torch
    from ldot_testing import install_tiny_model

    from models.core.errors import DeviceError
    from models.hub.load import load_bi_encoder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    install_tiny_model("tiny", vocab_dir)
    assert next(load_bi_encoder("tiny", device="auto").parameters()).device.type == "cpu"
    with pytest.raises(DeviceError):
        load_bi_encoder("tiny", device="cuda")


def test_every_path_under_the_home_comes_from_home_py(ldot_home):
    """The announcements, downloads' hashes, datasets and the prompt's history: where `models.core.home` says."""
    from ldot_cli.data.datasets import dataset_dir
    from ldot_cli.serve.client import announce_path
    from models.core import home

    assert announce_path("photos") == home.serve_dir() / "photos.json" == ldot_home / "serve" / "photos.json"
    assert dataset_dir("flickr30k") == home.datasets_dir() / "flickr30k" == ldot_home / "datasets" / "flickr30k"
    assert home.known_hashes_path() == ldot_home / "known_hashes.json"
    assert home.search_history_path() == ldot_home / "search_history"
    assert home.runs_dir() == ldot_home / "runs"


def test_atomic_writes_say_who_may_read(tmp_path):
    """The server's announcement (a token) is readable by its user only; dataset files get open()'s mode."""
    import os

    from models.core.fileio import SHARED, atomic_write_bytes, atomic_writer

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "private", b"secret")
        atomic_write_bytes(tmp_path / "shared", b"data", SHARED)
    finally:
        os.umask(old)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o644
    target = tmp_path / "piecewise"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as out:
        out.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["piecewise", "private",
                                                                                             "shared"]


def test_the_server_announcement_is_private(ldot_home):
    import json
    import os

    from ldot_cli.serve.client import announce

    path = announce("photos", "127.0.0.1", 8123, "t0ken")
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["token"] == "t0ken" and json.loads(path.read_text())["pid"] == os.getpid()


def test_one_tar_reader_reads_only_files_and_tells_a_cut_tar(tmp_path):
    import io
    import tarfile

    from ldot_cli.index.ray_inputs import tar_bytes
    from models.core.tarfiles import read_tar

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("a.jpg", b"A" * 700), ("b.txt", b"caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("c.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    seen: list[str] = []
    got = list(read_tar(io.BytesIO(buf.getvalue()), lambda m: seen.append(m.name) or True, len(buf.getvalue())))
    assert seen == ["a.jpg", "b.txt", "c.jpg"]  # select sees every member ...
    assert [(m.name, data) for m, data in got] == [("a.jpg", b"A" * 700), ("b.txt", b"caption")]  # ... links unread
    whole = tar_bytes({"a.jpg": b"A" * 700, "b.jpg": b"B" * 10})
    cut = whole[:512 + 1024]  # header and content of a.jpg: a valid tar, one member shorter, without its end
    assert [m.name for m, _ in read_tar(io.BytesIO(cut), lambda m: True)] == ["a.jpg"]
    with pytest.raises(tarfile.ReadError, match="cut short"):
        list(read_tar(io.BytesIO(cut), lambda m: True, len(cut)))


def test_the_hub_cache_is_huggingface_hubs_own(tmp_path):
    """HF_HOME (without HF_HUB_CACHE) moves the cache for ldot as for huggingface_hub; a repo's folder is the
    documented ``models--<org>--<name>``."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    code = ("from models.hub.hf_cache import hub_cache_dir, repo_folder; from huggingface_hub import constants; "
            "print(hub_cache_dir()); print(constants.HF_HUB_CACHE); print(repo_folder('org/bert'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    ours, theirs, folder = out.stdout.splitlines()
    assert ours == theirs == str(tmp_path / "hf" / "hub")
    assert folder == str(tmp_path / "hf" / "hub" / "models--org--bert")
