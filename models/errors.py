"""Typed errors with one-line, actionable messages. The CLI maps every `LdotError` to one line on stderr."""

from __future__ import annotations


class LdotError(Exception):
    """Base of every error ldot expects and explains. ``str(err)`` is the one-line message for users."""

    exit_code = 2


class ModelError(LdotError):
    """A model cannot be built, found or used as asked."""


class CheckpointError(ModelError):
    """A checkpoint file is unreadable, of an unknown format, or does not match the model (lists the keys)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle wants to run code or build objects beyond tensors and plain containers: refused unread."""


class ModelNotFoundError(ModelError):
    """A named model is not in the registry or not present in the cache."""


class DownloadError(LdotError):
    """A download failed: unreachable, interrupted, wrong size or wrong sha256."""
