"""What the thin CLIs share: clear one-line errors (naming the flag or path) instead of
tracebacks for bad input, and comma-separated integer tuples."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def run(prog: str, body: Callable[[], object]) -> int:
    """Run a CLI body; user errors become `prog: error: ...` and exit status 2."""
    try:
        body()
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
