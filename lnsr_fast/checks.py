"""Argument checks shared by every layer of the package (errors name the argument, its expected and its
actual value): one predicate for "an int, not a bool", one for numbers, one for choices."""
from __future__ import annotations

import math


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int) -> int:
    """`value` as an int >= minimum; TypeError/ValueError naming `name` otherwise."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(name: str, value, minimum: float = 0.0, maximum: float = math.inf, open_minimum: bool = False) -> float:
    """`value` as a finite float in [minimum, maximum] (or (minimum, maximum]); errors name `name`."""
    if not is_real(value):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    low_ok = value > minimum if open_minimum else value >= minimum
    if not (math.isfinite(value) and low_ok and value <= maximum):
        bound = f"{'(' if open_minimum else '['}{minimum}, {maximum}]"
        raise ValueError(f"{name} must be finite and in {bound}, got {value}")
    return float(value)


def check_choice(name: str, value, allowed: tuple) -> str:
    """`value` if it is one of `allowed`; ValueError naming `name` otherwise."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value
