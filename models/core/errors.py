"""Typed errors with one-line, actionable messages. The CLI maps every `LdotError` to one line on stderr."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable

_OPTION = re.compile("\ue000([A-Za-z_][A-Za-z0-9_]*)\ue001")


def option(name: str) -> str:
    """A setting named inside a message by its Python name (``batch_size``): ``str(error)`` shows `name`, the
    command line shows its flag (``--batch-size``). The library never spells a flag itself."""
    return f"\ue000{name}\ue001"


def render(message: str, flag: Callable[[str], str] | None = None) -> str:
    """A message with each `option` shown as ``flag(name)`` (the command line), or as the Python name."""
    return _OPTION.sub(lambda m: flag(m.group(1)) if flag else f"`{m.group(1)}`", message)


class LdotError(Exception):
    """Base of every error ldot expects and explains. ``str(err)`` is the one-line message for users."""

    exit_code = 2

    def __str__(self) -> str:
        return render(super().__str__())

    def for_cli(self, flag: Callable[[str], str]) -> str:
        """The message with settings shown as the command line's flags."""
        return render(super().__str__(), flag)


class ModelError(LdotError):
    """A model cannot be built, found or used as asked."""


class ConfigError(LdotError):
    """A configuration (a JSON file or a dict) has unknown keys or values of the wrong shape."""


class CheckpointError(ModelError):
    """A checkpoint file is unreadable, of an unknown format, or does not match the model (lists the keys)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle wants to run code or build objects beyond tensors and plain containers: refused unread."""


class ModelNotFoundError(ModelError):
    """A named model is not in the registry or not present in the cache."""


class DeviceError(LdotError):
    """A device cannot be used as asked (e.g. CUDA when torch sees no GPU): `models.core.device.pick_device`."""


class DownloadError(LdotError):
    """A download failed: unreachable, interrupted, wrong size or wrong sha256."""


class LdotWarning(UserWarning):
    """Something the user should know that did not stop the work (raised through `warnings.warn`; the
    command line prints it as one ``warning:`` line on stderr)."""


class StorageError(LdotError):
    """The disk refused a write (full, over quota, read-only, I/O error). Work committed before it is kept."""


_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
# How SQLite, LMDB and FAISS (C++ errors surfacing as RuntimeError) word the same failures.
_STORAGE_WORDS = ("database or disk is full", "disk i/o error", "attempt to write a readonly database",
                  *(os.strerror(code).lower() for code in sorted(_STORAGE_ERRNOS)))


def as_storage_error(exc: BaseException) -> StorageError | None:
    """A one-line :class:`StorageError` when ``exc`` (or what caused it) is the disk refusing a write, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageError):
            return current
        if isinstance(current, OSError) and current.errno in _STORAGE_ERRNOS:
            where = f" writing {current.filename}" if current.filename else ""
            return StorageError(f"{current.strerror or os.strerror(current.errno)}{where}: free space (or fix the "
                                "disk) and run the same command again; work committed before this is kept")
        text = str(current).lower()
        words = next((w for w in _STORAGE_WORDS if w in text), None)
        if words is not None:  # no file name in these: name the cache, where ldot writes unless told otherwise
            return StorageError(f"{' '.join(str(current).split())} (cache: {_cache_dir()}): free space (or fix the "
                                "disk) and run the same command again; work committed before this is kept")
        current = current.__cause__ or current.__context__
    return None


def _cache_dir() -> str:
    """Where ldot writes (models.core.home.ldot_home's answer, without importing it: home imports this module)."""
    env = os.environ.get("LDOT_HOME")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    from platformdirs import user_cache_dir

    return user_cache_dir("ldot", appauthor=False)
