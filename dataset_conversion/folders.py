"""Source folder listings, and output folders built under a temporary name and published in one rename."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from desam_pipeline.io.atomic import TMP_PREFIX, remove_stale_temporaries, temporary_sibling
from desam_pipeline.utilities.errors import DesamError, naming

IGNORED_ENTRIES = {"__MACOSX"}


def entries(folder: Path) -> list[Path]:
    """Sorted contents of a source folder, without hidden files and macOS archive debris."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in IGNORED_ENTRIES)


def children_by_name(folder: Path) -> dict[str, Path]:
    """Sub-folders keyed by lower-cased name."""
    return {p.name.lower(): p for p in entries(folder) if p.is_dir()}


def _publish(tmp: Path, target: Path) -> None:
    """Rename `tmp` onto `target`; an existing target is moved aside first and deleted afterwards."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = temporary_sibling(target.with_name(f"old-{target.name}"))
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def check_target(target: Path, overwrite: bool) -> None:
    """An existing non-empty `target` is an error unless `overwrite` is set (an empty one may be replaced)."""
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise DesamError(f"{target}: already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def scratch_folder(parent: Path, purpose: str) -> Iterator[Path]:
    """A temporary folder in `parent` for intermediate files, deleted afterwards (and by the stale-temporary
    clean-up of a later run if this process is killed)."""
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=f"-{purpose}", dir=parent) as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def building_folder(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; publish it on success, delete it on failure.

    An existing non-empty `target` is an error unless `overwrite` is set; an empty one is replaced.
    """
    target = Path(target)
    check_target(target, overwrite)
    remove_stale_temporaries(target.parent)  # half-built folders of killed runs
    tmp = temporary_sibling(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with naming(target):  # a full disk names the folder being built
            yield tmp
            _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
