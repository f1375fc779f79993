"""Typed errors of the feature-extraction package.

Every error carries a short human message meant to be shown as one line by the CLI.
"""

from __future__ import annotations

import os

from models.core.errors import LdotError


class FeatureExtractionError(LdotError):
    """Base class of the errors raised by ``feature_extraction`` (one-line messages at the CLI boundary)."""


class ImageLoadError(FeatureExtractionError):
    """An image file could not be turned into RGB pixels.

    ``reason`` is short and human ("empty file", "truncated image data", ...).
    ``permanent`` tells whether retrying the same unchanged file is pointless (a broken
    file) or may succeed later (a missing optional codec, a permission problem).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, *, permanent: bool = True) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        self.permanent = permanent
        super().__init__(f"{self.path}: {reason}")


class MissingCodecError(ImageLoadError):
    """The file is in a format whose optional decoder is not installed (e.g. HEIC)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(path, reason, permanent=False)


class ImageDBError(FeatureExtractionError):
    """An image-feature DB is missing, malformed or of an unsupported layout."""


class DBLockedError(ImageDBError):
    """Another process holds the write lock of an image-feature DB."""


class DetectorError(FeatureExtractionError):
    """The detector failed or returned output that breaks its contract."""


class PresetError(FeatureExtractionError, ValueError):
    """An unknown box-selection preset (a ValueError too, for callers that catch those)."""
