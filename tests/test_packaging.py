"""The installed package is what the tests exercise, and the wheel ships only the designed packages."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import feature_extraction
import ldot_cli
import models

PACKAGES = {"ldot_cli", "feature_extraction", "models"}


@pytest.mark.skipif(not os.environ.get("LDOT_EXPECT_INSTALLED"), reason="set by .ci/run, which installs the package")
def test_tests_run_against_the_installed_package():
    for module in (ldot_cli, models, feature_extraction):
        assert "site-packages" in module.__file__, module.__file__


@pytest.mark.skipif(not os.environ.get("LDOT_WHEEL"), reason="set by .ci/run after building the wheel")
def test_wheel_contains_only_the_three_packages():
    names = zipfile.ZipFile(os.environ["LDOT_WHEEL"]).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == PACKAGES, tops
    assert not any("/tests/" in n or n.startswith("tests/") for n in names)


def test_help_is_fast_and_lists_every_command():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "from ldot_cli.main import run; run()", "--help"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "120"})
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    for command in ("index", "search", "eval", "train", "models", "status", "extract", "serve"):
        assert f" {command} " in result.stdout, command
    heavy = subprocess.run([sys.executable, "-X", "importtime", "-c", "from ldot_cli.main import app"],
                           capture_output=True, text=True, timeout=60).stderr
    for module in ("torch", "faiss", "transformers", "numpy"):
        assert f" {module}\n" not in heavy and f"| {module}\n" not in heavy, f"{module} imported at start-up"
    assert elapsed < 10  # the figure that matters is measured in benchmarks; this only catches regressions


def test_docs_exist():
    root = Path(__file__).resolve().parents[1]
    if not (root / "README.md").is_file():
        pytest.skip("running from an installed package without the source tree")
    readme = (root / "README.md").read_text()
    assert readme.count("```") >= 2 and "pytest" in readme.split("```")[1]


def test_extras_never_mix_cuda_majors_with_the_pinned_torch():
    """Before the fix: `pip install ".[gpu]"` pulled faiss-gpu's CUDA 12 libraries beside torch's CUDA 13 ones.
    Every CUDA-specific requirement of an extra (faiss-gpu*, nvidia-*) must name torch's CUDA major."""
    import importlib.metadata
    import re
    import tomllib

    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        pytest.skip("running from an installed package without the source tree")
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pinned = next(r for r in project["dependencies"] if r.startswith("torch=="))
    assert importlib.metadata.version("torch").split("+")[0] == pinned.split("==")[1]
    majors = {int(m) for r in importlib.metadata.requires("torch") or [] for m in re.findall(r"-cu(\d+)\b", r)}
    if not majors:
        import torch

        if torch.version.cuda is None:
            pytest.skip("a CPU-only torch build: no CUDA major to compare with")
        majors = {int(torch.version.cuda.split(".")[0])}
    extras = project["optional-dependencies"]
    assert "gpu" in extras  # `pip install ".[gpu]"` keeps working
    for extra, requirements in extras.items():
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
            if name.startswith(("faiss-gpu", "nvidia-", "cupy")):
                found = re.search(r"cu(\d+)$", name)
                assert found and {int(found.group(1))} == majors, (
                    f"[{extra}] {requirement}: CUDA {found.group(1) if found else '12 (unsuffixed faiss-gpu)'} "
                    f"beside torch's CUDA {sorted(majors)}")


def test_extras_are_installed_from_the_clone_and_cpu_torch_is_mentioned():
    """ldot is not on PyPI, so `pip install 'ldot[serve]'` fails for a user who cloned it: every
    install line of the README and every hint the code prints installs an extra from the folder (`'.[serve]'`),
    and names an extra pyproject.toml has. The CPU-only torch wheels are mentioned; the set-up lines stay two."""
    import re
    import tomllib

    root = Path(__file__).resolve().parents[1]
    if not (root / "README.md").is_file():
        pytest.skip("running from an installed package without the source tree")
    readme = (root / "README.md").read_text()
    extras = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    sources = [readme] + [p.read_text() for pkg in PACKAGES for p in (root / pkg).rglob("*.py")]
    for text in sources:
        assert "install 'ldot[" not in text and 'install "ldot[' not in text
    named = re.findall(r"""pip install ['"]\.\[([\w,]+)\]['"]""", "\n".join(sources))
    assert named and {e for group in named for e in group.split(",")} <= extras
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    setup = readme.split("```")[1].strip().splitlines()
    assert len(setup) == 3 and setup[1].startswith("python3 -m venv .venv && .venv/bin/pip install . && ")
