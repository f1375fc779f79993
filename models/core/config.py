"""The one policy for configuration read from JSON (model configs, run configs, detector configs).

A config is a dataclass. Reading one from a dict accepts exactly the dataclass's fields: an unknown key is an
error that names every unknown key and the file it came from (a typo or a file from a newer ldot must not be
silently dropped), a value of the wrong shape is an error naming the field, and missing keys take their defaults.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from models.core.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def bounded(default: Any, low: float, high: float) -> Any:
    """A dataclass field whose value must lie in ``[low, high]`` (checked by `check_ranges` / `range_problem`):
    the one way a config declares the values it can be built with."""
    return dataclasses.field(default=default, metadata={"range": (low, high)})


def range_problem(cls: type, values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> str | None:
    """The first value of ``values`` (field -> value) outside the range its field of ``cls`` declares
    (`bounded`), said in a few words with the key as the file names it (``names``: field -> key); None when every
    one is in range. NaN, booleans and non-numbers are out of range."""
    for f in dataclasses.fields(cls):
        bounds = f.metadata.get("range")
        if bounds is None or f.name not in values:
            continue
        value = values[f.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not bounds[0] <= value <= bounds[1]:
            key = (names or {}).get(f.name, f.name)
            return f"{key!r} is {value!r}, outside {bounds[0]:g}..{bounds[1]:g}"
    return None


def check_ranges(obj: Any) -> None:
    """Raise ValueError naming the first field of the dataclass ``obj`` outside its declared range (call it from
    ``__post_init__``; `config_from_dict` turns it into a `ConfigError` naming the file)."""
    problem = range_problem(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if problem:
        raise ValueError(problem)


def config_from_dict(cls: type[T], data: object, what: str = "", nested: Mapping[str, type] | None = None) -> T:
    """Build the dataclass ``cls`` from ``data``; ``what`` names the source in errors (e.g. a file path).

    ``nested`` maps field names to dataclasses built the same way from sub-dicts.
    """
    source = f" in {what}" if what else ""
    name = cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{name}{source} must be a JSON object, not {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {name} key(s){source}: {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(fields)})")
    values = dict(data)
    for key, sub in (nested or {}).items():
        if key in values and not dataclasses.is_dataclass(values[key]):
            values[key] = config_from_dict(sub, values[key], f"{what}:{key}" if what else key)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved here: leave the checking to the class
        hints = {}
    for key, value in list(values.items()):
        hint = hints.get(key)
        if hint is None or key in (nested or {}):
            continue
        ok, converted = _conform(value, hint)
        if not ok:
            raise ConfigError(f"bad {name}{source}: {key!r} is {_describe(value)}, expected {_hint_name(hint)}")
        values[key] = converted
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad {name}{source}: {exc}") from None


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether ``value`` fits the annotation ``hint``, the value with JSON lists made tuples where a tuple is
    expected). Annotations other than plain scalars, tuples, optionals and unions are accepted as they are."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _conform(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if hint is str:
        return isinstance(value, str), value
    if hint is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(hint)
        if not args:
            return True, tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_conform(v, args[0]) for v in value]
        elif len(args) == len(value):
            items = [_conform(v, a) for v, a in zip(value, args)]
        else:
            return False, value
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    return True, value


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text[:40]}…" if len(text) > 40 else text


def _hint_name(hint: Any) -> str:
    name = getattr(hint, "__name__", None)
    return name if typing.get_origin(hint) is None and isinstance(name, str) else str(hint).replace("typing.", "")
