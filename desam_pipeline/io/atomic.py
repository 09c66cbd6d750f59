"""Write files and folders so that a reader never sees a half-written one.

Temporary names start with a dot so `*.nii.gz` globs and folder listings skip them, and carry
the writer's process id so that only temporaries of dead processes are ever cleaned up.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock

from desam_pipeline.utilities.errors import DesamError, naming

TMP_PREFIX = ".tmp-"


def temporary_sibling(target: Path) -> Path:
    """A dot-prefixed name next to `target` that keeps its suffixes (nibabel picks the format by them)."""
    return target.with_name(f"{TMP_PREFIX}{os.getpid()}-{target.name}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed onto `target`, on failure removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    try:
        with naming(target):
            yield tmp
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


@contextlib.contextmanager
def file_lock(lock_file: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on `lock_file` for the block, so separate processes take turns (freed if one dies).

    filelock takes an flock on Unix and a msvcrt lock on Windows; the lock file stays for the next run."""
    with FileLock(os.fspath(lock_file)):
        yield


def write_bytes(data: bytes, target: str | os.PathLike) -> None:
    """Write bytes atomically (torch checkpoints go through a buffer, so their bytes never depend on the
    temporary name and a full disk is a plain OSError naming the file)."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def save_torch(obj: Any, target: str | os.PathLike) -> None:
    """torch.save atomically, through a buffer: torch records the file's name inside the archive, so
    saving to the temporary path would make the bytes (and any recorded sha256) differ per process."""
    import io

    import torch  # here, not at the top: most users of this module never save a tensor

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(buffer.getvalue(), target)


def write_json(data: Any, target: str | os.PathLike) -> None:
    """Write JSON atomically, indented for people to read and edit."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; text that is not JSON (or not UTF-8) is a one-line DesamError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DesamError(f"{path}: invalid JSON ({exc})") from exc


def temporary_owner(name: str) -> int | None:
    """The process id in a `.tmp-<pid>-<name>` temporary's name, None for other names."""
    if not name.startswith(TMP_PREFIX):
        return None
    pid, _, rest = name[len(TMP_PREFIX):].partition("-")
    return int(pid) if pid.isdigit() and rest else None


def process_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_temporary(name: str) -> bool:
    """A temporary whose writer is gone (killed mid-write): safe to delete."""
    pid = temporary_owner(name)
    return pid is not None and not process_alive(pid)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporaries that killed runs left in `folder`; return how many.

    Temporaries of live processes (a concurrent run writing right now) are left alone.
    """
    folder = Path(folder)
    removed = 0
    if folder.is_dir():
        for child in folder.iterdir():
            if is_stale_temporary(child.name):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
                removed += 1
    return removed
