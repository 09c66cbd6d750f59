"""One exception type for problems a user can fix, and the CLI wrapper that prints it."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class DesamError(Exception):
    """A user-facing problem: printed as one line by the command line tools, exit code 1."""


def _say(line: str) -> None:
    """One write per line, so the lines of ranks sharing a stderr (torchrun) never run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def cli_entry(func: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a console-script main so a DesamError prints one line and exits non-zero."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        try:
            code = func(*args, **kwargs)
        except DesamError as exc:
            _say(f"desam: error: {exc}")
            sys.exit(1)
        except KeyboardInterrupt:
            _say("desam: interrupted")
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper
