"""Options declared once: a dataclass per stage, its fields turned into CLI flags and checked YAML keys.

Each option is a dataclass field made with :func:`option`: its default, help text, and (where it has one)
its range. :func:`add_options` adds the flags of a dataclass to an argparse parser (``--seq-len`` for
``seq_len``; every flag defaults to "not given", so a YAML file or preset underneath is not overridden);
:func:`given_options` reads back what the user gave; :func:`coerce` checks and converts the values of a
YAML file against the field types; :func:`check_ranges` enforces the declared ranges. The help text,
the default and the range of an option are therefore written in one place, as mergekit does with
``add_merge_options``.

A stage whose plug-ins declare options of their own (criteria, evaluation tasks, healing methods) gets
one flat dataclass from :func:`compose`: the stage's shared options, then each plug-in's, made when asked
so that plug-ins registered after import count. Flags and YAML keys are one namespace, so a name two
plug-ins declare separately is refused; a declaration several plug-ins share (LoRA's options) is one.
Sweep semantics are option metadata too (``path``, ``point``, ``resumable``), listed by :func:`fields_with`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from .errors import DepthpruneError

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, flag: str | None = None, choices: Iterable[str] | Callable | None = None,
           metavar: str | None = None, minimum: float | None = None, maximum: float | None = None,
           below: float | None = None, above: float | None = None, parse: Callable[[str], Any] | None = None, cli: bool = True,
           default_factory: Callable[[], Any] | None = None, path: bool = False, point: bool = False,
           resumable: bool = False, nonempty: bool = False, describe: str | None = None) -> Any:
    """A dataclass field with what the CLI and the checks need.

    ``minimum``/``maximum`` are inclusive bounds, ``below``/``above`` exclusive ones (floats must also be
    finite). ``choices`` is a list, or a function returning one (a registry's ``names``, read late so
    plug-ins registered after import count); ``{choices}`` in the help text is replaced by them when the
    flags are made. ``parse`` turns one CLI or YAML string into the value (e.g. 'start:stop:step'
    fractions), or returns ``NotImplemented`` to leave it to the usual conversion. ``cli=False`` keeps an
    option out of the flags (YAML/API only). ``nonempty``: an empty string, an empty list or a blank item
    is refused; ``describe`` says in messages what the value must be ('a list of module names') instead
    of its type's words.

    For the sweep: ``path`` names a local file or folder (or a hub id), compared and recorded resolved;
    ``point`` chooses only which points run; ``resumable`` may change between a run and its resumption
    without changing any result (:func:`fields_with` lists each kind).
    """
    metadata = dict(help=help, flag=flag, choices=choices, metavar=metavar, minimum=minimum, maximum=maximum,
                    below=below, above=above, parse=parse, cli=cli, path=path, point=point, resumable=resumable,
                    nonempty=nonempty, describe=describe)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def fields_with(cls, *flags: str) -> tuple[str, ...]:
    """The names of the fields of dataclass ``cls`` (or of an instance) declared with any of ``flags``
    (``fields_with(SweepConfig, "resumable", "point")``)."""
    return tuple(f.name for f in dataclasses.fields(cls) if any(f.metadata.get(flag) for flag in flags))


class Checked:
    """Options that check themselves when made (from the API too): types, then ranges, one-line errors naming
    the flag."""

    def __post_init__(self) -> None:
        check_types(self)
        check_ranges(self)


def copied_field(f: dataclasses.Field, default: Any = _MISSING) -> dataclasses.Field:
    """A new field with the default (or ``default``) and the metadata of ``f``, for another dataclass."""
    if default is not _MISSING:
        return dataclasses.field(default=default, metadata=f.metadata)
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)  # type: ignore[misc]
    return dataclasses.field(default=f.default, metadata=f.metadata)


def compose(name: str, parts: Iterable[type], *, module: str, doc: str, bases: tuple[type, ...] = ()) -> type:
    """One flat dataclass of the fields of ``parts`` in order (a stage's shared options, then its plug-ins').

    A name declared by two parts is refused (flags and YAML keys are one namespace), unless both hold the
    same declaration (a base class of options several plug-ins share). The class is made once per
    ``parts``: asked again with the same plug-ins, it is the same class (``isinstance`` and pickling hold).
    """
    return _compose(name, tuple(parts), module, doc, bases)


@functools.cache
def _compose(name: str, parts: tuple[type, ...], module: str, doc: str, bases: tuple[type, ...]) -> type:
    declared: dict[str, tuple[dataclasses.Field, type]] = {}
    fields = []
    for part in parts:
        hints = _hints(part)
        for f in dataclasses.fields(part):
            if f.name in declared:
                if declared[f.name][0] is f:
                    continue
                raise ValueError(f"option '{f.name}' is declared by both {declared[f.name][1].__name__} and "
                                 f"{part.__name__}: options share one namespace of flags and keys, rename one")
            declared[f.name] = (f, part)
            fields.append((f.name, hints[f.name], copied_field(f)))
    cls = dataclasses.make_dataclass(name, fields, bases=bases, namespace={"__module__": module})
    cls.__doc__ = doc
    return cls


def _unwrap(tp) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"an option is one type or None, not {tp!r}")
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


_WORDS = {int: ("a whole number", "whole numbers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "true/false values"), dict: ("a mapping", "mappings")}


def _describe(tp, plural: bool = False) -> str:
    """'a whole number', 'a list of numbers', ... for messages."""
    base, _ = _unwrap(tp)
    if typing.get_origin(base) is list:
        return _describe(typing.get_args(base)[0], plural=True)
    single, many = _WORDS.get(base, (str(base), str(base)))
    return f"a list of {many}" if plural else single


def _choices(meta) -> list[str] | None:
    choices = meta.get("choices")
    return list(choices()) if callable(choices) else (list(choices) if choices is not None else None)


def _scalar(value, tp, name: str, where: str, plural: bool = False):
    """``value`` as a ``tp`` (int, float, str, bool), from YAML or a CLI string; a one-line error otherwise.

    ``plural``: the value is an item of a list, and the message says so ('must be a list of numbers').
    """
    def wrong():
        return DepthpruneError(f"{where} '{name}' must be {_describe(tp, plural)}, got {value!r}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise wrong()
    if tp is int:
        if isinstance(value, bool):
            raise wrong()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise wrong() from None
        raise wrong()
    if tp is float:
        if isinstance(value, bool):
            raise wrong()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise wrong() from None
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a dataset config written as a bare number in YAML
        raise wrong()
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise wrong()
    if tp is Any:
        return value
    raise TypeError(f"unsupported option type {tp!r} for '{name}'")


def convert(value, tp, name: str, where: str = "setting", meta: dict | None = None):
    """Check and convert one value of a field of type ``tp`` (lists may be given as comma-separated text)."""
    meta = meta or {}
    base, optional = _unwrap(tp)
    if value is None:
        if optional:
            return None
        raise DepthpruneError(f"{where} '{name}' must be {_describe(tp)}, not empty")
    parse = meta.get("parse")
    if parse is not None and isinstance(value, str):
        parsed = parse(value)  # NotImplemented: not its syntax, convert as usual (e.g. '0,0.1' for fractions)
        if parsed is not NotImplemented:
            return parsed
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [_scalar(v, item, name, where, plural=True) for v in value]
    return _scalar(value, base, name, where)


def coerce(cls, values: dict, where: str = "setting") -> dict:
    """Check the keys and value types of ``values`` against the fields of dataclass ``cls``; returns converted values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise DepthpruneError(f"unknown {where}(s) {', '.join(unknown)}: valid keys are {', '.join(sorted(fields))}")
    hints = _hints(cls)
    return {k: convert(v, hints[k], k, where, dict(fields[k].metadata)) for k, v in values.items()}


def _is_a(value, tp) -> bool:
    """Whether ``value`` already has type ``tp`` (no conversion: the Python API gets no strings for numbers)."""
    base, optional = _unwrap(tp)
    if value is None:
        return optional
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        return isinstance(value, list) and all(_is_a(v, item) for v in value)
    if base is Any:
        return True
    if base is bool:
        return isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


def check_types(obj, where: str | None = None) -> None:
    """Refuse a field of the dataclass instance ``obj`` whose value is not of its declared type (no conversion).

    Messages name the flag (``--seq-len must be a whole number, got '16'``), or with ``where`` the key.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _is_a(value, hints[f.name]):
            label = flag_name(f) if where is None else f"{where} '{f.name}'"
            raise DepthpruneError(f"{label} must be {f.metadata.get('describe') or _describe(hints[f.name])}, "
                                  f"got {value!r}")


def check_ranges(obj, where: str | None = None) -> None:
    """Enforce the declared choices and ranges of every field of the dataclass instance ``obj``.

    Messages name the flag (``--seq-len``), or with ``where`` the key (``sweep setting 'seq_len'``).
    """
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        label = flag_name(f) if where is None else f"{where} '{f.name}'"
        if meta.get("nonempty"):
            _check_nonempty(value, meta, label)
        for v in value if isinstance(value, list) else [value]:
            _check_one(v, meta, label)


def _check_nonempty(value, meta, label: str) -> None:
    if isinstance(value, list) and (not value or not all(isinstance(v, str) and v.strip() for v in value)):
        raise DepthpruneError(f"{label} must be {meta.get('describe') or 'a non-empty list'}, got {value!r}")
    if value == "":
        raise DepthpruneError(f"{label} must be a non-empty name, got ''")


def _check_one(value, meta, label: str) -> None:
    if value is None or isinstance(value, bool):
        return
    choices = _choices(meta)
    if choices is not None and isinstance(value, str) and value not in choices:
        raise DepthpruneError(f"{label}: unknown value '{value}', choose one of {', '.join(choices)}")
    if not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise DepthpruneError(f"{label} must be a finite number, got {value}")
    low, high, below = meta.get("minimum"), meta.get("maximum"), meta.get("below")
    if low is not None and value < low:
        raise DepthpruneError(f"{label} must be at least {low:g}, got {value:g}")
    if high is not None and value > high:
        raise DepthpruneError(f"{label} must be at most {high:g}, got {value:g}")
    if below is not None and value >= below:
        raise DepthpruneError(f"{label} must be below {below:g}, got {value:g}")
    above = meta.get("above")
    if above is not None and value <= above:
        raise DepthpruneError(f"{label} must be above {above:g}, got {value:g}")


def flag_name(f: dataclasses.Field, prefix: str = "") -> str:
    return f.metadata.get("flag") or f"--{prefix}{f.name.replace('_', '-')}"


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not _MISSING:
        default = f.default
    elif f.default_factory is not _MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    else:
        return ""
    if default is None or default == [] or default == {}:
        return ""
    if isinstance(default, list):
        default = ",".join(map(str, default))
    return f" (default: {default})"


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, *, prefix: str = "",
                exclude: Iterable[str] = (), required: Iterable[str] = (), title: str | None = None) -> None:
    """Add a flag for every CLI field of dataclass ``cls`` (``prefix`` + name, dashes for underscores).

    Flags default to None ("not given"); a boolean gets ``--name``/``--no-name``.
    """
    exclude, required = set(exclude), set(required)
    target = parser.add_argument_group(title) if title else parser
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True) or "help" not in f.metadata:
            continue
        meta, tp = f.metadata, hints[f.name]
        choices = _choices(meta)
        text = meta["help"].replace("{choices}", ", ".join(choices or ())) + _default_text(f)
        kwargs: dict[str, Any] = dict(dest=prefix.replace("-", "_") + f.name, default=None, help=text.replace("%", "%%"))
        base, _ = _unwrap(tp)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _cli_type(tp, f.name, dict(meta))
            kwargs["metavar"] = meta.get("metavar") or ("LIST" if typing.get_origin(base) is list else None)
            if choices is not None and typing.get_origin(base) is not list:
                kwargs["choices"] = choices
        if f.name in required:
            kwargs["required"] = True
        target.add_argument(flag_name(f, prefix), **kwargs)


def _cli_type(tp, name: str, meta: dict) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            return convert(text, tp, name, "option", meta)
        except DepthpruneError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = _describe(tp)  # argparse names the type in its message
    return parse


def given_options(args: argparse.Namespace, cls, prefix: str = "") -> dict:
    """The fields of ``cls`` the user gave on the command line (flags left out are not in the dict)."""
    found = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, prefix.replace("-", "_") + f.name, None)
        if value is not None:
            found[f.name] = value
    return found


def build(cls, values: dict, where: str = "setting"):
    """``cls(**values)`` after type checks and range checks, all as one-line errors."""
    obj = cls(**coerce(cls, values, where))
    check_ranges(obj, where)
    return obj


def plugin_options(cls, values: dict, kind: str, kinds: str) -> Any:
    """``cls(**values)``, the options of a stage's plug-ins (the rest at their defaults), checked when made; a
    name that no registered plug-in (a ``kind``; several: ``kinds``) declares is a one-line error naming those
    that are."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise DepthpruneError(f"unknown {kind} option(s) {', '.join(unknown)}: the registered {kinds} declare "
                              + (", ".join(known) or "none"))
    return cls(**values)
