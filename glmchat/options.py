"""Command-line value parsers shared by the `glmchat` command and the server's options (torch-free)."""

from __future__ import annotations

import argparse
import math


def number(kind=float, low=None, high=None, low_open: bool = False, what: str = ""):
    """An argparse type: `kind` (int or float) within [low, high] ((low, high] with low_open), finite.
    what: the unit named in the error ("seconds")."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}{' of ' + what if what else ''}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else '∞'}{']' if high is not None else ')'}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value

    return parse
