"""The plan's schema, shared by every stage: its file name, required keys, defaults, hash and loading.

The planner (plans/planner.py) writes plans; training, prediction and evaluation read them
through this module, so the core never imports the planning stage.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from desam_pipeline.data.orientation import DEFAULT_ORIENTATION
from desam_pipeline.data.preprocessing import SLICE_AXIS, SLICE_SIZE
from desam_pipeline.io.atomic import read_json
from desam_pipeline.io.safe_names import check_name
from desam_pipeline.utilities.errors import DesamError

DEFAULT_CHOICES = {
    "slice_axis": SLICE_AXIS,
    "slice_orientation": DEFAULT_ORIENTATION,
    "slice_size": SLICE_SIZE,
    "intensity": {"low_percentile": 0.5, "high_percentile": 99.5},
    "slices": "foreground_margin",
    "slice_margin": 2,
    "cache_dtype": "float16",
    # On CPU a batch of 2 is no faster and doubles the attention buffers (vit_b: 5M page faults per 4 slices).
    "batch_size": {"cpu": 1, "cuda": 4},
    # cpu: the encoder family's (see encoders.FAMILIES), set by plans.planner.default_choices
    "precision": {"cpu": "bf16", "cuda": "bf16"},
}
# Plans written before `slice_orientation` existed lack it and keep the orientation they were embedded
# with (see orientation.plan_orientation); re-planning writes it and re-embeds.
REQUIRED_KEYS = ("plans_name", "encoder", "family", "checkpoint", "checkpoint_sha256", "tap_blocks", "tap_shapes",
                 "neck_shape", *(key for key in DEFAULT_CHOICES if key != "slice_orientation"))
# Keys that do not change the cached values: renaming, moving the checkpoint or changing the
# batch size leaves every cached case valid.
NOT_HASHED = ("plans_name", "checkpoint", "batch_size")


def default_plans_name(encoder: str) -> str:
    return f"DeSAMPlans_{encoder}"


def plan_path(preprocessed_dataset_dir: str | os.PathLike, plans_name: str) -> Path:
    """`<plans_name>.json`; the name must be a plain name (it also names the cache and the model folders)."""
    return Path(preprocessed_dataset_dir) / f"{check_name(plans_name, 'plans name')}.json"


def plan_hash(plan: dict) -> str:
    """sha256 of the choices that determine the cached values (see NOT_HASHED), canonical JSON."""
    content = {key: value for key, value in plan.items() if key not in NOT_HASHED}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def load_plan(preprocessed_dataset_dir: str | os.PathLike, plans_name: str) -> dict:
    """Read a plan, with one-line errors for a missing, unreadable or incomplete file."""
    path = plan_path(preprocessed_dataset_dir, plans_name)
    if not path.is_file():
        raise DesamError(f"{path}: plan not found; run desam_plan_and_embed first (or pass the right plans name)")
    try:
        plan = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DesamError(f"{path}: invalid JSON ({exc})") from exc
    missing = [key for key in REQUIRED_KEYS if key not in plan]
    if missing:
        raise DesamError(f"{path}: plan lacks keys {', '.join(missing)}")
    return plan
