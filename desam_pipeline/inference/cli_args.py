"""Flags that several commands share, defined once as argparse parent parsers.

`desam_predict` and `desam_evaluate` predict with the same settings; `desam_train` and
`desam_plan_and_embed` pick the device the same way. A command adds them with
`argparse.ArgumentParser(parents=[...])`.
"""
from __future__ import annotations

import argparse

from desam_pipeline.inference.grid_rules import GRID_RULES
from desam_pipeline.inference.postprocessing import POSTPROCESSING
from desam_pipeline.io.results_layout import CHECKPOINT_NAMES
from desam_pipeline.utilities import runtime


def prediction_parser() -> argparse.ArgumentParser:
    """The prediction settings: model checkpoint, frozen encoder, batch size, grid and post-processing."""
    parser = argparse.ArgumentParser(add_help=False, parents=[runtime.device_parser()])
    parser.add_argument("--checkpoint-name", choices=tuple(CHECKPOINT_NAMES), default="final",
                        help="each fold's checkpoint: final (default) or best (best moving-average validation "
                             "Dice); recorded beside the results")
    parser.add_argument("--checkpoint", default=None,
                        help="SAM checkpoint for the frozen encoder (default: the plan's; its sha256 must match)")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per batch (default: the plan's)")
    parser.add_argument("--iou-threshold", type=float, default=0.5,
                        help="grid mode: a slice is empty unless its best point's predicted IoU exceeds this")
    parser.add_argument("--grid", type=int, default=9, help="grid mode: K x K points per slice")
    # reference by default: in the accuracy benchmark it beat top1 under the full protocol on the same model
    # (+0.05 and +0.04 mean unseen Dice, two runs) and tied under paper; top1 predicts about 3x faster on CPU.
    parser.add_argument("--grid-rule", choices=GRID_RULES, default="reference",
                        help="grid mode: reference (default) = every point over the threshold through the "
                             "network, NMS, clean-up, first mask, as the reference code; top1 = PDMM once on the "
                             "best point's embedding (about 3x faster on CPU); recorded beside the results")
    parser.add_argument("--postprocess", choices=POSTPROCESSING, default="none",
                        help="paper: per slice fill holes and drop islands under 1000 px at 256x256; "
                             "largest: keep the largest 3D connected component")
    return parser
