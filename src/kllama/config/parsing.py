"""Turning raw YAML / command-line values into typed field values, with messages a user can act on."""
from __future__ import annotations

import types
import typing
from typing import Any

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~", ""}


class CoercionError(ValueError):
    """A value that does not fit its field's type; the message says what was expected."""


def _is_optional(tp: Any) -> tuple[bool, list[Any]]:
    """Split `X | None` into (True, [X]); other unions return their members."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = list(typing.get_args(tp))
        has_none = type(None) in args
        return has_none, [a for a in args if a is not type(None)]
    return False, [tp]


def type_name(tp: Any) -> str:
    """A short human name for a field type (`float`, `list of str`, `int or null`)."""
    optional, members = _is_optional(tp)
    names = []
    for m in members:
        if typing.get_origin(m) is dict:
            names.append("mapping")
        elif typing.get_origin(m) is list:
            names.append("list of " + type_name(typing.get_args(m)[0]) + " (or a comma-separated string)")
        else:
            names.append(getattr(m, "__name__", str(m)))
    if optional:
        names.append("null")
    return " or ".join(names)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise CoercionError


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise CoercionError
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            number = float(text)  # "1e3" is a fine step count
            if number.is_integer():
                return int(number)
    raise CoercionError


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise CoercionError
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            # YAML 1.1 reads "1e-5" (no dot) as a string; users mean a number.
            return float(value.strip())
        except ValueError:
            pass
    raise CoercionError


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise CoercionError


def _to_str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return [_to_str(v).strip() for v in value]
    raise CoercionError


def _to_mapping(value: Any) -> dict[str, Any]:
    if isinstance(value, str) and value.strip().startswith("{"):  # `key={a: 1}` on the command line
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise CoercionError from None
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    raise CoercionError


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def coerce(value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a `key=value` override) to field type `tp`; raise CoercionError if it can't."""
    optional, members = _is_optional(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in _NULL and optional):
        if optional:
            return None
        raise CoercionError
    for member in members:
        try:
            if typing.get_origin(member) is dict:
                return _to_mapping(value)
            if typing.get_origin(member) is list:
                return _to_str_list(value)
            return _SCALARS[member](value)
        except (CoercionError, ValueError):
            continue
    raise CoercionError


def parse_override(text: str) -> tuple[str, Any]:
    """Split a command-line `key=value` override; the value stays a string and is typed by the field later."""
    if "=" not in text:
        raise CoercionError(f"override {text!r} is not of the form key=value (e.g. learning_rate=1e-5)")
    key, _, value = text.partition("=")
    key = key.strip().lstrip("-")
    if not key:
        raise CoercionError(f"override {text!r} has an empty key")
    return key, value
