"""Read an nnU-Net v2 raw dataset folder (plus DeSAM's "domains"): case ids, files, sites."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from desam_pipeline.io.atomic import read_json
from desam_pipeline.io.safe_names import name_problem
from desam_pipeline.utilities.errors import DesamError

CHANNEL_SUFFIX = "_0000"


def read_dataset_json(path: Path, hint: str = "") -> dict:
    """A dataset.json file, with a one-line error naming it when absent or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise DesamError(f"{path}: not found{hint}")
    return read_json(path)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# field -> (what it must be, test); region-based labels (lists of values) are an nnU-Net feature desam lacks
FIELD_TYPES = {
    "labels": ("an object of label name -> integer value (region lists are not supported)",
               lambda v: isinstance(v, dict) and bool(v) and all(_is_int(x) for x in v.values())),
    "channel_names": ("a non-empty object of channel index -> name, e.g. {\"0\": \"MRI\"}",
                      lambda v: isinstance(v, dict) and bool(v)
                      and all(str(k).isdigit() and isinstance(x, str) for k, x in v.items())),
    "file_ending": ("a string such as \".nii.gz\"", lambda v: isinstance(v, str) and v.startswith(".")),
    "domains": ("an object of case id -> site name (a non-empty string)",
                lambda v: isinstance(v, dict) and all(isinstance(x, str) and x for x in v.values())),
    "numTraining": ("an integer", _is_int),
}


def field_problems(dataset_json, path: Path, fields: tuple[str, ...] = tuple(FIELD_TYPES)) -> list[str]:
    """Wrong-typed `fields` of a dataset.json (those present), each naming the file and the field."""
    if not isinstance(dataset_json, dict):
        return [f"{path}: must hold a JSON object, found {type(dataset_json).__name__}"]
    problems = []
    for name in fields:
        expected, valid = FIELD_TYPES[name]
        if name in dataset_json and not valid(dataset_json[name]):
            found = json.dumps(dataset_json[name])
            problems.append(f"{path}: '{name}' must be {expected}, found {found[:60]}{'...' if len(found) > 60 else ''}")
        elif name == "domains" and name in dataset_json:
            problems += domain_name_problems(dataset_json, path)
    return problems


def domain_name_problems(dataset_json: dict, path: str | os.PathLike) -> list[str]:
    """Case ids and site names of "domains" that are not plain names: they become file and folder names."""
    problems = []
    for case, site in dict(dataset_json.get("domains", {})).items():
        for what, name in (("case id", case), (f"site name (of case {case})", site)):
            problem = name_problem(name, what)
            if problem:
                problems.append(f"{path}: 'domains': {problem}")
    return problems


def load_dataset_json(raw_dir: Path) -> dict:
    """dataset.json of a raw dataset folder."""
    return read_dataset_json(Path(raw_dir) / "dataset.json",
                             " (convert the dataset first, e.g. desam_convert_prostate_multisite)")


def file_ending(dataset_json: dict) -> str:
    return dataset_json.get("file_ending", ".nii.gz")


def list_cases(raw_dir: Path, dataset_json: dict | None = None) -> list[str]:
    """Sorted case ids that have an image in imagesTr."""
    dataset_json = dataset_json or load_dataset_json(raw_dir)
    ending = CHANNEL_SUFFIX + file_ending(dataset_json)
    images = Path(raw_dir) / "imagesTr"
    if not images.is_dir():
        raise DesamError(f"{images}: folder not found")
    return sorted(p.name[: -len(ending)] for p in images.iterdir()
                  if p.name.endswith(ending) and not p.name.startswith("."))


def image_path(raw_dir: Path, case: str, dataset_json: dict) -> Path:
    return Path(raw_dir) / "imagesTr" / f"{case}{CHANNEL_SUFFIX}{file_ending(dataset_json)}"


def label_path(raw_dir: Path, case: str, dataset_json: dict) -> Path:
    return Path(raw_dir) / "labelsTr" / f"{case}{file_ending(dataset_json)}"


def domains(dataset_json: dict, path: str | os.PathLike = "dataset.json") -> dict[str, str]:
    """case id -> site name; a name that is not a plain name (`../x`, `/abs`) is a DesamError naming `path`."""
    problems = domain_name_problems(dataset_json, path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DesamError(problems[0] + more)
    return dict(dataset_json.get("domains", {}))


def modality_of_site(dataset_json: dict, site: str | None) -> str | None:
    """A site's imaging modality: dataset.json's "modalities" (site -> modality, written by the abdominal
    converter), else the single channel's name (e.g. "CT"); None when neither says."""
    listed = dataset_json.get("modalities")
    if isinstance(listed, dict) and site in listed:
        return listed[site]
    return dataset_json.get("channel_names", {}).get("0")


def label_classes(dataset_json: dict) -> dict[str, int]:
    """name -> value of the foreground labels when there are several (a multi-structure dataset), else {}."""
    foreground = {name: value for name, value in dataset_json.get("labels", {}).items() if value != 0}
    return dict(sorted(foreground.items(), key=lambda item: item[1])) if len(foreground) > 1 else {}


def cases_of_sites(dataset_json: dict, sites: list[str] | None, cases: list[str]) -> list[str]:
    """Cases belonging to the given sites (all cases when `sites` is None); unknown sites are an error."""
    if not sites:
        return list(cases)
    check_sites(dataset_json, sites)
    case_sites = domains(dataset_json)
    return [c for c in cases if case_sites.get(c) in sites]


def check_sites(dataset_json: dict, sites: Sequence[str], dataset: str = "this dataset", kind: str = "site") -> None:
    """Every named site is one of the dataset's sites ("domains"), else a one-line error listing them."""
    known = sorted(set(domains(dataset_json).values()))
    unknown = [s for s in sites if s not in known]
    if unknown:
        raise DesamError(f"unknown {kind}(s) {', '.join(unknown)}; {dataset} has "
                         f"{', '.join(known) or 'no sites (no domains in its dataset.json)'}")
