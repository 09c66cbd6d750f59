"""A fold's inputs and files: the source cases it trains on, the cache check, the plan files copied into the
model folder, its log, and which of its checkpoints `-c` resumes from.

Plain functions on folders, so the trainer keeps only the state of a run.
"""
from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from desam_pipeline.data import cache
from desam_pipeline.data.plan_io import plan_hash
from desam_pipeline.data.raw_dataset import domains
from desam_pipeline.io.atomic import atomic_path, read_json
from desam_pipeline.io.results_layout import CHECKPOINT_FINAL, CHECKPOINTS, MODEL_PLAN
from desam_pipeline.training.validation import SUMMARY, VALIDATION
from desam_pipeline.utilities.errors import DesamError

COPIED_FILES = ("dataset.json", "dataset_fingerprint.json")
LOG_FILE = "training_log.txt"
PROGRESS_PLOT = "progress.png"
DEBUG_FILE = "debug.json"


def source_cases(preprocessed_dir: Path, sources: list[str] | None) -> tuple[dict, list[str]]:
    """(case -> site of the dataset, the sorted cases of the source sites; all sites when `sources` is None)."""
    dataset_file = preprocessed_dir / "dataset.json"
    if not dataset_file.is_file():
        raise DesamError(f"{dataset_file}: not found; run desam_plan_and_embed for this dataset first")
    case_domains = domains(read_json(dataset_file))
    known = sorted(set(case_domains.values()))
    unknown = [s for s in sources or [] if s not in known]
    if unknown:
        raise DesamError(f"unknown source site(s) {', '.join(unknown)}; {preprocessed_dir.name} has {', '.join(known)}")
    cases = sorted(c for c, site in case_domains.items() if not sources or site in sources)
    if not cases:
        raise DesamError(f"{dataset_file}: no cases with a domain to train on")
    return case_domains, cases


def require_cached(cache_dir: Path, plan: dict, plans_name: str, cases: list[str], case_domains: dict,
                   dataset: str) -> None:
    """Every source case complete in the cache and embedded with this plan, else the command that fixes it."""
    fresh = set(cache.complete_cases(cache_dir, plan_hash(plan)))
    missing = [c for c in cases if c not in fresh]
    if missing:
        listed = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        sites = sorted({case_domains[c] for c in missing})
        raise DesamError(f"{cache_dir}: {len(missing)} source case(s) not cached with this plan ({listed}); run: "
                         f"desam_plan_and_embed -d {dataset} --encoder {plan['encoder']} --checkpoint "
                         f"{plan['checkpoint']} --plans-name {plans_name} --domains {' '.join(sites)}")


def copy_plan_files(preprocessed_dir: Path, plans_name: str, model_dir: Path) -> None:
    """plans.json, dataset.json, dataset_fingerprint.json into the model folder: it stands alone."""
    sources = {MODEL_PLAN: preprocessed_dir / f"{plans_name}.json"}
    sources.update({name: preprocessed_dir / name for name in COPIED_FILES})
    for name, source in sources.items():
        if not source.is_file():
            raise DesamError(f"{source}: not found; run desam_plan_and_embed for this dataset first")
        with atomic_path(model_dir / name) as tmp:
            shutil.copyfile(source, tmp)


def append_log(fold_dir: Path, line: str, file_mode: str = "a") -> None:
    """One time-stamped line in the fold's training_log.txt (`file_mode` "w" starts it afresh)."""
    with open(fold_dir / LOG_FILE, file_mode, encoding="utf-8") as log:
        log.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {line}\n")


def check_finished(fold_dir: Path, continue_training: bool, overwrite: bool) -> None:
    """A finished fold (checkpoint_final.pth) is retrained only with an explicit `overwrite`."""
    final = fold_dir / CHECKPOINT_FINAL
    if final.is_file() and not continue_training and not overwrite:
        raise DesamError(f"{final}: this fold is finished; pass -c to keep it (nothing left to train) or "
                         f"--overwrite to train it again from scratch")


def validation_written(fold_dir: Path) -> bool:
    return (fold_dir / VALIDATION / SUMMARY).is_file()


def clear_fold(fold_dir: Path) -> None:
    """Remove a previous run's checkpoints, log, plot and validation, so no mixed folder survives."""
    for name in (*CHECKPOINTS, LOG_FILE, PROGRESS_PLOT, DEBUG_FILE):
        (fold_dir / name).unlink(missing_ok=True)
    shutil.rmtree(fold_dir / VALIDATION, ignore_errors=True)


def newest_checkpoint(fold_dir: Path) -> Path | None:
    """checkpoint_final, else latest, else best (nnU-Net's order for `-c`)."""
    for name in CHECKPOINTS:
        if (fold_dir / name).is_file():
            return fold_dir / name
    return None
