"""Hand-edited plans and splits: every field is checked where the file is read, one line naming the file,
the field and what it must be (never a traceback from deep inside a later stage)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from desam_pipeline.data import splits
from desam_pipeline.data.plan_io import DEFAULT_CHOICES, load_plan, plan_path
from desam_pipeline.inference.model import load_model
from desam_pipeline.io.atomic import read_json
from desam_pipeline.utilities.errors import DesamError

PLANS = "DeSAMPlans_tiny"
CASES = ["RUNMC_Case00", "RUNMC_Case01", "RUNMC_Case02"]


def valid_plan() -> dict:
    return {"plans_name": PLANS, "encoder": "tiny", "family": "sam", "checkpoint": "/models/sam_tiny.pth",
            "checkpoint_sha256": "0" * 64, "tap_blocks": [0, 1, 2], "tap_shapes": [[8, 64, 64]] * 3,
            "neck_shape": [256, 64, 64], **json.loads(json.dumps(DEFAULT_CHOICES))}


def write_plan(folder: Path, **changes) -> Path:
    plan = {**valid_plan(), **changes}
    path = plan_path(folder, PLANS)
    path.write_text(json.dumps(plan), encoding="utf-8")
    return path


def test_a_valid_plan_loads_unchanged(tmp_path):
    write_plan(tmp_path)
    assert load_plan(tmp_path, PLANS) == valid_plan()


@pytest.mark.parametrize("field, value, expected", [
    ("batch_size", {"cpu": "abc", "cuda": 4}, "batch_size must be an object with a positive integer for cpu and cuda"),
    ("batch_size", {"cpu": 1}, "batch_size must be an object with a positive integer for cpu and cuda"),
    ("slice_orientation", "weird", "slice_orientation must be one of simpleitk, nibabel"),
    ("slice_axis", 5, "slice_axis must be 0, 1 or 2, got 5"),
    ("slice_size", "abc", "slice_size must be a positive integer, got 'abc'"),
    ("intensity", {}, "intensity must be an object with low_percentile < high_percentile"),
    ("cache_dtype", "float8", "cache_dtype must be one of float16, float32, got 'float8'"),
    ("checkpoint", 123, "checkpoint must be the path of the SAM checkpoint, a string, got 123"),
    ("precision", {"cpu": "fp8", "cuda": "bf16"}, "precision must be an object with one of"),
    ("slices", "some", "slices must be one of foreground_margin, foreground, all"),
    ("tap_shapes", [[8, 64, 64]], "tap_shapes must be a list of three shapes"),
])
def test_a_bad_plan_field_is_one_line_naming_file_field_and_expectation(tmp_path, field, value, expected):
    path = write_plan(tmp_path, **{field: value})
    with pytest.raises(DesamError) as error:
        load_plan(tmp_path, PLANS)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_a_plan_that_is_not_an_object_or_not_json_is_named(tmp_path):
    path = plan_path(tmp_path, PLANS)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DesamError, match="expected a JSON object"):
        load_plan(tmp_path, PLANS)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(DesamError, match=rf"^{path}: invalid JSON"):
        load_plan(tmp_path, PLANS)
    path.write_text(json.dumps({k: v for k, v in valid_plan().items() if k != "encoder"}))
    with pytest.raises(DesamError, match="plan lacks keys encoder"):
        load_plan(tmp_path, PLANS)


def test_a_model_folders_plan_is_checked_the_same_way(tmp_path):
    (tmp_path / "plans.json").write_text(json.dumps({**valid_plan(), "slice_axis": 5}))
    with pytest.raises(DesamError, match=r"plans.json: slice_axis must be 0, 1 or 2, got 5$"):
        load_model(tmp_path)


def test_read_json_names_the_file_of_invalid_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DesamError, match=rf"^{path}: invalid JSON"):
        read_json(path)


def write_split(folder: Path, folds) -> Path:
    path = folder / splits.SPLITS_FILE
    path.write_text(json.dumps({"src-RUNMC": folds}), encoding="utf-8")
    return path


@pytest.mark.parametrize("folds, expected", [
    ([{"train": "RUNMC_Case00", "val": ["RUNMC_Case01"]}],
     "src-RUNMC fold 0 'train' must be a list of case ids (strings), got 'RUNMC_Case00'"),
    ([{"train": [["RUNMC_Case00"]], "val": []}], "src-RUNMC fold 0 'train' must be a list of case ids"),
    ([{"train": ["RUNMC_Case00"], "val": [1]}], "src-RUNMC fold 0 'val' must be a list of case ids"),
    ({"train": [], "val": []}, "src-RUNMC must be a list of folds"),
    ([["RUNMC_Case00"]], "src-RUNMC fold 0 needs 'train' and 'val' lists"),
])
def test_a_bad_split_is_one_line_naming_file_fold_and_expectation(tmp_path, folds, expected):
    path = write_split(tmp_path, folds)
    with pytest.raises(DesamError) as error:
        splits.load_or_create_splits(tmp_path, "src-RUNMC", CASES)
    assert str(error.value).startswith(f"{path}: ") and expected in str(error.value)
