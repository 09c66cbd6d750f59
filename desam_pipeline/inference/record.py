"""`prediction.json` beside the outputs of desam_predict: which model, folds, checkpoint and rules made them.

A folder of masks says nothing about how it was made; this record does, so a result can be traced
to the `final` or `best` checkpoint and to the grid rule and post-processing that produced it.
"""
from __future__ import annotations

from pathlib import Path

from desam_pipeline.data.orientation import plan_orientation
from desam_pipeline.inference.model import Model, checkpoint_file, gate_thresholds
from desam_pipeline.inference.predictor import PredictionRun
from desam_pipeline.io.atomic import write_json
from desam_pipeline.network import encoders

RECORD_FILE = "prediction.json"


def describe(model: Model, run: PredictionRun) -> dict:
    """The choices a prediction depends on: model folder, mode, folds, checkpoint, orientation, precision, the
    encoder's runtime (torch or onnxruntime, `encoders.runtime`), settings, and in grid mode the IoU threshold each
    structure's folds gate with (`--iou-threshold calibrated` resolves to each fold's own)."""
    return {"model_folder": str(Path(model.folder).resolve()), "mode": model.mode, "folds": list(model.folds),
            "checkpoint_file": checkpoint_file(model.checkpoint_name), "slice_orientation": plan_orientation(model.plan),
            "precision": run.precision,
            "encoder_runtime": encoders.runtime(encoders.family(model.plan["encoder"]), run.device, run.precision),
            **run.settings.choices(),
            **({"gate_thresholds": gate_thresholds(model, run.settings)} if model.mode == "grid" else {})}


def write_record(out_dir: str | Path, model: Model, run: PredictionRun) -> Path:
    """Write `<out_dir>/prediction.json` (atomically) and return its path."""
    target = Path(out_dir) / RECORD_FILE
    write_json(describe(model, run), target)
    return target
