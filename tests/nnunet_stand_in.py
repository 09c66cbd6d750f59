"""Stand-ins for nnU-Net's slow subprocess steps, shared by the baseline's tests and the accuracy miniature.

`fake_nnunet` replaces `desam_pipeline.baselines.nnunet_baseline.run_nnunet`: nnU-Net's planning and preprocessing run for
real when nnunetv2 is installed and `plan_for_real` (else a stand-in writes the plans file the baseline checks
for); training writes
the debug.json and checkpoint_final.pth nnU-Net writes (1 epoch x 250 iterations); prediction writes each case's
ground truth, or an empty mask for `empty_case`, as nnU-Net would name it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np

from desam_pipeline.baselines import nnunet_baseline
from desam_pipeline.io.atomic import write_json

NNUNET_INSTALLED = importlib.util.find_spec("nnunetv2") is not None


def fake_nnunet(raw_dir: Path, calls: list, dataset: str, empty_case: str | None = None, plan_for_real: bool = True):
    """A run_nnunet that records each call and stands in for nnU-Net's training and prediction."""
    real = nnunet_baseline.run_nnunet

    def run(name, arguments, environment):
        arguments = [str(a) for a in arguments]
        calls.append((name, arguments, environment))
        if name == "nnUNetv2_plan_and_preprocess":
            if NNUNET_INSTALLED and plan_for_real:
                return real(name, arguments, environment)
            target = Path(environment["nnUNet_preprocessed"]) / dataset
            target.mkdir(parents=True, exist_ok=True)
            write_json({"stand_in": True}, target / "nnUNetPlans.json")
            return None
        results = Path(environment["nnUNet_results"]) / dataset
        if name == "nnUNetv2_train":
            fold_dir = results / f"{arguments[arguments.index('-tr') + 1]}__nnUNetPlans__2d" / f"fold_{arguments[2]}"
            fold_dir.mkdir(parents=True)
            write_json({"num_epochs": "1", "num_iterations_per_epoch": "250", "num_val_iterations_per_epoch": "50",
                        "batch_size": "2"}, fold_dir / "debug.json")
            (fold_dir / "checkpoint_final.pth").write_bytes(b"weights")
        elif name == "nnUNetv2_predict":
            inputs, outputs = Path(arguments[arguments.index("-i") + 1]), Path(arguments[arguments.index("-o") + 1])
            outputs.mkdir(parents=True)
            for image in inputs.glob("*_0000.nii.gz"):
                case = image.name[:-len("_0000.nii.gz")]
                label = nib.load(raw_dir / "labelsTr" / f"{case}.nii.gz")
                data = np.zeros(label.shape, np.uint8) if case == empty_case else np.asarray(label.dataobj)
                nib.save(nib.Nifti1Image(data, label.affine), str(outputs / f"{case}.nii.gz"))
        return None
    return run
