"""The three tree roots (raw, preprocessed, results) and dataset naming.

Roots come from DESAM_RAW / DESAM_PREPROCESSED / DESAM_RESULTS or from explicit
flags; a missing one is an error only when it is first needed, never at import.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from desam_pipeline.utilities.errors import DesamError

ROOT_VARIABLES = {"raw": "DESAM_RAW", "preprocessed": "DESAM_PREPROCESSED", "results": "DESAM_RESULTS"}
DATASET_PATTERN = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9_\-]+)$")


def get_root(kind: str, override: str | os.PathLike | None = None) -> Path:
    """Return the root folder of one tree, from the override or its environment variable."""
    if kind not in ROOT_VARIABLES:
        raise ValueError(f"unknown tree {kind!r}; expected one of {sorted(ROOT_VARIABLES)}")
    if override is not None:
        return Path(override)
    value = os.environ.get(ROOT_VARIABLES[kind])
    if not value:
        raise DesamError(
            f"{ROOT_VARIABLES[kind]} is not set: export it or pass --{kind} (the {kind} tree's root folder)"
        )
    return Path(value)


def dataset_name(dataset_id: int, name: str) -> str:
    """Build the canonical `DatasetNNN_Name` folder name."""
    full = f"Dataset{int(dataset_id):03d}_{name}"
    if not DATASET_PATTERN.match(full):
        raise DesamError(f"invalid dataset name {full!r}: expected DatasetNNN_Name with letters, digits, _ or -")
    return full


def resolve_dataset(spec: str | int, *roots: Path) -> str:
    """Resolve `1`, `001` or `Dataset001_Name` to the full name by looking in the given roots."""
    text = str(spec)
    if DATASET_PATTERN.match(text):
        return text
    if not text.isdigit():
        raise DesamError(f"dataset {text!r} is neither a number nor a DatasetNNN_Name")
    number = int(text)
    found = set()
    for root in roots:
        if root.is_dir():
            for child in root.iterdir():
                match = DATASET_PATTERN.match(child.name)
                if match and int(match.group(1)) == number and child.is_dir():
                    found.add(child.name)
    if not found:
        searched = ", ".join(str(r) for r in roots) or "(no roots)"
        raise DesamError(f"no dataset with number {number:03d} in {searched}; convert one first "
                         f"(desam_convert_prostate_multisite SRC -d {number} or desam_convert_msd SRC -d {number})")
    if len(found) > 1:
        raise DesamError(f"dataset number {number:03d} is ambiguous: {sorted(found)}")
    return found.pop()


def add_root_arguments(parser: argparse.ArgumentParser, *kinds: str) -> None:
    """Add --raw/--preprocessed/--results flags that override the environment variables."""
    for kind in kinds or tuple(ROOT_VARIABLES):
        parser.add_argument(
            f"--{kind}", default=None, metavar="DIR",
            help=f"{kind} tree root (default: ${ROOT_VARIABLES[kind]})",
        )


class Trees:
    """Resolved roots and dataset name for one command invocation."""

    def __init__(self, dataset: str | int, raw=None, preprocessed=None, results=None):
        self._overrides = {"raw": raw, "preprocessed": preprocessed, "results": results}
        roots = []
        for kind, override in self._overrides.items():
            if override is not None or os.environ.get(ROOT_VARIABLES[kind]):
                roots.append(get_root(kind, override))
        self.dataset = resolve_dataset(dataset, *roots)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Trees":
        return cls(args.dataset, getattr(args, "raw", None), getattr(args, "preprocessed", None),
                   getattr(args, "results", None))

    def root(self, kind: str) -> Path:
        return get_root(kind, self._overrides[kind])

    @property
    def raw(self) -> Path:
        """Raw dataset folder (imagesTr, labelsTr, dataset.json)."""
        return self.root("raw") / self.dataset

    @property
    def preprocessed(self) -> Path:
        """Preprocessed dataset folder (fingerprint, plans, embedding caches, splits)."""
        return self.root("preprocessed") / self.dataset

    @property
    def results(self) -> Path:
        """Results dataset folder (one model folder per trainer/plan/mode/source)."""
        return self.root("results") / self.dataset
