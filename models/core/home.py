"""Where ldot keeps its files: checkpoints, indexes and caches.

Everything lives under one directory, the *home*: ``$LDOT_HOME`` when set, else the
platform's user cache dir (``platformdirs.user_cache_dir("ldot")``, e.g. ``~/.cache/ldot``).

Layout (documented in the README)::

    <home>/
      models/<name>/          one directory per named checkpoint (registry name or --as NAME)
      indexes/<name>/         one directory per named search index
      features/               cached region features (e.g. for `ldot eval`)
      runs/<name>/            one directory per training run (`ldot train`): resume checkpoint, best model
      known_hashes.json       sha256 recorded on first verified download (trust on first use)
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "LDOT_HOME"


def ldot_home() -> Path:
    """The root directory for all of ldot's files (not created here)."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser().absolute()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ldot", appauthor=False))


def models_dir() -> Path:
    """Directory holding one sub-directory per named checkpoint."""
    return ldot_home() / "models"


def indexes_dir() -> Path:
    """Directory holding one sub-directory per named index."""
    return ldot_home() / "indexes"


def features_dir() -> Path:
    """Directory for cached region features (one UNITER image DB per source)."""
    return ldot_home() / "features"


def runs_dir() -> Path:
    """Directory holding one sub-directory per training run (`ldot train --out NAME`)."""
    return ldot_home() / "runs"
