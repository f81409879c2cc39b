"""argparse types that refuse bad values with argparse's own error (the option named, exit 2), shared by
`ascend.serve` and the benchmark scripts, so that `--batch 0` or `--contexts abc` is a usage error, not a
traceback from deep inside a run."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable


def arg_type(kind: Callable, ok: Callable, expected: str) -> Callable:
    """An argparse type: `kind(text)` for which `ok` holds, else argparse's error naming the option and `expected`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text}: expected {expected}")
        return value
    return parse


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


positive = arg_type(int, lambda v: v > 0, "a positive integer")
non_negative = arg_type(int, lambda v: v >= 0, "an integer >= 0")
positive_list = arg_type(_ints, lambda vs: all(v > 0 for v in vs), "comma-separated positive integers")
positive_seconds = arg_type(float, lambda v: 0 < v < math.inf, "a positive number of seconds")
new_file = arg_type(Path, lambda p: p.parent.is_dir() and not p.is_dir(), "a file path in an existing directory")
