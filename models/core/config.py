"""The one policy for configuration read from JSON (model configs, run configs, detector configs).

A config is a dataclass. Reading one from a dict accepts exactly the dataclass's fields: an unknown key is an
error that names every unknown key and the file it came from (a typo or a file from a newer ldot must not be
silently dropped), a value of the wrong shape is an error naming the field, and missing keys take their defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from models.core.errors import ConfigError

T = TypeVar("T")


def config_from_dict(cls: type[T], data: Any, what: str = "", nested: Mapping[str, type] | None = None) -> T:
    """Build the dataclass ``cls`` from ``data``; ``what`` names the source in errors (e.g. a file path).

    ``nested`` maps field names to dataclasses built the same way from sub-dicts.
    """
    source = f" in {what}" if what else ""
    name = cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{name}{source} must be a JSON object, not {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {name} key(s){source}: {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(fields)})")
    values = dict(data)
    for key, sub in (nested or {}).items():
        if key in values and not dataclasses.is_dataclass(values[key]):
            values[key] = config_from_dict(sub, values[key], f"{what}:{key}" if what else key)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad {name}{source}: {exc}") from None
