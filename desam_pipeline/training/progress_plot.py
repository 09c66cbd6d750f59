"""progress.png of a training run: losses, validation Dice with its moving average, lr, epoch time."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from desam_pipeline.io.atomic import atomic_path  # noqa: E402


def plot_progress(history: dict[str, list[float]], target: Path) -> None:
    """Redraw the four panels from the logged history (one value per epoch per key), atomically."""
    epochs = list(range(len(history["train_loss"])))
    fig, axes = plt.subplots(4, 1, figsize=(10, 14), sharex=True)
    loss_ax, dice_ax, lr_ax, time_ax = axes
    loss_ax.plot(epochs, history["train_loss"], color="tab:blue", label="train loss")
    loss_ax.plot(epochs, history["val_loss"], color="tab:red", label="val loss")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(loc="upper right")
    dice_ax.plot(epochs, history["val_dice"], color="tab:green", linestyle=":", label="val Dice")
    dice_ax.plot(epochs, history["val_dice_ema"], color="tab:green", label="val Dice (moving avg)")
    if any(math.isfinite(v) for v in history["iou_accuracy"]):
        dice_ax.plot(epochs, history["iou_accuracy"], color="tab:purple", linestyle="--",
                     label="IoU-head accuracy")
    if any(math.isfinite(v) for v in history.get("gate_auc", [])):
        dice_ax.plot(epochs, history["gate_auc"], color="tab:brown", linestyle="-.",
                     label="gate ROC AUC (clicks on vs off the object)")
    dice_ax.set_ylabel("held-out slices")
    dice_ax.legend(loc="lower right")
    lr_ax.plot(epochs, history["lr"], color="black", label="learning rate")
    lr_ax.set_ylabel("lr")
    time_ax.plot(epochs, history["epoch_time"], color="tab:orange", label="epoch time")
    time_ax.plot(epochs, history["data_wait"], color="tab:gray", linestyle="--", label="of which data wait")
    time_ax.set_ylabel("seconds")
    time_ax.set_xlabel("epoch")
    time_ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
