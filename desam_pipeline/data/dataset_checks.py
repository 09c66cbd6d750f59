"""`desam_verify_dataset`: check a raw dataset case by case before any stage uses it."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from desam_pipeline.data import raw_dataset
from desam_pipeline.io.nifti_io import read_volume
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.paths import Trees, add_root_arguments

AFFINE_TOLERANCE = 1e-4
REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


def check_case(raw_dir: Path, case: str, dataset_json: dict) -> list[str]:
    """Problems of one case (empty when fine), each naming the file."""
    image_file = raw_dataset.image_path(raw_dir, case, dataset_json)
    label_file = raw_dataset.label_path(raw_dir, case, dataset_json)
    problems = []
    if case not in raw_dataset.domains(dataset_json):
        problems.append(f"{case}: no domain in dataset.json 'domains'")
    if not label_file.is_file():
        return problems + [f"{label_file}: label missing for image {image_file.name}"]
    try:
        image, image_nii = read_volume(image_file)
        label, label_nii = read_volume(label_file)
    except DesamError as exc:
        return problems + [str(exc)]
    if image.shape != label.shape:
        return problems + [f"{label_file}: shape {label.shape} differs from image shape {image.shape}"]
    if not np.allclose(image_nii.affine, label_nii.affine, atol=AFFINE_TOLERANCE):
        problems.append(f"{label_file}: affine differs from the image's by more than {AFFINE_TOLERANCE}")
    if not np.all(np.isfinite(image)):
        problems.append(f"{image_file}: non-finite intensities (NaN or inf)")
    allowed = {int(v) for v in dataset_json["labels"].values()}
    found = set(np.unique(label).tolist())
    if not found <= allowed:
        problems.append(f"{label_file}: label values {sorted(found - allowed)} not declared in dataset.json labels")
    return problems


def verify_dataset(raw_dir: Path) -> list[str]:
    """All problems of a raw dataset: dataset.json keys, case count, every case's files and geometry."""
    raw_dir = Path(raw_dir)
    dataset_json = raw_dataset.load_dataset_json(raw_dir)
    wrong = raw_dataset.field_problems(dataset_json, raw_dir / "dataset.json")
    if wrong:
        return wrong
    missing_keys = [k for k in REQUIRED_KEYS if k not in dataset_json]
    if missing_keys:
        return [f"{raw_dir / 'dataset.json'}: missing keys {', '.join(missing_keys)}"]
    cases = raw_dataset.list_cases(raw_dir, dataset_json)
    problems = []
    if len(cases) != dataset_json["numTraining"]:
        problems.append(f"{raw_dir / 'dataset.json'}: numTraining is {dataset_json['numTraining']} "
                        f"but imagesTr holds {len(cases)} cases")
    for case in cases:
        problems.extend(check_case(raw_dir, case, dataset_json))
    return problems


def require_valid_dataset(raw_dir: Path) -> None:
    """Raise one DesamError summarising the problems, for stages that must not start on a bad dataset."""
    problems = verify_dataset(raw_dir)
    if problems:
        more = f" (and {len(problems) - 1} more; run desam_verify_dataset)" if len(problems) > 1 else ""
        raise DesamError(f"invalid dataset: {problems[0]}{more}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Check every case of a raw desam dataset.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset number or DatasetNNN_Name")
    add_root_arguments(parser, "raw")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raw_dir = Trees.from_args(args).raw
    problems = verify_dataset(raw_dir)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {raw_dir}")
        return 1
    print(f"{raw_dir}: OK")
    return 0


if __name__ == "__main__":
    main()
