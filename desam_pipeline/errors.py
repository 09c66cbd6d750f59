"""One exception type for problems a user can fix, and the CLI wrapper that prints it."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class DesamError(Exception):
    """A user-facing problem: printed as one line by the command line tools, exit code 1."""


def cli_entry(func: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a console-script main so a DesamError prints one line and exits non-zero."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        try:
            code = func(*args, **kwargs)
        except DesamError as exc:
            print(f"desam: error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("desam: interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper
