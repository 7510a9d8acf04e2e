"""Validation of config values read from files, driven by the config dataclass's field types.

A config read from a file (ours, SAELens's, Gemma Scope's) is checked value by value before any
SAE is built, so a hostile or careless file fails with an error naming the field, not deep
inside torch (a bool taken for 1, a non-integer seed, a width of 1e9).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from ..safeio import short

__all__ = ["SIZE_FIELDS", "MAX_SIZE", "check_field_values"]

# Integer fields that are sizes: positive, and small enough that shapes built from them cannot
# overflow (2**31 is far above any real width).
SIZE_FIELDS = frozenset({"d_in", "d_sae", "d_out", "k", "k_aux"})
MAX_SIZE = 2**31


def check_field_values(cls: type, values: dict[str, Any]) -> None:
    """Check each value in ``values`` against the type of ``cls``'s field of that name (bools are
    not integers, floats must be finite, sizes positive, Literals one of their values), so a
    config read from a file fails with a ValueError naming the field, not deep inside torch.
    Unknown names and missing fields are left to ``from_dict``."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if item.name in values:
            problem = _type_problem(values[item.name], hints[item.name], item.name)
            if problem:
                raise ValueError(f"{item.name} {problem}")


def _type_problem(value: Any, hint: Any, name: str) -> str | None:
    origin = typing.get_origin(hint)
    if origin is Literal:
        options = typing.get_args(hint)
        return None if isinstance(value, str) and value in options else f"must be one of {list(options)}, got {short(value)}"
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        problems = [_type_problem(value, option, name) for option in options if option is not type(None)]
        return None if None in problems else problems[0]
    if hint is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {short(value)}"
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {short(value)}"
        if name in SIZE_FIELDS and not 0 < value <= MAX_SIZE:
            return f"must be a positive integer, got {short(value)} (at most {MAX_SIZE})"
        return None if -(2**63) <= value < 2**63 else f"is out of range, got {short(value)}"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {short(value)}"
        try:
            return None if math.isfinite(float(value)) else f"must be finite, got {short(value)}"
        except OverflowError:  # an integer beyond float range
            return f"must be finite, got {short(value)}"
    if hint is str:
        return None if isinstance(value, str) else f"must be a string, got {short(value)}"
    return None  # other annotations are checked by the config itself
