"""The plan's schema, shared by every stage: its file name, required keys, field rules, defaults, hash and loading.

The planner (plans/planner.py) writes plans; training, prediction and evaluation read them
through this module, so the core never imports the planning stage.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

from desam_pipeline.data.orientation import DEFAULT_ORIENTATION, ORIENTATIONS
from desam_pipeline.data.preprocessing import SLICE_AXIS, SLICE_SIZE
from desam_pipeline.data.slice_selection import SLICE_MODES
from desam_pipeline.io.atomic import read_json
from desam_pipeline.io.nifti_io import file_sha256
from desam_pipeline.io.safe_names import check_name
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.runtime import PRECISIONS

DEFAULT_CHOICES = {
    "slice_axis": SLICE_AXIS,
    "slice_orientation": DEFAULT_ORIENTATION,
    "slice_size": SLICE_SIZE,
    "intensity": {"low_percentile": 0.5, "high_percentile": 99.5},
    "slices": "all",
    "slice_margin": 2,
    "cache_dtype": "float16",
    # On CPU a batch of 2 is no faster and doubles the attention buffers (vit_b: 5M page faults per 4 slices).
    "batch_size": {"cpu": 1, "cuda": 4},
    # cpu: the encoder family's (see encoders.FAMILIES), set by plans.planner.default_choices
    "precision": {"cpu": "bf16", "cuda": "bf16"},
    # "resize" or "spacing"; the planner turns "spacing" into {"rule": "spacing", "spacing_mm": ...} from the
    # fingerprint of the planned sites (see data.preprocessing.slice_frame)
    "in_plane": {"rule": "resize"},
}
# Choices that plans written before them lack; readers fall back to what those plans did.
LATER_CHOICES = ("slice_orientation", "in_plane")
# Plans written before `slice_orientation` or `in_plane` existed lack them and keep what they were embedded
# with (see orientation.plan_orientation, preprocessing.in_plane); re-planning writes them and re-embeds.
REQUIRED_KEYS = ("plans_name", "encoder", "family", "checkpoint", "checkpoint_sha256", "tap_blocks", "tap_shapes",
                 "neck_shape", *(key for key in DEFAULT_CHOICES if key not in LATER_CHOICES))
# Optional keys, written only where they apply, so other plans (and their hashes) stay as they were:
# intensity.windows (modality -> fixed [low, high], CT), label_classes (name -> value, several structures) and
# augmented_views (cached intensity-augmented views of the source cases; its `kind` only when not "nnunet").
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_ints(value) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(v) and v > 0 for v in value)


def _per_device(test) -> Callable[[object], bool]:
    return lambda value: isinstance(value, dict) and set(DEVICE_TYPES) <= set(value) and \
        all(test(value[kind]) for kind in DEVICE_TYPES)


def _window(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value) and value[0] < value[1]


def _percentiles(value) -> bool:
    return isinstance(value, dict) and all(_is_number(value.get(k)) for k in ("low_percentile", "high_percentile")) \
        and 0 <= value["low_percentile"] < value["high_percentile"] <= 100 \
        and (isinstance(value.get("windows", {}), dict) and all(_window(w) for w in value.get("windows", {}).values()))


# Augmented view kinds (see data.augmented_views): nnU-Net's intensity transforms, SLAug's global and local
# location-scale augmentation (random intensity curves, per label class in the local views), or nnU-Net's
# scaling (a zoom per slice; the only kind that moves pixels, so its views cache their own labels).
VIEW_KINDS = ("nnunet", "location_scale", "scale")
DEFAULT_VIEW_KIND = "nnunet"


def _views(value) -> bool:
    return isinstance(value, dict) and _is_int(value.get("count")) and value["count"] > 0 \
        and _is_int(value.get("seed")) and value.get("kind", DEFAULT_VIEW_KIND) in VIEW_KINDS \
        and (value.get("sites") is None or (isinstance(value["sites"], list)
                                            and all(isinstance(site, str) for site in value["sites"])))


def _classes(value) -> bool:
    return isinstance(value, dict) and len(value) > 1 and all(_is_int(v) and 0 < v < 256 for v in value.values())


DEVICE_TYPES = ("cpu", "cuda")
CACHE_DTYPES = ("float16", "float32")
# field -> (what it must be, test): every field the later stages read, checked where the plan is read.
FIELD_RULES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "plans_name": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "encoder": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "family": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "checkpoint": ("the path of the SAM checkpoint, a string", lambda v: isinstance(v, str) and bool(v)),
    "checkpoint_sha256": ("64 hexadecimal digits",
                          lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)),
    "tap_blocks": ("a list of block indices", lambda v: isinstance(v, list) and all(_is_int(b) for b in v)),
    "tap_shapes": ("a list of three shapes (lists of positive integers)",
                   lambda v: isinstance(v, list) and len(v) == 3 and all(_positive_ints(t) for t in v)),
    "neck_shape": ("a shape (a list of positive integers)", _positive_ints),
    "slice_axis": ("0, 1 or 2", lambda v: _is_int(v) and 0 <= v <= 2),
    "slice_orientation": (f"one of {', '.join(ORIENTATIONS)}", lambda v: v in ORIENTATIONS),
    "slice_size": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "intensity": ("an object with low_percentile < high_percentile, both in 0..100, and optional windows "
                  "(modality -> [low, high])", _percentiles),
    "label_classes": ("an object of two or more class name -> value (1..255)", _classes),
    "augmented_views": (f"an object with count >= 1, seed, sites (a list or null) and kind (one of "
                        f"{', '.join(VIEW_KINDS)})", _views),
    "slices": (f"one of {', '.join(SLICE_MODES)}", lambda v: v in SLICE_MODES),
    "slice_margin": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "cache_dtype": (f"one of {', '.join(CACHE_DTYPES)}", lambda v: v in CACHE_DTYPES),
    "batch_size": ("an object with a positive integer for cpu and cuda", _per_device(lambda v: _is_int(v) and v > 0)),
    "precision": (f"an object with one of {', '.join(PRECISIONS)} for cpu and cuda",
                  _per_device(lambda v: v in PRECISIONS)),
}


def plan_problems(plan: object) -> list[str]:
    """What is wrong with a plan's content: missing keys, then each field of the wrong type or value."""
    if not isinstance(plan, dict):
        return [f"expected a JSON object (the plan), got {type(plan).__name__}"]
    missing = [key for key in REQUIRED_KEYS if key not in plan]
    if missing:
        return [f"plan lacks keys {', '.join(missing)}"]
    return [f"{key} must be {expected}, got {plan[key]!r}" for key, (expected, test) in FIELD_RULES.items()
            if key in plan and not test(plan[key])]


def read_plan_file(path: str | os.PathLike) -> dict:
    """A plan file (a dataset's `<plans_name>.json` or a model folder's plans.json), every field checked:
    a one-line DesamError names the file, the field and what it must be."""
    plan = read_json(path)
    problems = plan_problems(plan)
    if problems:
        raise DesamError(f"{path}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return plan


def load_plan(preprocessed_dataset_dir: str | os.PathLike, plans_name: str) -> dict:
    """Read a plan, with one-line errors for a missing, unreadable or invalid file."""
    path = plan_path(preprocessed_dataset_dir, plans_name)
    if not path.is_file():
        raise DesamError(f"{path}: plan not found; run desam_plan_and_embed first (or pass the right plans name)")
    return read_plan_file(path)


def verify_sam_checkpoint(plan: dict, checkpoint: str | os.PathLike | None = None, missing_hint: str = "") -> Path:
    """The SAM checkpoint given (else the plan's), which must be the file the plan was made with (by sha256).

    Training starts PRIM from its decoder and prediction runs its encoder: either way it must be the SAM
    whose features are cached. `missing_hint` says how to supply the file when the plan's is gone.
    """
    path = Path(plan["checkpoint"] if checkpoint is None else checkpoint)
    if not path.is_file():
        what = "the plan's SAM checkpoint is not there" if checkpoint is None else "SAM checkpoint not found"
        raise DesamError(f"{path}: {what}; {missing_hint + ' ' if missing_hint else ''}(the {plan['encoder']} "
                         f"file with sha256 {plan['checkpoint_sha256'][:12]}...)")
    digest = file_sha256(path)
    if digest != plan["checkpoint_sha256"]:
        raise DesamError(f"{path}: sha256 {digest[:12]}... differs from the plan's checkpoint_sha256 "
                         f"{plan['checkpoint_sha256'][:12]}...; this is not the SAM checkpoint the cache was made with")
    return path


def check_structure(plan: dict, label: int | None, plans_name: str) -> None:
    """A plan with several structures (`label_classes`) trains one at a time (`--label`), a binary plan none."""
    classes = plan.get("label_classes") or {}
    values = ", ".join(f"{value} {name}" for name, value in classes.items())
    if classes and label not in classes.values():
        raise DesamError(f"plan {plans_name} has several structures ({values}); train each with --label VALUE"
                         + (f" ({label} is none of them)" if label is not None else ""))
    if not classes and label is not None:
        raise DesamError(f"plan {plans_name} has one structure (label > 0); --label is for datasets with several")
