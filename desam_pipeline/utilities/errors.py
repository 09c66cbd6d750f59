"""One exception type for problems a user can fix, and the CLI wrapper that prints it."""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
from typing import Callable, Iterator


class DesamError(Exception):
    """A user-facing problem: printed as one line by the command line tools, exit code 1."""


# File-system failures a user fixes outside desam (free space, permissions): one line, not a traceback.
STORAGE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Give an OSError raised without a file name (a write() on a full disk) the `path` being written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
        raise


def storage_message(exc: OSError) -> str | None:
    """One line naming the file and the cause of a storage failure; None for other OSErrors."""
    cause = STORAGE_ERRORS.get(exc.errno)
    if cause is None:
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{cause} (fix it and re-run: finished work is kept)"


def _say(line: str) -> None:
    """One write per line, so the lines of ranks sharing a stderr (torchrun) never run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def cli_entry(func: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a console-script main so a DesamError or a full/read-only disk prints one line and exits non-zero."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        try:
            code = func(*args, **kwargs)
        except DesamError as exc:
            _say(f"desam: error: {exc}")
            sys.exit(1)
        except OSError as exc:
            message = storage_message(exc)
            if message is None:
                raise
            _say(f"desam: error: {message}")
            sys.exit(1)
        except KeyboardInterrupt:
            _say("desam: interrupted")
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper
