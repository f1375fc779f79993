"""Where ldot keeps its files: checkpoints, indexes and caches.

Everything lives under one directory, the *home*: ``$LDOT_HOME`` when set, else the
platform's user cache dir (``platformdirs.user_cache_dir("ldot")``, e.g. ``~/.cache/ldot``).

Layout (documented in the README); every path under the home is computed here, nowhere else::

    <home>/
      models/<name>/          one directory per named checkpoint (registry name or --as NAME)
      indexes/<name>/         one directory per named search index
      features/               cached region features (e.g. for `ldot eval`)
      datasets/<name>/        fetched benchmarks and training sets (`ldot data`)
      runs/<name>/            one directory per training run (`ldot train`): resume checkpoint, best model
      serve/<index>.json      the announcement of a running `ldot serve` (pid, port, token; user-only)
      known_hashes.json       sha256 recorded on first verified download (trust on first use)
      search_history          the queries typed at the `ldot search` prompt
"""

from __future__ import annotations

import os
from pathlib import Path

from models.core.errors import LdotError

ENV_HOME = "LDOT_HOME"


class HomeError(LdotError):
    """$LDOT_HOME (or the cache folder) cannot be used: a file, or not writable."""


def ldot_home() -> Path:
    """The root directory for all of ldot's files (not created here). Raises :class:`HomeError` when
    ``$LDOT_HOME`` (or one of its parents) is a file, not a folder."""
    env = os.environ.get(ENV_HOME)
    if env:
        home = Path(env).expanduser().absolute()
        existing = next((p for p in (home, *home.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "is" if existing == home else f"is under {existing}, which is"
            raise HomeError(f"{ENV_HOME}={env} {where} not a folder: point {ENV_HOME} at a folder (created when "
                            "missing), or unset it to use the user cache dir")
        return home
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ldot", appauthor=False))


def as_home_error(exc: BaseException) -> HomeError | None:
    """A one-line :class:`HomeError` when ``exc`` (or its cause) is the home folder refusing to be created or written
    (permission denied, not creatable, under a path that cannot hold folders), else None."""
    import errno

    codes = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR}  # EROFS: a storage error
    try:
        home = ldot_home()
    except HomeError as err:
        return err
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in codes and current.filename:
            target = Path(os.fsdecode(current.filename)).absolute()
            inside = target == home or home in target.parents
            unusable = not home.is_dir() or not os.access(home, os.W_OK | os.X_OK)
            if inside and unusable:
                name = f"{ENV_HOME} ({home})" if os.environ.get(ENV_HOME) else f"the cache folder {home}"
                return HomeError(f"cannot write in {name}: {current.strerror or current} ({target}); set "
                                 f"{ENV_HOME} to a folder you can write to")
        current = current.__cause__ or current.__context__
    return None


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


def datasets_dir() -> Path:
    """Directory holding one sub-directory per fetched dataset (`ldot data get`)."""
    return ldot_home() / "datasets"


def serve_dir() -> Path:
    """Directory of the announcements of running servers (`ldot serve`), one ``<index>.json`` each."""
    return ldot_home() / "serve"


def known_hashes_path() -> Path:
    """The sha256 of downloads without a published hash, recorded at their first verified download."""
    return ldot_home() / "known_hashes.json"


def search_history_path() -> Path:
    """The queries typed at the `ldot search` prompt, newest last."""
    return ldot_home() / "search_history"
