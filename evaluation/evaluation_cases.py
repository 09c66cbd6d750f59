"""Which cases desam_evaluate scores for a model: its folder and folds, every case of the unseen sites
(predicted by the average of the folds) and each held-out source case (by the one fold that left it out)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from desam_pipeline.data import splits
from desam_pipeline.data.raw_dataset import check_sites, domains, label_path, list_cases
from desam_pipeline.inference.model import available_folds, checkpoint_file, default_folds
from desam_pipeline.inference.prediction_cache import prediction_file
from desam_pipeline.inference.settings import DEFAULT_CHECKPOINT_NAME
from desam_pipeline.io.atomic import read_json
from desam_pipeline.io.results_layout import DEFAULT_TRAINER, model_folder_name, source_key
from desam_pipeline.training.train import find_plans_name
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.paths import Trees


@dataclasses.dataclass(frozen=True)
class EvalCase:
    """One case to score: its site, whether it is a held-out case of the source, the fold(s) predicting it."""
    case: str
    site: str
    in_domain: bool
    folds: tuple[str, ...]


# ---------------------------------------------------------------- model folder, folds, test cases
def train_command(dataset: str, sources: Sequence[str], mode: str, plans_name: str, fold: str = "FOLD",
                  trainer: str = DEFAULT_TRAINER) -> str:
    return (f"desam_train {dataset} {fold} --source {' '.join(sorted(set(sources)))} --mode {mode} "
            f"--plans-name {plans_name}" + (f" -tr {trainer}" if trainer != DEFAULT_TRAINER else ""))


def locate_model(trees: Trees, sources: Sequence[str], mode: str, plans_name: str | None,
                 trainer: str = DEFAULT_TRAINER) -> tuple[Path, str]:
    """The model folder desam_train writes for these flags (same plan choice and folder name), and its plan name."""
    if not trees.preprocessed.is_dir():
        raise DesamError(f"{trees.preprocessed}: not found; run desam_plan_and_embed -d {trees.dataset}, "
                         "then desam_train")
    plans = find_plans_name(trees.preprocessed, plans_name)
    folder = trees.results / model_folder_name(trainer, plans, mode, list(sources))
    if not folder.is_dir():
        command = train_command(trees.dataset, sources, mode, plans, trainer=trainer)
        raise DesamError(f"{folder}: no trained model; run `{command}` for each fold 0-4 (or fold all) first")
    return folder, plans


def choose_folds(folder: Path, requested: Sequence[str] | None, hint: str,
                 checkpoint_name: str = DEFAULT_CHECKPOINT_NAME) -> list[str]:
    """The requested folds (each must have the named checkpoint), else the predictor's default folds."""
    available = available_folds(folder, checkpoint_name)
    name = checkpoint_file(checkpoint_name)
    if not available:
        raise DesamError(f"{folder}: no fold has {name}; run `{hint}` to the end first")
    if not requested:
        return default_folds(folder, checkpoint_name)
    folds = list(dict.fromkeys(str(splits.parse_fold(f)) for f in requested))
    missing = [f for f in folds if f not in available]
    if missing:
        raise DesamError(f"{folder}: fold(s) {', '.join(missing)} have no {name} (trained: "
                         f"{', '.join(available)}); run `{hint.replace('FOLD', missing[0])}` first")
    return folds


def held_out_cases(preprocessed_dir: Path, folder: Path, sources: Sequence[str], source_cases: list[str],
                   folds: Sequence[str]) -> dict[str, str]:
    """source case -> the chosen fold that held it out, from splits_final.json (never written here).

    A fold's debug.json records the cases it validated on; a split edited since is an error, as the
    fold would then be scored on cases it trained on.
    """
    key = source_key(list(sources))
    split = splits.load_or_create_splits(preprocessed_dir, key, source_cases, write=False)
    held: dict[str, str] = {}
    for fold in folds:
        parsed = splits.parse_fold(fold)
        _, val = splits.fold_cases(split, parsed, source_cases, key)
        debug = folder / f"fold_{fold}" / "debug.json"
        if debug.is_file():
            trained_val = read_json(debug).get("val_cases")
            if trained_val is not None and sorted(trained_val) != sorted(val):
                raise DesamError(f"{preprocessed_dir / splits.SPLITS_FILE}: {key} fold {fold} now holds out "
                                 f"{', '.join(sorted(val)) or 'nothing'}, but the fold was trained holding out "
                                 f"{', '.join(sorted(trained_val)) or 'nothing'} ({debug}); retrain it or "
                                 "restore the split")
        for case in val:
            held.setdefault(case, fold)
    return held


def check_sources(raw_dir: Path, dataset_json: dict, sources: Sequence[str]) -> None:
    """The dataset has sites ("domains") and the source sites are among them."""
    case_sites = domains(dataset_json)
    if not case_sites:
        raise DesamError(f"{raw_dir / 'dataset.json'}: no 'domains' (case -> site); the evaluation needs sites")
    check_sites(dataset_json, sources, raw_dir.name, kind="source site")


def evaluation_cases(raw_dir: Path, dataset_json: dict, preprocessed_dir: Path, folder: Path,
                     sources: Sequence[str], folds: Sequence[str]) -> list[EvalCase]:
    """Every case of every non-source site (all folds) plus each held-out source case (its own fold)."""
    case_sites = domains(dataset_json)
    cases = [c for c in list_cases(raw_dir, dataset_json) if c in case_sites]
    source_cases = [c for c in cases if case_sites[c] in sources]
    held = held_out_cases(preprocessed_dir, folder, sources, source_cases, folds)
    chosen = []
    for case in cases:
        site = case_sites[case]
        if site not in sources:
            chosen.append(EvalCase(case, site, False, tuple(folds)))
        elif case in held:
            chosen.append(EvalCase(case, site, True, (held[case],)))
    if not chosen:
        raise DesamError(f"{raw_dir}: nothing to evaluate: no case outside {', '.join(sources)} and no held-out "
                         f"source case in folds {', '.join(folds)}")
    for case in chosen:
        if not label_path(raw_dir, case.case, dataset_json).is_file():
            raise DesamError(f"{label_path(raw_dir, case.case, dataset_json)}: ground truth not found; "
                             "evaluation needs the label of every test case")
    return chosen


def prediction_path(folder: Path, case: EvalCase) -> Path:
    return prediction_file(folder, case.site, case.case)


def foreground_labels(dataset_json: dict) -> list[int]:
    """Every non-zero integer label of dataset.json (training targets are label > 0); (1,) if none."""
    values = [v for v in dataset_json.get("labels", {}).values() if isinstance(v, int) and v != 0]
    return sorted(values) or [1]
