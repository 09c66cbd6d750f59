"""`desam_train DATASET FOLD`: train DeSAM on one fold of the source domains from the embedding cache.

Under torchrun (`torchrun --nproc-per-node N -m desam_pipeline.training.train DATASET FOLD ...`) it joins
the process group torchrun describes (gloo on CPU, nccl on CUDA) and trains with
DistributedDataParallel; see `desam_pipeline.training.trainer`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from desam_pipeline.io.atomic import read_json
from desam_pipeline.io.results_layout import DEFAULT_TRAINER
from desam_pipeline.training.registry import trainer_class, trainer_classes
from desam_pipeline.training.settings import TrainingSettings
from desam_pipeline.utilities.distributed import process_group
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.paths import Trees, add_root_arguments
from desam_pipeline.utilities.runtime import select_device
from desam_pipeline.utilities.setting_flags import add_setting_flags, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desam_train", description="Train DeSAM (PRIM + PDMM) on cached SAM features for one fold.")
    add_setting_flags(parser, TrainingSettings, names=["device"])
    parser.add_argument("dataset", help="dataset number or DatasetNNN_Name")
    parser.add_argument("fold", help="fold 0-4, or 'all' (train on every source case, no validation)")
    parser.add_argument("--source", nargs="+", metavar="SITE", default=None,
                        help="source domain(s) to train on (default: all domains)")
    parser.add_argument("-tr", "--trainer", default=DEFAULT_TRAINER, metavar="NAME",
                        help=f"trainer class, which also names the model folder (default {DEFAULT_TRAINER}; "
                             f"built in: {', '.join(trainer_classes())}; ZeroShotSAMTrainer trains 0 epochs)")
    add_setting_flags(parser, TrainingSettings, names=["mode"])
    parser.add_argument("--plans-name", default=None,
                        help="plan to train on (default: the only plan of the dataset)")
    add_setting_flags(parser, TrainingSettings, exclude=["device", "mode", "num_workers"])
    restart = parser.add_mutually_exclusive_group()
    restart.add_argument("-c", "--continue", dest="continue_training", action="store_true",
                         help="resume from the newest checkpoint of this fold (a finished fold: nothing to do)")
    restart.add_argument("--overwrite", action="store_true",
                         help="train a finished fold again from scratch, removing its checkpoints first")
    parser.add_argument("--val-only", action="store_true",
                        help="only run the final validation of checkpoint_final.pth")
    add_setting_flags(parser, TrainingSettings, names=["num_workers"])
    add_root_arguments(parser, "preprocessed", "results")
    return parser


def find_plans_name(preprocessed_dir: Path, requested: str | None) -> str:
    """The requested plan, or the dataset's only plan; several plans need --plans-name."""
    if requested:
        return requested
    plans = sorted(p.stem for p in preprocessed_dir.glob("*.json") if _is_plan(p))
    if len(plans) == 1:
        return plans[0]
    if not plans:
        raise DesamError(f"{preprocessed_dir}: no plan; run desam_plan_and_embed first")
    raise DesamError(f"{preprocessed_dir}: several plans ({', '.join(plans)}); choose one with --plans-name")


def _is_plan(path: Path) -> bool:
    try:
        content = read_json(path)
    except DesamError:
        return False
    return isinstance(content, dict) and content.get("plans_name") == path.stem


def join_backend(device_choice: str) -> str:
    """The process-group backend: nccl for CUDA ranks (each set to its local rank's GPU), gloo for CPU."""
    device = select_device(device_choice)
    if device.type != "cuda":
        return "gloo"
    torch.cuda.set_device(device)
    return "nccl"


def run(args: argparse.Namespace) -> None:
    trainer_cls = trainer_class(args.trainer)
    trees = Trees(args.dataset, preprocessed=args.preprocessed, results=args.results)
    preprocessed = trees.preprocessed
    if not preprocessed.is_dir():
        raise DesamError(f"{preprocessed}: not found; run desam_plan_and_embed -d {args.dataset} first")
    trainer = trainer_cls(preprocessed, trees.results, find_plans_name(preprocessed, args.plans_name), args.fold,
                          sources=args.source, settings=settings_from_args(TrainingSettings, args))
    if args.val_only:
        trainer.run_validation_only()
    else:
        trainer.run_training(continue_training=args.continue_training, overwrite=args.overwrite)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with process_group(join_backend(args.device), timeout=None):
        run(args)
    return 0


if __name__ == "__main__":
    main()
