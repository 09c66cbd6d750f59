"""The accuracy benchmark's arms (one table row each) and the stage commands that train and score an arm.

Every arm gets its own results root, `OUT/results/<arm>/`, so seeds and variants never share a model
folder (the folder name holds trainer, plan, mode and source, not the seed or the loss). The embedding
cache under `OUT/preprocessed/` is shared. A prediction-only arm (`base` set) copies its base arm's
trained model folder (checkpoints, plans.json, dataset.json; not predictions or evaluation) into its
own root and is only predicted and scored there.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from desam_pipeline.baselines import nnunet_baseline
from desam_pipeline.baselines.nnunet_baseline import NNUNET_CONFIGURATION, NNUNET_PLANS
from desam_pipeline.inference.prediction_cache import PREDICTIONS
from desam_pipeline.io.results_layout import CHECKPOINT_FINAL, model_folder_name
from desam_pipeline.training import train
from desam_pipeline.training.losses import DEFAULT_LOSS
from evaluation import evaluate
from evaluation.detection_tables import PER_SLICE

SOURCE = "RUNMC"
FOLD = "0"


@dataclass(frozen=True)
class Arm:
    """One row of the table: what trains it (desam_train flags, or nnU-Net) and how it is predicted."""
    name: str                      # results folder and key (--arms)
    label: str                     # row label
    family: str                    # zero-shot | coupled | desam-b | desam-p | ablation | nnunet (the comparison)
    trainer: str | None = "DeSAMTrainer"  # desam_train -tr; None: the nnU-Net baseline
    mode: str | None = "grid"
    seed: int = 0
    loss: str = DEFAULT_LOSS
    views: bool = False            # train on the cached augmented views (the others pass --no-augmented-views)
    train_flags: tuple[str, ...] = ()  # further desam_train flags (the PDMM layout)
    base: str | None = None        # prediction-only: reuse this arm's trained model
    checkpoint_name: str = "final"
    grid_rule: str = "top1"        # the published table's rule, passed explicitly (desam's default is reference)
    note: str = ""


def arm_table(seeds: int) -> list[Arm]:
    """Every arm, in table order; the DeSAM-P seeds are `desam_p_s0` .. `desam_p_s<seeds-1>`."""
    return [
        Arm("zeroshot_box", "zero-shot SAM, box", "zero-shot", "ZeroShotSAMTrainer", "box", note="no training"),
        Arm("zeroshot_grid", "zero-shot SAM, grid", "zero-shot", "ZeroShotSAMTrainer", "grid", note="no training"),
        Arm("coupled_box", "coupled fine-tuning, box", "coupled", "CoupledSAMTrainer", "box"),
        Arm("coupled_grid", "coupled fine-tuning, grid", "coupled", "CoupledSAMTrainer", "grid"),
        Arm("desam_b", "DeSAM-B", "desam-b", mode="box"),
        *[Arm(f"desam_p_s{s}", f"DeSAM-P (seed {s})", "desam-p", seed=s) for s in range(seeds)],
        Arm("loss_paper", "DeSAM-P, --loss paper", "ablation", loss="paper"),
        Arm("loss_reference", "DeSAM-P, --loss reference", "ablation", loss="reference"),
        Arm("checkpoint_best", "DeSAM-P seed 0, --checkpoint-name best", "ablation", base="desam_p_s0",
            checkpoint_name="best", note="prediction only"),
        Arm("grid_rule_reference", "DeSAM-P seed 0, --grid-rule reference", "ablation", base="desam_p_s0",
            grid_rule="reference", note="prediction only"),
        Arm("views", "DeSAM-P + augmented views", "ablation", views=True),
        Arm("pdmm_reference", "DeSAM-P, reference PDMM", "ablation", train_flags=("--pdmm", "reference"),
            note="SE gates and 1x1 head without biases"),
        Arm("nnunet", "nnU-Net v2 2d", "nnunet", trainer=None, mode=None),
    ]


@dataclass(frozen=True)
class Context:
    """The run's shared choices: trees, plan, schedule and how to call a stage."""
    out: Path
    dataset: str
    plans_name: str
    epochs: int
    batch_size: int
    lr: str
    grid: int
    nnunet_trainer: str
    sam_checkpoint: str | None
    train_slices: str
    prim_lr_scale: str
    run_stage: Callable[[Callable, str, list[str]], None]

    @property
    def raw(self) -> Path:
        return self.out / "raw"

    @property
    def preprocessed(self) -> Path:
        return self.out / "preprocessed"

    def results(self, arm: Arm) -> Path:
        return self.out / "results" / arm.name

    def roots(self, arm: Arm) -> list[str]:
        return ["--raw", str(self.raw), "--preprocessed", str(self.preprocessed), "--results", str(self.results(arm))]


def nnunet_folder_name(ctx: Context) -> str:
    return f"{ctx.nnunet_trainer}__{NNUNET_PLANS}__{NNUNET_CONFIGURATION}__src-{SOURCE}"


def model_folder(arm: Arm, ctx: Context) -> Path:
    """The folder the arm's predictions and evaluation land in (desam's model folder or nnU-Net's)."""
    if arm.trainer is None:
        return ctx.results(arm) / ctx.dataset / nnunet_folder_name(ctx)
    return ctx.results(arm) / ctx.dataset / model_folder_name(arm.trainer, ctx.plans_name, arm.mode, [SOURCE])


def train_argv(arm: Arm, ctx: Context) -> list[str]:
    """desam_train's flags for the arm (always -c: a finished fold is left alone, an interrupted one resumes)."""
    return [ctx.dataset, FOLD, "--source", SOURCE, "--mode", arm.mode, "-tr", arm.trainer,
            "--plans-name", ctx.plans_name, "--epochs", str(ctx.epochs), "--batch-size", str(ctx.batch_size),
            "--lr", ctx.lr, "--prim-lr-scale", ctx.prim_lr_scale, "--seed", str(arm.seed), "--loss", arm.loss,
            "--train-slices", ctx.train_slices,
            "--val-grid", str(ctx.grid), "--val-grid-rule", arm.grid_rule,
            "--num-workers", "0", "-c",
            *([] if arm.views else ["--no-augmented-views"]), *arm.train_flags, "--preprocessed",
            str(ctx.preprocessed), "--results", str(ctx.results(arm))]


def evaluate_argv(arm: Arm, ctx: Context) -> list[str]:
    """desam_evaluate's flags: both protocols, fold 0, the arm's checkpoint and grid rule."""
    common = ["-d", ctx.dataset, "--source", SOURCE, "--protocol", "full", "paper", *ctx.roots(arm)]
    if arm.trainer is None:
        return [*common, "--model-folder", nnunet_folder_name(ctx)]
    return [*common, "--mode", arm.mode, "-tr", arm.trainer, "--plans-name", ctx.plans_name, "-f", FOLD,
            "--grid", str(ctx.grid), "--checkpoint-name", arm.checkpoint_name, "--grid-rule", arm.grid_rule,
            *(["--checkpoint", ctx.sam_checkpoint] if ctx.sam_checkpoint else [])]


def nnunet_argv(ctx: Context, arm: Arm) -> list[str]:
    return ["-d", ctx.dataset, "--source", SOURCE, "-f", FOLD, "-tr", ctx.nnunet_trainer,
            "-c", NNUNET_CONFIGURATION, "-p", NNUNET_PLANS, *ctx.roots(arm)]


def train_arm(arm: Arm, ctx: Context) -> None:
    """Train the arm's fold unless its final checkpoint and validation are there already."""
    fold = model_folder(arm, ctx) / f"fold_{FOLD}"
    if (fold / CHECKPOINT_FINAL).is_file() and (fold / "validation" / "summary.json").is_file():
        print(f"  {arm.name}: fold {FOLD} already trained ({fold})", flush=True)
        return
    ctx.run_stage(train.main, "desam_train", train_argv(arm, ctx))


def copy_trained_model(base: Arm, arm: Arm, ctx: Context) -> None:
    """The base arm's model folder without its predictions and evaluation, into the arm's own root."""
    shutil.copytree(model_folder(base, ctx), model_folder(arm, ctx), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(PREDICTIONS, evaluate.EVALUATION))


def score_arm(arm: Arm, ctx: Context) -> None:
    """desam_evaluate on the arm's model (saved predictions are reused) under both protocols."""
    ctx.run_stage(evaluate.main, "desam_evaluate", evaluate_argv(arm, ctx))


def scored_with_detection(arm: Arm, ctx: Context) -> bool:
    """Whether the arm's full evaluation has the per-slice rows (scored since slice detection exists)."""
    return (model_folder(arm, ctx) / evaluate.EVALUATION / "full" / PER_SLICE).is_file()


def run_arm(arm: Arm, ctx: Context, arms: dict[str, Arm]) -> None:
    """Train (or reuse) and score one arm under both protocols."""
    if arm.trainer is None:
        ctx.run_stage(nnunet_baseline.main, "desam_nnunet_baseline", nnunet_argv(ctx, arm))
    elif arm.base is not None:
        base = arms[arm.base]
        train_arm(base, ctx)
        copy_trained_model(base, arm, ctx)
    else:
        train_arm(arm, ctx)
    score_arm(arm, ctx)


def describe(arm: Arm, ctx: Context) -> str:
    """The arm's stage flags in short, for the progress output and the table's key."""
    if arm.trainer is None:
        return (f"desam_nnunet_baseline -tr {ctx.nnunet_trainer} -c {NNUNET_CONFIGURATION} -f {FOLD}; "
                f"desam_evaluate --model-folder {nnunet_folder_name(ctx)}")
    scored = f"desam_evaluate --checkpoint-name {arm.checkpoint_name} --grid-rule {arm.grid_rule}"
    if arm.base:
        return f"the trained model of {arm.base}; {scored}"
    flags = [f"-tr {arm.trainer}", f"--mode {arm.mode}", f"--seed {arm.seed}", f"--loss {arm.loss}",
             f"--train-slices {ctx.train_slices}", f"--val-grid {ctx.grid}", f"--val-grid-rule {arm.grid_rule}",
             *([] if arm.views else ["--no-augmented-views"]), *arm.train_flags]
    return f"desam_train {' '.join(flags)}; {scored}"
