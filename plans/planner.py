"""The plan: every choice of the embedding cache, written once as `<preprocessed>/<Dataset>/<plans_name>.json`.

Later stages read their choices from the plan (through desam_pipeline.data.plan_io, the plan's schema) and
re-derive nothing. The encoder family, the
tapped blocks and the shapes of the cached features come from the built encoder, so every
encoder gets its own.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from desam_pipeline.data.orientation import ORIENTATIONS
from desam_pipeline.data.plan_io import DEFAULT_CHOICES, load_plan, plan_path
from desam_pipeline.data.slice_selection import SLICE_MODES
from desam_pipeline.io.atomic import write_json
from desam_pipeline.network import encoders
from desam_pipeline.utilities.errors import DesamError

DEFAULT_ENCODER = "vit_h"  # the paper's
OFFICIAL_CHECKPOINTS = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth",
                        "vit_b": "sam_vit_b_01ec64.pth"}


def default_choices(encoder: str) -> dict:
    """DEFAULT_CHOICES with the CPU precision of the encoder's family."""
    return {**DEFAULT_CHOICES,
            "precision": {**DEFAULT_CHOICES["precision"], "cpu": encoders.family(encoder).cpu_precision}}


def make_plan(plans_name: str, encoder: str, checkpoint: str | os.PathLike, checkpoint_sha256: str,
              image_encoder: nn.Module, base: dict | None = None, **choices) -> dict:
    """A plan for this encoder and checkpoint.

    Each choice (keys of DEFAULT_CHOICES) comes from `choices` when given, else from `base`
    (an existing plan, so a re-run keeps its choices), else from the encoder's defaults.
    """
    unknown = set(choices) - set(DEFAULT_CHOICES)
    if unknown:
        raise ValueError(f"unknown plan choices {sorted(unknown)}")
    base = base or {}
    picked = {key: choices.get(key) if choices.get(key) is not None else base.get(key, default)
              for key, default in default_choices(encoder).items()}
    shapes = encoders.feature_shapes(image_encoder)
    if picked["slices"] not in SLICE_MODES:
        raise DesamError(f"unknown slice selection {picked['slices']!r}; choose one of {', '.join(SLICE_MODES)}")
    if picked["slice_orientation"] not in ORIENTATIONS:
        raise DesamError(f"unknown slice orientation {picked['slice_orientation']!r}; "
                         f"choose one of {', '.join(ORIENTATIONS)}")
    return {
        "plans_name": plans_name,
        "encoder": encoder,
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": checkpoint_sha256,
        "family": encoders.family(encoder).name,
        "tap_blocks": encoders.tap_blocks(image_encoder),
        "tap_shapes": [list(shape) for name, shape in shapes.items() if name != "neck"],
        "neck_shape": list(shapes["neck"]),
        **picked,
    }


def plan_differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every key whose value differs."""
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def save_plan(plan: dict, preprocessed_dataset_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the plan once: an existing plan with other choices is an error unless `overwrite`."""
    path = plan_path(preprocessed_dataset_dir, plan["plans_name"])
    if path.is_file():
        changes = plan_differences(load_plan(preprocessed_dataset_dir, plan["plans_name"]), plan)
        if not changes:
            return path
        if not overwrite:
            raise DesamError(f"{path}: plan exists with other choices ({'; '.join(changes)}); "
                             f"pass --overwrite or a new --plans-name")
    write_json(plan, path)
    return path
