"""argparse types of the flags, with a one-line message naming the expected form. Shared by the
run config (which declares the train flags) and the commands."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None


def comma_choices(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: one or more of `choices`, comma-separated ("val,test")."""
    want = f"comma-separated names of {', '.join(choices)}"

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v for v in text.replace(" ", "").split(",") if v)
        if not names or any(v not in choices for v in names):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return names

    parse.__name__ = want
    return parse


def number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a finite int or float within [low, high] (open where said). Its refusal
    is one line that argparse prefixes with the flag: "argument --warmup: expected an integer
    >= 0, got -1"; exit status 2."""
    noun = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        want = f"{noun} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        want = f"{noun} {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        want = f"{noun} {'<' if high_open else '<='} {high:g}"
    else:
        want = f"a finite {noun[2:]}" if kind is float else noun

    def parse(text: str) -> int | float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if (not math.isfinite(v) or (low is not None and (v < low or (low_open and v == low)))
                or (high is not None and (v > high or (high_open and v == high)))):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text}")
        return v

    parse.__name__ = want  # argparse's fallback names the type by it
    return parse


positive_int = number(int, 0, low_open=True)
non_negative_int = number(int, 0)
finite_float = number(float)
positive_float = number(float, 0, low_open=True)
non_negative_float = number(float, 0)
probability = number(float, 0, 1)               # a decay, a share of labels
below_one = number(float, 0, 1, high_open=True)  # Adam's betas, dropout
above_one = number(float, 1, low_open=True)     # the EMA's warm-up constant
seed_int = number(int, 0, 2**32 - 1)            # every generator takes it (numpy's legacy ones the narrowest)
