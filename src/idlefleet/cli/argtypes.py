"""Argument types shared by the ``idlefleet`` subcommands: a bad value exits 2 with a reason.

Each takes the flag's text and returns the value or raises `argparse.ArgumentTypeError` with a
sentence argparse prints after the flag's name (``argument --vehicles: must be at least 1, got
-5``). Whole numbers accept ``1e6`` and ``1_000_000``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["fraction", "non_negative", "number", "whole"]


def whole(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)  # takes 1_000_000
        except ValueError:
            try:
                as_float = float(text)  # takes 1e6
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
            if not as_float.is_integer():
                raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
            value = int(as_float)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def fraction(text: str) -> float:
    value = number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1, got {text}")
    return value


def share(text: str) -> float:
    """A share that cannot be nothing: 0 < x <= 1."""
    value = number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, got {text}")
    return value


def non_negative(text: str) -> float:
    value = number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value
