"""A lock file that says which process holds it: one writer at a time for a folder such as a fold.

The lock file holds the holder's pid, host and start time (JSON), so a refusal names the running
process. A lock whose process is gone (killed, crashed) on this host is taken over, as stale
temporaries are removed; one held on another host is refused, since its process cannot be checked.
Checking and taking happen under a short flock on `<lock>.guard`, so two starts never both win.
"""
from __future__ import annotations

import contextlib
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Iterator

from desam_pipeline.io.atomic import file_lock, process_alive, read_json, write_json
from desam_pipeline.utilities.errors import DesamError


def _holder(lock: Path) -> dict | None:
    """The lock's content; None when there is none or it cannot be read (never a live holder's: it is written
    atomically)."""
    try:
        content = read_json(lock)
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) and isinstance(content.get("pid"), int) else None


def _describe(holder: dict) -> str:
    return f"process {holder['pid']} on {holder.get('host', '?')} (started {holder.get('started', '?')})"


def take(lock: str | os.PathLike, purpose: str) -> dict:
    """Hold `lock` for this process, taking over one of a dead process on this host; returns what was written.

    Refused with a one-line DesamError naming the holder while another live process holds it."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": f"{datetime.now():%Y-%m-%d %H:%M:%S}",
            "purpose": purpose}
    with file_lock(lock.with_name(lock.name + ".guard")):
        holder = _holder(lock)
        if holder is not None and holder["pid"] != os.getpid():
            here = holder.get("host") == mine["host"]
            if not here or process_alive(holder["pid"]):
                gone = "" if here else f"; if that run is gone, delete {lock}"
                raise DesamError(f"{lock}: {purpose} is in use by {_describe(holder)}; wait for it to finish{gone}")
        write_json(mine, lock)
    return mine


def release(lock: str | os.PathLike, mine: dict) -> None:
    """Remove `lock` if it still holds `mine` (a run that took it over since keeps it)."""
    lock = Path(lock)
    with file_lock(lock.with_name(lock.name + ".guard")):
        if _holder(lock) == mine:
            lock.unlink()


@contextlib.contextmanager
def held(lock: str | os.PathLike, purpose: str) -> Iterator[None]:
    """`lock` held for the block, released at its end (also on an error or Ctrl-C)."""
    mine = take(lock, purpose)
    try:
        yield
    finally:
        release(lock, mine)

