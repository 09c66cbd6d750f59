"""Write files and folders so that a reader never sees a half-written one.

Temporary names start with a dot so `*.nii.gz` globs and folder listings skip them.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

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
    """An exclusive flock on `lock_file` for the block, so separate processes take turns (freed if one dies)."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(data: Any, target: str | os.PathLike) -> None:
    """Write JSON atomically, indented for people to read and edit."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporaries left by killed runs (any pid) in `folder`; return how many."""
    folder = Path(folder)
    removed = 0
    if folder.is_dir():
        for child in folder.iterdir():
            if child.name.startswith(TMP_PREFIX):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
                removed += 1
    return removed
