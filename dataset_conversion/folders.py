"""Build an output folder under a temporary name and publish it in one rename."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from desam_pipeline.io.atomic import remove_stale_temporaries, temporary_sibling
from desam_pipeline.utilities.errors import DesamError, naming


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


@contextlib.contextmanager
def building_folder(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; publish it on success, delete it on failure.

    An existing non-empty `target` is an error unless `overwrite` is set; an empty one is replaced.
    """
    target = Path(target)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise DesamError(f"{target}: already exists (pass --overwrite to replace it)")
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
