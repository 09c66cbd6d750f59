"""Saved predictions of a model folder that later runs reuse, keyed by content.

`<model folder>/predictions/<group>/<case>.nii.gz` (a group per site for desam_evaluate), and
`predictions/prediction_settings.json` mapping each case to the key its saved mask was made with: the
sha256 of its input files and of each fold's checkpoint, and the prediction choices (`PredictionSettings.
choices`). A saved mask is reused only when its key is unchanged, so new pixels in an input, a retrained
fold or another grid rule all predict again; a file that was merely touched or copied does not.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from desam_pipeline.data.raw_dataset import modality_of_site
from desam_pipeline.inference.inputs import CaseInput
from desam_pipeline.inference.model import checkpoint_file, load_model
from desam_pipeline.inference.outputs import merge_quality, output_path
from desam_pipeline.inference.predictor import Predictor, build_predictor, resolve_run
from desam_pipeline.inference.settings import PredictionSettings
from desam_pipeline.io.atomic import read_json, write_json
from desam_pipeline.io.nifti_io import file_sha256
from desam_pipeline.io.results_layout import class_folders
from desam_pipeline.io.safe_names import contained
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.runtime import select_device

PREDICTIONS = "predictions"
PREDICTION_RECORD = "prediction_settings.json"


@dataclass(frozen=True)
class SavedCase:
    """One case predicted into `<model folder>/predictions/<group>/` by the average of `folds`."""
    input: CaseInput
    folds: tuple[str, ...]
    group: str

    @property
    def case(self) -> str:
        return self.input.case


def group_folder(folder: Path, group: str) -> Path:
    """`<model folder>/predictions/<group>`; a group (site) name leading elsewhere is refused (see safe_names)."""
    return contained(Path(folder) / PREDICTIONS, group)


def prediction_file(folder: Path, group: str, case: str) -> Path:
    """Where the saved mask of `case` lies in a model folder."""
    return output_path(group_folder(folder, group), case)


def prediction_key(folder: Path, folds: Sequence[str], settings: PredictionSettings, inputs: Sequence[Path],
                   hashes: dict[Path, str] | None = None) -> dict:
    """What a saved prediction depends on: its input files' and its folds' checkpoints' sha256, and the choices.

    `hashes` remembers file hashes across calls (each checkpoint serves many cases)."""
    hashes = {} if hashes is None else hashes

    def digest(path: Path) -> str:
        if path not in hashes:
            hashes[path] = file_sha256(path)
        return hashes[path]

    name = checkpoint_file(settings.checkpoint_name)
    per_class = class_folders(folder)
    if per_class:
        checkpoints = {f"{value}/{fold}": digest(path / f"fold_{fold}" / name)
                       for value, path in per_class.items() for fold in folds}
    else:
        checkpoints = {fold: digest(Path(folder) / f"fold_{fold}" / name) for fold in folds}
    return {"inputs": [digest(Path(p)) for p in inputs], "folds": list(folds), "checkpoints": checkpoints,
            **settings.choices()}


def ensure_predictions(folder: Path, cases: list[SavedCase], settings: PredictionSettings,
                       preprocessed_root: str | None = None, progress: bool = True) -> dict[str, int]:
    """Predict the cases without a saved prediction of the same key, through the predictor; returns counts.

    A group named after a site of the model's dataset is predicted with that site's modality (dataset.json).

    Cases that fail are forgotten (predicted again next time) and reported together in one DesamError
    after the others are done."""
    record_path = Path(folder) / PREDICTIONS / PREDICTION_RECORD
    record = read_json(record_path) if record_path.is_file() else {}
    hashes: dict[Path, str] = {}
    wanted = {c.case: prediction_key(folder, c.folds, settings, c.input.files, hashes) for c in cases}
    todo = [c for c in cases if not (prediction_file(folder, c.group, c.case).is_file()
                                     and record.get(c.case) == wanted[c.case])]
    print(f"desam_evaluate: {len(cases) - len(todo)} saved prediction(s) reused, {len(todo)} to predict", flush=True)
    if not todo:
        return {"reused": len(cases), "predicted": 0}
    fold_order = list(dict.fromkeys(f for c in todo for f in c.folds))
    device = select_device(settings.device)
    model = load_model(folder, fold_order, device, settings.checkpoint_name)
    run = resolve_run(model.plan, settings, device)
    engine = build_predictor(model, run, preprocessed_root)
    groups: dict[tuple[tuple[str, ...], str], list[SavedCase]] = {}
    for case in todo:
        groups.setdefault((case.folds, case.group), []).append(case)
    failed = []
    for (folds, group), members in groups.items():
        part = Predictor(model.with_folds(list(folds)), engine.encoder, run, engine.cache_index,
                         modality_of_site(model.dataset_json, group))
        out_dir = group_folder(folder, group)
        print(f"desam_evaluate: {group}: {len(members)} case(s) with fold(s) {', '.join(folds)}", flush=True)
        for result in part.predict_cases([c.input for c in members], out_dir, show_progress=progress):
            if result.status == "predicted":
                record[result.case] = wanted[result.case]
            else:
                record.pop(result.case, None)
                failed.append(f"{result.case}: {result.message}")
        write_json(record, record_path)
        merge_quality(out_dir)
    if failed:
        raise DesamError(f"{len(failed)} case(s) could not be predicted ({'; '.join(failed)}); fix them and rerun "
                         "(finished predictions are kept)")
    return {"reused": len(cases) - len(todo), "predicted": len(todo)}
