"""Cross-validation folds by patient over the selected source domains, kept in `splits_final.json`.

The file sits in the preprocessed dataset folder and maps a source selection key
("src-ALL", "src-RUNMC", "src-BMC+RUNMC") to nnU-Net's list of folds
`[{"train": [...], "val": [...]}, ...]`. A key already in the file is used as it is, so a
user can edit a split by hand; missing keys are created (seeded, deterministic) and added.

Fold `all` trains on every source case and validates on none. nnU-Net's `all` validates on
its training cases, which measures nothing; here there is simply no held-out set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from desam_pipeline.io.atomic import read_json, write_json
from desam_pipeline.utilities.errors import DesamError

SPLITS_FILE = "splits_final.json"
NUM_FOLDS = 5
SPLIT_SEED = 12345
ALL = "all"


def parse_fold(text: str | int) -> int | str:
    """`0`..`4` -> int, `all` -> "all"; anything else is a one-line error."""
    if str(text) == ALL:
        return ALL
    if str(text).isdigit() and int(text) < NUM_FOLDS:
        return int(text)
    raise DesamError(f"fold must be 0..{NUM_FOLDS - 1} or '{ALL}', got {text!r}")


def make_folds(cases: list[str], seed: int = SPLIT_SEED, num_folds: int = NUM_FOLDS) -> list[dict]:
    """Shuffle the cases with `seed` and deal them into min(num_folds, len(cases)) validation folds.

    One case is one patient (nnU-Net's convention), so folds split by patient.
    """
    cases = sorted(cases)
    if len(cases) < 2:
        return []
    order = np.random.default_rng(seed).permutation(len(cases))
    parts = np.array_split(order, min(num_folds, len(cases)))
    folds = []
    for part in parts:
        val = sorted(cases[i] for i in part)
        folds.append({"train": [c for c in cases if c not in val], "val": val})
    return folds


def check_folds(folds: object, path: Path, key: str) -> None:
    """A hand-edited split must be nnU-Net's list of {"train": [case ids], "val": [case ids]} folds."""
    if not isinstance(folds, list):
        raise DesamError(f"{path}: {key} must be a list of folds ({{\"train\": [...], \"val\": [...]}}), "
                         f"got {folds!r}")
    for k, fold in enumerate(folds):
        if not isinstance(fold, dict) or not {"train", "val"} <= set(fold):
            raise DesamError(f"{path}: {key} fold {k} needs 'train' and 'val' lists")
        for part in ("train", "val"):
            if not isinstance(fold[part], list) or not all(isinstance(c, str) for c in fold[part]):
                raise DesamError(f"{path}: {key} fold {k} '{part}' must be a list of case ids (strings), "
                                 f"got {fold[part]!r}")


def load_or_create_splits(preprocessed_dir: Path, key: str, cases: list[str],
                          write: bool = True) -> list[dict]:
    """The folds of `key` from splits_final.json, created and saved (when `write`) if absent.

    A stored split must only name cases of the source selection; it may leave some out.
    """
    path = Path(preprocessed_dir) / SPLITS_FILE
    stored = {}
    if path.is_file():
        stored = read_json(path)
        if not isinstance(stored, dict):
            raise DesamError(f"{path}: expected an object keyed by source selection (e.g. 'src-ALL')")
    if key in stored:
        folds = stored[key]
        check_folds(folds, path, key)
        known = set(cases)
        for k, fold in enumerate(folds):
            unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
            if unknown:
                raise DesamError(f"{path}: {key} fold {k} names cases outside the source selection: "
                                 f"{', '.join(unknown)}")
        return folds
    folds = make_folds(cases)
    if write:
        write_json({**stored, key: folds}, path)
    return folds


def fold_cases(folds: list[dict], fold: int | str, cases: list[str], key: str) -> tuple[list[str], list[str]]:
    """(train cases, validation cases) of one fold; fold `all` is (every case, none)."""
    if fold == ALL:
        return sorted(cases), []
    if not folds:
        raise DesamError(f"{key} has {len(cases)} source case(s): only fold '{ALL}' is possible")
    if fold >= len(folds):
        raise DesamError(f"{key} has {len(folds)} folds ({len(cases)} source cases); "
                         f"fold {fold} does not exist, use 0..{len(folds) - 1} or '{ALL}'")
    return list(folds[fold]["train"]), list(folds[fold]["val"])
