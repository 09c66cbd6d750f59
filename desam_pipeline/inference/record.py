"""`prediction.json` beside the outputs of desam_predict: which model, folds, checkpoint and rules made them.

A folder of masks says nothing about how it was made; this record does, so a result can be traced
to the `final` or `best` checkpoint and to the grid rule and post-processing that produced it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from desam_pipeline.data.orientation import plan_orientation
from desam_pipeline.inference.predictor import Model, Settings, checkpoint_file
from desam_pipeline.io.atomic import write_json
from desam_pipeline.network import encoders

RECORD_FILE = "prediction.json"


def describe(model: Model, settings: Settings) -> dict:
    """The choices a prediction depends on: model folder, mode, folds, checkpoint, orientation, the encoder's
    runtime (torch or onnxruntime, `encoders.runtime`), settings."""
    chosen = {k: v for k, v in dataclasses.asdict(settings).items()
              if k not in ("device", "batch_size", "skip_existing", "save_probabilities")}
    return {"model_folder": str(Path(model.folder).resolve()), "mode": model.mode, "folds": list(model.folds),
            "checkpoint_name": model.checkpoint_name, "checkpoint_file": checkpoint_file(model.checkpoint_name),
            "slice_orientation": plan_orientation(model.plan),
            "encoder_runtime": encoders.runtime(encoders.family(model.plan["encoder"]), settings.device,
                                                settings.precision), **chosen}


def write_record(out_dir: str | Path, model: Model, settings: Settings) -> Path:
    """Write `<out_dir>/prediction.json` (atomically) and return its path."""
    target = Path(out_dir) / RECORD_FILE
    write_json(describe(model, settings), target)
    return target
