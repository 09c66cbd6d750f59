"""`desam_train DATASET FOLD`: train DeSAM on one fold of the source domains from the embedding cache.

Under torchrun (`torchrun --nproc-per-node N -m desam_pipeline.training.train DATASET FOLD ...`) it joins
the process group torchrun describes (gloo on CPU, nccl on CUDA) and trains with
DistributedDataParallel; see `desam_pipeline.training.trainer`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from desam_pipeline.data.slice_data import SAMPLINGS
from desam_pipeline.data.slice_selection import SLICE_MODES
from desam_pipeline.io.atomic import read_json
from desam_pipeline.io.results_layout import DEFAULT_TRAINER
from desam_pipeline.network.pdmm import LAYOUTS
from desam_pipeline.training.losses import LOSS_WEIGHTS, LOSSES
from desam_pipeline.training.registry import trainer_class, trainer_classes
from desam_pipeline.training.trainer import MODES
from desam_pipeline.utilities.distributed import process_group
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.paths import Trees, add_root_arguments
from desam_pipeline.utilities.runtime import PRECISIONS, device_parser, select_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desam_train", description="Train DeSAM (PRIM + PDMM) on cached SAM features for one fold.",
        parents=[device_parser()])
    parser.add_argument("dataset", help="dataset number or DatasetNNN_Name")
    parser.add_argument("fold", help="fold 0-4, or 'all' (train on every source case, no validation)")
    parser.add_argument("--source", nargs="+", metavar="SITE", default=None,
                        help="source domain(s) to train on (default: all domains)")
    parser.add_argument("-tr", "--trainer", default=DEFAULT_TRAINER, metavar="NAME",
                        help=f"trainer class, which also names the model folder (default {DEFAULT_TRAINER}; "
                             f"built in: {', '.join(trainer_classes())}; ZeroShotSAMTrainer trains 0 epochs)")
    parser.add_argument("--mode", choices=MODES, default="grid",
                        help="grid: one sampled point per slice + IoU loss (DeSAM-P); box: whole-image box (DeSAM-B)")
    parser.add_argument("--plans-name", default=None,
                        help="plan to train on (default: the only plan of the dataset)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch size (split over DDP ranks)")
    parser.add_argument("--lr", type=float, default=1e-4, help="initial Adam learning rate (poly decay 0.9)")
    parser.add_argument("--loss", choices=LOSSES, default="paper",
                        help="paper: soft Dice + BCE + L1 IoU, weights (1, 1, 10) as the paper states (default); "
                             "reference: what the reference code optimises, squared-denominator Dice (MONAI, "
                             "smoothing 1e-5) + 1 x L1 IoU, no cross-entropy; recorded in the checkpoints")
    parser.add_argument("--loss-weights", type=float, nargs=3, metavar=("DICE", "BCE", "IOU"), default=None,
                        help=f"loss weights (default: the --loss setting's, {LOSS_WEIGHTS['paper']} for paper; "
                             "IoU unused in box mode)")
    parser.add_argument("--pdmm", choices=LAYOUTS, default="desam",
                        help="PDMM layout: desam (biases in the SE gates and the 1x1 head, so they can learn; "
                             "the default, tied with reference in the accuracy benchmark) or reference (no "
                             "biases, as the reference code: every SE gate is a fixed 0.5); recorded in the "
                             "checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augmented-views", dest="augmented_views", action="store_false",
                        help="train on the original slices only, ignoring augmented views in the cache (one cache "
                             "with views then serves runs with and without them)")
    parser.add_argument("--train-slices", choices=SLICE_MODES, default="all",
                        help="which cached slices train (and validate per epoch), by the embedding's rules: all "
                             "(default: every cached slice), foreground_margin or foreground; a cache of every "
                             "slice can so train on the slices a default plan would cache; recorded in the "
                             "checkpoints")
    parser.add_argument("--sampling", choices=SAMPLINGS, default="slices",
                        help="grid mode: balanced = clicks on and off the object 1:1 whatever share of the slices "
                             "is empty; slices = every slice once, its click on or off 1:1 (default)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast precision (default auto: fp16 with loss scaling on CUDA, bf16 on CPU)")
    restart = parser.add_mutually_exclusive_group()
    restart.add_argument("-c", "--continue", dest="continue_training", action="store_true",
                         help="resume from the newest checkpoint of this fold (a finished fold: nothing to do)")
    restart.add_argument("--overwrite", action="store_true",
                         help="train a finished fold again from scratch, removing its checkpoints first")
    parser.add_argument("--val-only", action="store_true",
                        help="only run the final validation of checkpoint_final.pth")
    parser.add_argument("--num-workers", type=int, default=2,
                        help="data loader worker processes (0: load in the training process)")
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
    except ValueError:
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
    trainer = trainer_cls(
        preprocessed, trees.results, find_plans_name(preprocessed, args.plans_name), args.fold,
        sources=args.source, mode=args.mode, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        loss_weights=args.loss_weights, seed=args.seed, device=args.device, precision=args.precision,
        num_workers=args.num_workers, loss=args.loss, pdmm=args.pdmm, augmented_views=args.augmented_views,
        train_slices=args.train_slices, sampling=args.sampling)
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
