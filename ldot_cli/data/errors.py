"""Errors of the data layer (benchmark readers, feature cache, training sources)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.core.errors import LdotError


class DatasetError(LdotError):
    """A benchmark file is missing or malformed (the message names the file and what was expected)."""


def load_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist (expected {what})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}); expected {what}") from None
