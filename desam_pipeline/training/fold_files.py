"""A fold's inputs and files: the source cases it trains on, the cache check, the plan files copied into the
model folder (one plan per folder), its log, and which of its checkpoints `-c` resumes from.

Plain functions on folders, so the trainer keeps only the state of a run.
"""
from __future__ import annotations

import contextlib
import shutil
from datetime import datetime
from pathlib import Path
from typing import Iterator

from desam_pipeline.data import cache
from desam_pipeline.data.plan_io import plan_hash, plan_path
from desam_pipeline.data.raw_dataset import domains
from desam_pipeline.io import process_lock
from desam_pipeline.io.atomic import atomic_path, read_json, remove_stale_temporaries
from desam_pipeline.io.results_layout import CHECKPOINT_FINAL, CHECKPOINTS, MODEL_PLAN
from desam_pipeline.training.validation import SUMMARY, VALIDATION
from desam_pipeline.utilities import distributed
from desam_pipeline.utilities.errors import DesamError

COPIED_FILES = ("dataset.json", "dataset_fingerprint.json")
LOG_FILE = "training_log.txt"
PROGRESS_PLOT = "progress.png"
DEBUG_FILE = "debug.json"
# Held in the fold folder while a run trains or validates it (pid, host, start): one run per fold at a time.
TRAINING_LOCK = ".training.lock"


def source_cases(preprocessed_dir: Path, sources: list[str] | None) -> tuple[dict, list[str]]:
    """(case -> site of the dataset, the sorted cases of the source sites; all sites when `sources` is None)."""
    dataset_file = preprocessed_dir / "dataset.json"
    if not dataset_file.is_file():
        raise DesamError(f"{dataset_file}: not found; run desam_plan_and_embed for this dataset first")
    case_domains = domains(read_json(dataset_file), dataset_file)
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
    sources = {MODEL_PLAN: plan_path(preprocessed_dir, plans_name)}
    sources.update({name: preprocessed_dir / name for name in COPIED_FILES})
    for name, source in sources.items():
        if not source.is_file():
            raise DesamError(f"{source}: not found; run desam_plan_and_embed for this dataset first")
        with atomic_path(model_dir / name) as tmp:
            shutil.copyfile(source, tmp)


def check_model_plan(model_dir: Path, plan_sha256: str, fold: int | str) -> None:
    """A model folder belongs to one plan: a fold of another plan than the folder's other trained folds is refused."""
    plans = model_dir / MODEL_PLAN
    theirs = plan_hash(read_json(plans)) if plans.is_file() else plan_sha256
    others = sorted(folder.name for folder in model_dir.glob("fold_*") if folder.name != f"fold_{fold}"
                    and any((folder / name).is_file() for name in CHECKPOINTS))
    if theirs != plan_sha256 and others:
        raise DesamError(f"{plans}: {', '.join(others)} of this model folder were trained on another plan (sha256 "
                         f"{theirs[:12]}..., this run's is {plan_sha256[:12]}...); a model folder holds one plan: "
                         f"re-plan with the choices those folds used, or move {model_dir.name} aside to train a new "
                         "model on this plan")


@contextlib.contextmanager
def fold_lock(model_dir: Path, fold: int | str, plan_sha256: str) -> Iterator[None]:
    """One run per fold at a time, on the model folder's one plan: rank 0 checks the plan (check_model_plan) and
    holds fold_<k>/.training.lock, which names its process, for the block (the ranks of one torchrun share it)."""
    distributed.on_rank_zero(lambda: check_model_plan(model_dir, plan_sha256, fold))
    lock, purpose = model_dir / f"fold_{fold}" / TRAINING_LOCK, f"fold {fold} of {model_dir.name}"
    with contextlib.ExitStack() as stack:
        distributed.on_rank_zero(lambda: stack.enter_context(process_lock.held(lock, purpose)))
        yield


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


def tidy_fold(model_dir: Path, fold_dir: Path, overwrite: bool) -> None:
    """Before training: the temporaries an interrupted run left removed, and with `overwrite` the fold cleared."""
    for folder in (model_dir, fold_dir, fold_dir / VALIDATION):
        remove_stale_temporaries(folder)
    if overwrite:
        clear_fold(fold_dir)


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
