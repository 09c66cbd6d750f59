"""`make demo`: the whole DeSAM pipeline on the offline six-site phantom, reusing finished stages.

phantom -> convert -> verify -> plan and embed (source site) -> train one fold in grid mode
-> evaluate on the other sites (full protocol) -> source x target report. Trees go under
./desam_data/ unless DESAM_RAW / DESAM_PREPROCESSED / DESAM_RESULTS are set. With
DESAM_SAM_CHECKPOINT pointing at an official SAM .pth, that encoder replaces the tiny one.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from dataset_conversion import convert_prostate_multisite, make_phantom
from desam_pipeline import dataset_checks, plan_and_embed, train
from desam_pipeline.errors import DesamError, cli_entry
from desam_pipeline.paths import ROOT_VARIABLES, dataset_name
from desam_pipeline.results_layout import DEFAULT_TRAINER, model_folder_name
from desam_pipeline.sam_models import detect_encoder, read_state_dict
from evaluation import evaluate, report

DATA_DIR = Path("desam_data")
DATASET_ID = 1
DATASET = dataset_name(DATASET_ID, convert_prostate_multisite.DEFAULT_NAME)
SOURCE = "RUNMC"
CASES_PER_SITE = 3
EPOCHS = 5
BATCH_SIZE = 4
LR = "1e-3"  # 10x the paper's, for a 5-epoch run
GRID = 3
FOLD = "0"


def demo_roots() -> dict[str, Path]:
    """The three roots: the environment's, else folders under ./desam_data/ (exported for the stages)."""
    roots = {}
    for kind, variable in ROOT_VARIABLES.items():
        value = os.environ.get(variable) or str((DATA_DIR / kind).resolve())
        os.environ[variable] = value
        roots[kind] = Path(value)
    return roots


def encoder_choice() -> tuple[str, list[str]]:
    """(encoder, extra plan_and_embed flags): the official checkpoint if given, else the tiny random SAM."""
    checkpoint = os.environ.get("DESAM_SAM_CHECKPOINT")
    if not checkpoint:
        print("NOTE: no DESAM_SAM_CHECKPOINT given, so the demo uses the TINY RANDOMLY INITIALISED SAM encoder.\n"
              "      Its numbers demonstrate that the pipeline runs end to end, not DeSAM's accuracy.")
        return "tiny", []
    encoder = detect_encoder(read_state_dict(checkpoint), checkpoint)
    print(f"using the official SAM checkpoint {checkpoint} ({encoder})")
    return encoder, ["--checkpoint", checkpoint]


def run(main: Callable, command: str, argv: list[str]) -> None:
    """Run one stage's command-line entry in this process, echoing the equivalent shell command."""
    print(f"\n$ {command} {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    try:
        main(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise DesamError(f"stage '{command}' failed (exit {exc.code}); see its message above") from exc
    print(f"  ({command}: {time.perf_counter() - start:.1f} s)")


def model_folder(results: Path, plans_name: str) -> Path:
    return results / DATASET / model_folder_name(DEFAULT_TRAINER, plans_name, "grid", [SOURCE])


@cli_entry
def main() -> int:
    start = time.perf_counter()
    roots = demo_roots()
    encoder, checkpoint_flags = encoder_choice()
    plans_name = f"DeSAMPlans_{encoder}"
    phantom = DATA_DIR.resolve() / "phantom"
    if not (phantom / "phantom.json").is_file():
        run(make_phantom.main, "desam_make_phantom", [str(phantom), "--cases-per-site", str(CASES_PER_SITE)])
    if not (roots["raw"] / DATASET / "dataset.json").is_file():
        run(convert_prostate_multisite.main, "desam_convert_prostate_multisite", [str(phantom), "-d", str(DATASET_ID)])
    run(dataset_checks.main, "desam_verify_dataset", ["-d", str(DATASET_ID)])
    run(plan_and_embed.main, "desam_plan_and_embed",
        ["-d", str(DATASET_ID), "--encoder", encoder, *checkpoint_flags, "--domains", SOURCE])
    model = model_folder(roots["results"], plans_name)
    if not (model / f"fold_{FOLD}" / "checkpoint_final.pth").is_file():
        resume = ["-c"] if (model / f"fold_{FOLD}" / "checkpoint_latest.pth").is_file() else []
        run(train.main, "desam_train", [str(DATASET_ID), FOLD, "--source", SOURCE, "--mode", "grid",
                                        "--plans-name", plans_name, "--epochs", str(EPOCHS),
                                        "--batch-size", str(BATCH_SIZE), "--lr", LR, *resume])
    run(evaluate.main, "desam_evaluate", ["-d", str(DATASET_ID), "--source", SOURCE, "--mode", "grid",
                                          "--plans-name", plans_name, "--protocol", "full", "-f", FOLD,
                                          "--grid", str(GRID), *checkpoint_flags])
    run(report.main, "desam_report", ["-d", str(DATASET_ID), "--mode", "grid", "--protocol", "full"])
    print_results(model, roots["results"])
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    return 0


def print_results(model: Path, results: Path) -> None:
    """The per-site Dice/HD95 table, a diagnosis when every volume came out empty, and the output paths."""
    evaluation = model / "evaluation" / "full"
    per_case = pd.read_csv(evaluation / "per_case.csv")
    table = per_case.groupby("site").agg(cases=("case", "size"), dice=("dice", "mean"), hd95_mm=("hd95", "mean"),
                                         hd95_cases=("hd95", "count"), predicted_iou=("mean_predicted_iou", "mean"))
    print(f"\nPer-site results (source {SOURCE}, grid mode, full protocol: every slice, original geometry; "
          f"mean over cases, HD95 over the cases where it is defined)")
    print(table.round(3).to_string())
    if (per_case["dice"] == 0).all() and per_case["hd95"].isna().all():
        print(empty_prediction_note(model, per_case["mean_predicted_iou"].mean()))
    print("\nFiles:")
    for path in [evaluation / "per_case.csv", evaluation / "per_site.csv", evaluation / "summary.json",
                 *sorted(evaluation.glob("*.png")), evaluation / "overlays",
                 *sorted((results / DATASET / "report").glob("*/*"))]:
        print(f"  {path}")


def empty_prediction_note(model: Path, predicted_iou: float) -> str:
    """Why every mask is empty: grid mode keeps a slice only when the IoU head rates a point above 0.5."""
    history = torch.load(model / f"fold_{FOLD}" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=True)["history"]
    return (f"\nNOTE: every volume was predicted empty. In grid mode a slice is segmented only when PRIM's IoU "
            f"head rates a grid point above 0.5 (--iou-threshold). After {EPOCHS} epochs on a random encoder, "
            f"the best point of a slice is rated {predicted_iou:.2f} on average, so none passes. The mask branch learned: "
            f"the last validation Dice during training (cached slices, a point drawn from the ground truth) was "
            f"{history['val_dice'][-1]:.3f} (fold_{FOLD}/training_log.txt). A real SAM checkpoint "
            f"(DESAM_SAM_CHECKPOINT) and the 50-epoch schedule are what DeSAM's IoU head needs.")


if __name__ == "__main__":
    sys.exit(main())
