"""What changes from epoch to epoch: the learning rate, the precision, and the numbers logged per epoch."""
from __future__ import annotations

import math

import torch

from desam_pipeline.utilities.runtime import resolve_precision

POLY_EXPONENT = 0.9
EMA_MOMENTUM = 0.9
HISTORY_KEYS = ("train_loss", "val_loss", "val_dice", "val_dice_ema", "iou_accuracy", "lr",
                "epoch_time", "data_wait")


def poly_lr(initial_lr: float, epoch: int, epochs: int, exponent: float = POLY_EXPONENT) -> float:
    """nnU-Net's polynomial decay, stepped once per epoch."""
    return initial_lr * (1 - epoch / epochs) ** exponent


def training_precision(precision: str, device: torch.device) -> str:
    """`auto` is fp16 autocast with loss scaling on CUDA (the reference's AMP) and bf16 autocast on CPU.

    Weights and optimizer state stay float32 either way. bf16 halves PDMM's step time on CPUs with
    AVX-512 BF16 (8.3 -> 4.2 s per batch of 4 on this project's 2 cores).
    """
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "bf16"
    return resolve_precision(precision, device)


def epoch_record(train: dict, val: dict, grid_mode: bool, previous_ema: float | None, lr: float,
                 epoch_time: float, data_wait: float) -> dict[str, float]:
    """One epoch's HISTORY_KEYS from the summed train and validation counts (NaN without validation slices):
    Dice over every held-out pixel, its moving average, and in grid mode how often the IoU head agrees."""
    train_loss = train["loss"] / max(train["count"], 1)
    if val["count"]:
        val_loss = val["loss"] / val["count"]
        denominator = 2 * val["tp"] + val["fp"] + val["fn"]
        val_dice = 2 * val["tp"] / denominator if denominator else 1.0
        iou_accuracy = val["iou_agree"] / val["count"] if grid_mode else math.nan
        ema = val_dice if previous_ema is None else EMA_MOMENTUM * previous_ema + (1 - EMA_MOMENTUM) * val_dice
    else:
        val_loss = val_dice = iou_accuracy = ema = math.nan
    values = (train_loss, val_loss, val_dice, ema, iou_accuracy, lr, epoch_time, data_wait)
    return {key: float(value) for key, value in zip(HISTORY_KEYS, values)}


def epoch_line(epoch: int, epochs: int, record: dict[str, float], grid_mode: bool) -> str:
    """The log line of one epoch."""
    return (f"epoch {epoch + 1}/{epochs}  train_loss {record['train_loss']:.4f}  val_loss {record['val_loss']:.4f}  "
            f"val_dice {record['val_dice']:.4f}  ema {record['val_dice_ema']:.4f}"
            + (f"  iou_acc {record['iou_accuracy']:.3f}" if grid_mode else "")
            + f"  lr {record['lr']:.3g}  {record['epoch_time']:.1f}s (data wait {record['data_wait']:.1f}s)")
