"""Names that become file or folder names: one rule for them, and one containment check for writers.

Site names and case ids (from dataset.json and the converters), plans names and trainer names end up
as path components (`predictions/<site>/<case>.nii.gz`, `<plans>.json`, `<Trainer>__<plans>__...`). A
name is a plain name: letters, digits, `_` and `-`, starting with a letter or digit, at most
MAX_NAME_LENGTH characters. So it can never climb out of (`..`), jump past (an absolute path) or nest
inside (`/`) the folder it is joined to, and leaves room in a 255-byte file name for what desam adds.
Writers that join names to their tree go through `contained` as a second line of defence.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from desam_pipeline.utilities.errors import DesamError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
MAX_NAME_LENGTH = 100
RULE = f"letters, digits, _ and -, starting with a letter or digit, at most {MAX_NAME_LENGTH} characters"


def name_problem(name: object, what: str) -> str | None:
    """Why `name` cannot be a `what` (e.g. "site name"), or None when it is a plain name."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or len(name) > MAX_NAME_LENGTH:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        return f"{what} {shown} is not a plain name ({RULE})"
    return None


def check_name(name: str, what: str, where: str | os.PathLike | None = None) -> str:
    """`name` when it is a plain name, else a DesamError naming `where` it came from."""
    problem = name_problem(name, what)
    if problem:
        raise DesamError(f"{where}: {problem}" if where is not None else problem)
    return name


def contained(root: str | os.PathLike, *parts: str) -> Path:
    """`root / parts`, each part one path component: refused when a part is empty, `.`, `..`, absolute or holds a
    separator, so the result always lies inside `root`."""
    separators = {"/", os.sep, os.altsep} - {None}
    for part in parts:
        if part in ("", ".", "..") or os.path.isabs(part) or any(s in part for s in separators):
            raise DesamError(f"{Path(root).joinpath(*parts)}: refusing to write outside {root} (the name {part!r} "
                             "is not a single file or folder name)")
    return Path(root).joinpath(*parts)
