"""What changes from epoch to epoch: the learning rate, the precision, and the numbers logged per epoch."""
from __future__ import annotations

import math

import torch

from desam_pipeline.utilities import distributed
from desam_pipeline.utilities.detection import gate_auc
from desam_pipeline.utilities.runtime import resolve_precision

POLY_EXPONENT = 0.9
EMA_MOMENTUM = 0.9
HISTORY_KEYS = ("train_loss", "val_loss", "val_dice", "val_dice_ema", "iou_accuracy", "gate_auc", "lr",
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


def validation_sums() -> dict:
    """The zeros one epoch's validation steps add to: counts, and the grid-mode clicks' predicted IoU and
    whether each was on the object (lists, concatenated)."""
    return {"loss": 0.0, "count": 0, "tp": 0.0, "fp": 0.0, "fn": 0.0, "iou_agree": 0.0, "iou_scores": [],
            "on_object": []}


def reduce_validation(val: dict, device: torch.device) -> dict[str, float]:
    """Every rank's validation sums added up, with gate_auc: the ROC AUC of the clicks' predicted IoU
    separating clicks on the object from clicks off it, over every rank's clicks (NaN without both)."""
    clicks = distributed.gather((val.pop("iou_scores"), val.pop("on_object")))
    reduced = distributed.all_reduce(val, device=device)
    reduced["gate_auc"] = gate_auc([s for scores, _ in clicks for s in scores], [o for _, on in clicks for o in on])
    return reduced


def restored_history(saved: dict[str, list[float]]) -> dict[str, list[float]]:
    """A checkpoint's history with every HISTORY_KEYS key; keys newer than the checkpoint are NaN for its epochs."""
    epochs = len(saved["train_loss"])
    return {key: list(saved.get(key, [math.nan] * epochs)) for key in HISTORY_KEYS}


def epoch_record(train: dict, val: dict, grid_mode: bool, previous_ema: float | None, lr: float,
                 epoch_time: float, data_wait: float) -> dict[str, float]:
    """One epoch's HISTORY_KEYS from the summed train and validation counts (NaN without validation slices):
    Dice over every held-out pixel, its moving average, and in grid mode how often the IoU head agrees and
    how well it separates clicks on the object from clicks off it (`val["gate_auc"]`, ROC AUC)."""
    train_loss = train["loss"] / max(train["count"], 1)
    if val["count"]:
        val_loss = val["loss"] / val["count"]
        denominator = 2 * val["tp"] + val["fp"] + val["fn"]
        val_dice = 2 * val["tp"] / denominator if denominator else 1.0
        iou_accuracy = val["iou_agree"] / val["count"] if grid_mode else math.nan
        gate = val.get("gate_auc", math.nan) if grid_mode else math.nan
        ema = val_dice if previous_ema is None else EMA_MOMENTUM * previous_ema + (1 - EMA_MOMENTUM) * val_dice
    else:
        val_loss = val_dice = iou_accuracy = gate = ema = math.nan
    values = (train_loss, val_loss, val_dice, ema, iou_accuracy, gate, lr, epoch_time, data_wait)
    return {key: float(value) for key, value in zip(HISTORY_KEYS, values)}


def epoch_line(epoch: int, epochs: int, record: dict[str, float], grid_mode: bool) -> str:
    """The log line of one epoch."""
    return (f"epoch {epoch + 1}/{epochs}  train_loss {record['train_loss']:.4f}  val_loss {record['val_loss']:.4f}  "
            f"val_dice {record['val_dice']:.4f}  ema {record['val_dice_ema']:.4f}"
            + (f"  iou_acc {record['iou_accuracy']:.3f}  gate_auc {record['gate_auc']:.3f}" if grid_mode else "")
            + f"  lr {record['lr']:.3g}  {record['epoch_time']:.1f}s (data wait {record['data_wait']:.1f}s)")
