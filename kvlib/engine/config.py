"""Params as plain data: dataclasses built from YAML/dicts with strict validation.

Every params mapping in kvlib (CLI flags, `params/<profile>/*.yaml`, notebook parameters) goes through
`from_mapping`, so an unknown key, a wrong type or an impossible value fails *before* any compute, with
a message that names the field (`generation.num_dicts: must be >= 1, got -3`).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ParamError(ValueError):
    """A params value is malformed. The message starts with the dotted field name."""


class InputError(ParamError):
    """A file a command reads is malformed, or a file it would write is in the way: caught before any compute.
    The message is one line that starts with the file (`path:line:` where a line is known) and says the fix."""


def fail(field: str, message: str) -> typing.NoReturn:
    raise ParamError(f"{field}: {message}")


def _check_type(value: Any, tp: Any, field: str) -> Any:
    """Check (and lightly coerce: list -> tuple, int -> float) `value` against annotation `tp`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # `X | None` with a value: X's own message names the field that is wrong
            return _check_type(value, options[0], field)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, field)
            except ParamError as exc:
                errors.append(str(exc))
        fail(field, f"expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            fail(field, f"must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            fail(field, f"expected a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{field}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            fail(field, f"expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_check_type(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            fail(field, f"expected a list, got {value!r}")
        return [_check_type(v, arg, f"{field}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        karg, varg = typing.get_args(tp)
        if not isinstance(value, Mapping):
            fail(field, f"expected a mapping, got {value!r}")
        return {_check_type(k, karg, field): _check_type(v, varg, f"{field}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            fail(field, f"expected a mapping, got {value!r}")
        return from_mapping(tp, value, field)
    if tp is bool:
        if not isinstance(value, bool):
            fail(field, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(field, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(field, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(field, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            fail(field, f"expected a path, got {value!r}")
        return Path(value)
    raise TypeError(f"kvlib.engine.config cannot check annotation {tp!r} of {field}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "", check: bool = True) -> T:
    """Build dataclass `cls` from `data`; unknown keys, bad types and failed `validate()` raise ParamError.
    `check=False` skips `validate()` (for params validated once already, e.g. by `kvlib reproduce`)."""
    if not isinstance(data, Mapping):
        fail(where or cls.__name__, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fail(f"{prefix}{key}", f"unknown parameter{hint}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_type(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            fail(f"{prefix}{name}", "required parameter is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None and check:
        try:
            validate()
        except ParamError as exc:
            raise ParamError(f"{prefix}{exc}") from None
    return obj


def to_mapping(obj: Any) -> Any:
    """Plain-data (YAML/JSON-ready) view of a params dataclass: tuples become lists, paths strings."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last one
    silently, so `seed: 0` ... `seed: 1` would run with seed 1 and nobody would know)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first_line[key]}): keep one of them",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def yaml_error_line(path: str | Path, exc: yaml.YAMLError) -> str:
    """A YAML error as one line, `path:line: what` (PyYAML's own message spans several lines with a caret)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{context}: {problem}" if context and "duplicate key" not in problem else problem
    return f"{where}: invalid YAML: {' '.join(text.split())}"


def load_yaml(path: str | Path) -> dict:
    """A YAML params file as a mapping (empty file: {}). A syntax error or a key given twice raises InputError
    with one line naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: params file not found")
    with path.open(encoding="utf-8") as fh:
        try:
            data = yaml.load(fh, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise InputError(yaml_error_line(path, exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def params_section(data: Mapping[str, Any], section: str) -> tuple[dict, str]:
    """One command's keys of a params mapping: those under `section:` when the file has that mapping (one
    YAML may hold several commands' sections), else the top level. Also returns the dotted prefix that
    names where they came from ("" for the top level)."""
    inner = data.get(section)
    if isinstance(inner, Mapping):
        return dict(inner), section
    return dict(data), ""


def check_range(field: str, value: tuple[int, int], minimum: int | None = None) -> None:
    lo, hi = value
    if lo > hi:
        fail(field, f"range must be [low, high] with low <= high, got [{lo}, {hi}]")
    if minimum is not None and lo < minimum:
        fail(field, f"must be >= {minimum}, got [{lo}, {hi}]")


def check_positive(field: str, value: int | float, minimum: int | float = 1) -> None:
    if value < minimum:
        fail(field, f"must be >= {minimum}, got {value}")


def check_fraction(field: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        fail(field, f"must be a probability in [0, 1], got {value}")
