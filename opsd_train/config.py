"""Options as dataclass fields: one field with a doc is one CLI flag, checked in one place.

A configuration class is a dataclass whose fields are declared with :func:`option`. The
field's type annotation, its ``doc``, its range and choices are all the code needs:

* :func:`check_fields` (called from the class's ``__post_init__``) checks every value
  strictly: no truthy strings for booleans, no floats where integers are expected, no
  strings where numbers are expected, finite numbers only, ranges and choices; the string
  ``"none"`` means ``None`` for optional fields (TOML has no null).
* :func:`from_mapping` builds an instance from a dict (a config file), rejecting unknown
  keys with the closest valid key as a suggestion.
* :func:`add_arguments` turns the fields into ``argparse`` flags (``--batch-size`` for
  ``batch_size``; ``--flag/--no-flag`` for booleans), with the doc as help text.
* ``trl`` metadata names the TRL/transformers config field the value sets (the README's
  flag table is generated from it: :func:`opsd_train.recipes.trl_field_table`).

Adding an option is one field::

    new_flag: int = option(3, "what it does", low=1, group="rollouts")

>>> from dataclasses import dataclass
>>> @dataclass
... class Demo:
...     steps: int = option(2, "optimizer steps", low=0)
...     clip: float | None = option(None, "clip tau or none", low=0, low_open=True)
...     def __post_init__(self):
...         check_fields(self)
>>> from_mapping(Demo, {"steps": 3, "clip": "none"})
Demo(steps=3, clip=None)
>>> from_mapping(Demo, {"stpes": 3})
Traceback (most recent call last):
...
opsd_train.config.ConfigError: unknown key 'stpes' (did you mean 'steps'?)
>>> Demo(steps=2.7)
Traceback (most recent call last):
...
opsd_train.config.ConfigError: steps: expected an integer, got 2.7 (float)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping

__all__ = [
    "ConfigError",
    "option",
    "check_fields",
    "check_keys",
    "from_mapping",
    "to_dict",
    "add_arguments",
    "flag_name",
    "option_fields",
]

_NONE_WORDS = ("none", "null", "off")


class ConfigError(ValueError):
    """A configuration value or key is invalid; ``key`` names it (``None`` if several)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def option(
    default=dataclasses.MISSING,
    doc: str = "",
    *,
    default_factory=dataclasses.MISSING,
    choices: Iterable | None = None,
    low=None,
    high=None,
    low_open: bool = False,
    high_open: bool = False,
    cli: bool = True,
    group: str = "other",
    metavar: str | None = None,
    trl: str | None = None,
):
    """A dataclass field with the metadata :func:`check_fields` and :func:`add_arguments`
    read. ``low``/``high`` bound numbers (inclusive unless ``low_open``/``high_open``);
    ``choices`` lists the allowed values; ``cli=False`` keeps the field off the command
    line (set by code); ``group`` is the ``--help`` section; ``trl`` names the TRL or
    transformers config field(s) the value sets (the README's flag table)."""
    if cli and not doc:
        raise ValueError("an option on the command line needs a doc")
    meta = dict(
        doc=doc,
        choices=tuple(choices) if choices is not None else None,
        low=low,
        high=high,
        low_open=low_open,
        high_open=high_open,
        cli=cli,
        group=group,
        metavar=metavar,
        trl=trl,
    )
    kw = {"metadata": meta}
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    else:
        kw["default"] = default
    return dataclasses.field(**kw)


def option_fields(cls) -> list[tuple[dataclasses.Field, object]]:
    """``(field, resolved type)`` for every field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _split_optional(tp):
    """``(inner type, optional?)`` for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_number(name: str, value, meta: dict, optional: bool = False):
    alt = " or none" if optional else ""
    if not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number{alt}, got {value!r}", name)
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value <= low if meta.get("low_open") else value < low):
        op = ">" if meta.get("low_open") else ">="
        raise ConfigError(f"{name}: must be {op} {low}{alt}, got {value!r}", name)
    if high is not None and (value >= high if meta.get("high_open") else value > high):
        op = "<" if meta.get("high_open") else "<="
        raise ConfigError(f"{name}: must be {op} {high}{alt}, got {value!r}", name)


def check_value(name: str, value, tp, meta: dict | None = None):
    """Check one value against its type and metadata; returns it normalised (ints widened
    to float for float fields, lists to tuples, ``"none"`` to ``None``)."""
    meta = meta or {}
    inner, optional = _split_optional(tp)
    if value is None or (
        optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS
    ):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required (got None)", name)
    origin = typing.get_origin(inner)
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {_describe(value)}", name)
    elif inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {_describe(value)}", name)
        _check_number(name, value, meta, optional)
    elif inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {_describe(value)}", name)
        value = float(value)
        _check_number(name, value, meta, optional)
    elif inner is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {_describe(value)}", name)
    elif origin is tuple:
        args = typing.get_args(inner)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {_describe(value)}", name)
        if len(args) == 2 and args[1] is Ellipsis:
            value = tuple(check_value(f"{name}[{i}]", v, args[0], {}) for i, v in enumerate(value))
        else:
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} values, got {len(value)}", name)
            value = tuple(
                check_value(f"{name}[{i}]", v, a, meta)
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
    elif inner is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a table/mapping, got {_describe(value)}", name)
        value = dict(value)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}: must be one of {list(choices)}, got {value!r}", name)
    return value


def check_fields(obj) -> None:
    """Check (and normalise in place) every field of dataclass instance ``obj``."""
    for f, tp in option_fields(type(obj)):
        value = check_value(f.name, getattr(obj, f.name), tp, dict(f.metadata))
        object.__setattr__(obj, f.name, value)


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(
    keys: Iterable[str], valid: Iterable[str], where: str = "", noun: str = "key"
) -> None:
    """Raise :class:`ConfigError` for the first key not in ``valid``, suggesting the closest
    valid key (``difflib``)."""
    valid = list(valid)
    for k in keys:
        if k not in valid:
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}unknown {noun} {k!r}{_suggest(k, valid)}", k)


def from_mapping(cls, data: Mapping, where: str = "", noun: str = "key"):
    """``cls(**data)`` after rejecting unknown keys (with a suggestion)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    check_keys(data, [f.name for f in dataclasses.fields(cls)], where, noun)
    return cls(**data)


def to_dict(obj) -> dict:
    """The fields of ``obj`` as a JSON-serialisable dict (tuples become lists)."""
    items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in items}


# ---------------------------------------------------------------------------------------
# argparse
# ---------------------------------------------------------------------------------------


def flag_name(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _cli_type(tp, name: str):
    """An argparse ``type=`` that parses the text strictly (range checks come later)."""
    inner, optional = _split_optional(tp)

    def parse(text: str):  # tuples and strings: split and checked by check_value
        if optional and text.strip().lower() in _NONE_WORDS:
            return None
        return inner(text) if inner in (int, float) else text

    parse.__name__ = {int: "integer", float: "number"}.get(inner, "value")
    return parse


def _help(f: dataclasses.Field, tp) -> str:
    doc = f.metadata.get("doc", "")
    d = f.default
    if d is dataclasses.MISSING or d is None or d == ():
        return doc  # the doc says what absence means
    shown = ("on" if d else "off") if isinstance(d, bool) else d
    return f"{doc} (default {','.join(map(str, d)) if isinstance(d, tuple) else shown})"


def add_arguments(parser: argparse.ArgumentParser, cls, groups: dict | None = None) -> None:
    """Add one flag per CLI field of dataclass ``cls`` to ``parser``.

    Every flag defaults to ``argparse.SUPPRESS``-like absence (the parser should be built
    with ``argument_default=argparse.SUPPRESS``) so that only flags given on the command
    line appear in the namespace. ``groups`` caches argument groups by title.
    """
    groups = {} if groups is None else groups
    for f, tp in option_fields(cls):
        meta = f.metadata
        if not meta.get("cli", False):
            continue
        title = meta.get("group", "other")
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        g = groups[title]
        inner, _ = _split_optional(tp)
        kw = dict(dest=f.name, help=_help(f, tp))
        if inner is bool:
            g.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        if meta.get("choices") is not None and inner is tp:  # optional ones: check_value
            kw["choices"] = list(meta["choices"])
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        g.add_argument(flag_name(f.name), type=_cli_type(tp, f.name), **kw)
