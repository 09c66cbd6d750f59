"""`DeSAMJointTrainer`: one DeSAM for every structure of a multi-structure dataset (`desam_train -tr
DeSAMJointTrainer`, no `--label`), against one DeSAM per structure (`--label`, the default way).

PRIM and PDMM are shared; PRIM's prompt carries a learned token per structure (`network.prim`), so a click
asks for "the structure of this label here" and the IoU head scores that structure. Each training sample is
drawn for one structure (`data.slice_data.SliceDataset` with several `structures`): the balanced draw takes
every (structure, slice with it) once with a click on it, and as many clicks off the object for a structure
drawn uniformly, so an epoch is as long as the per-structure models' epochs together. The final validation
scores each structure on its own (masks in validation/label_<value>/, `summary.json` per structure) and
calibrates each structure's gate. Prediction reads the fold as one network per structure (`for_structure`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from desam_pipeline.io.results_layout import class_folder
from desam_pipeline.network import DeSAM
from desam_pipeline.training import validation
from desam_pipeline.training.trainer import DeSAMTrainer
from desam_pipeline.utilities.errors import DesamError


class DeSAMJointTrainer(DeSAMTrainer):
    """DeSAMTrainer on a joint DeSAM for all the plan's structures (`label_classes`)."""

    def training_structures(self) -> list[int]:
        classes = self.plan.get("label_classes") or {}
        if len(classes) < 2:
            raise DesamError(f"plan {self.plans_name} has one structure; {type(self).__name__} is for datasets "
                             f"with several (train DeSAMTrainer)")
        if self.settings.label is not None:
            raise DesamError(f"{type(self).__name__} trains every structure at once; drop --label")
        return sorted(int(v) for v in classes.values())

    def structure_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"structures": batch["structure"].to(self.device)}

    def validated_structures(self) -> list[tuple[int, torch.nn.Module, Path]]:
        out_dir = self.fold_dir / validation.VALIDATION
        return [(value, self.network.for_structure(value), class_folder(out_dir, value)) for value in self.structures]

    def build_network(self) -> DeSAM:
        return DeSAM.from_sam_checkpoint(self.plan["checkpoint"], self.plan["encoder"], self.plan["tap_shapes"],
                                         pdmm=self.settings.pdmm, structures=self.structures)
