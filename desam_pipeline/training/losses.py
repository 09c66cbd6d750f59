"""DeSAM's training loss: Dice + binary cross-entropy on the mask logits, L1 on the predicted IoU.

Two named settings (`--loss`):
- `paper` (default): soft Dice (smoothing 1) + BCE + L1(IoU), weights (1, 1, 10) as the paper states;
- `reference`: what the reference code optimises. It calls MONAI 1.1.0's
  `DiceCELoss(sigmoid=True, squared_pred=True)` on one output channel: the Dice has squared
  terms in its denominator and smoothing 1e-5 (MONAI's defaults), and its cross-entropy is
  `CrossEntropyLoss` over that single channel, which is identically 0; the L1 IoU loss is added
  with weight 1. So: squared-denominator Dice + 1 x L1(IoU), weights (1, 0, 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_WEIGHTS = {"paper": (1.0, 1.0, 10.0), "reference": (1.0, 0.0, 1.0)}  # (Dice, BCE, IoU) per loss setting
LOSSES = tuple(LOSS_WEIGHTS)
DEFAULT_LOSS = "paper"
DEFAULT_WEIGHTS = LOSS_WEIGHTS[DEFAULT_LOSS]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over samples of (2|P.T| + s) / (|P| + |T| + s), P = sigmoid(logits).

    Per sample, so one large object does not drown a small one; the smoothing term makes an
    empty target finite (no NaN) and an empty prediction of it a loss near 0.
    """
    probs = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    intersection = (probs * target).sum(1)
    denominator = probs.sum(1) + target.sum(1)
    return 1.0 - ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


def squared_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """MONAI's DiceLoss(sigmoid=True, squared_pred=True) with its default smoothing 1e-5 (numerator and
    denominator): 1 - mean over samples and channels of (2|P.T| + s) / (|P|^2 + |T|^2 + s)."""
    probs = torch.sigmoid(logits.float()).flatten(2)
    target = target.float().reshape(logits.shape).flatten(2)
    intersection = (probs * target).sum(2)
    denominator = (probs * probs).sum(2) + (target * target).sum(2)
    return 1.0 - ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


def desam_loss(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor | None = None,
               iou_target: torch.Tensor | None = None, weights: tuple[float, float, float] = DEFAULT_WEIGHTS,
               loss: str = DEFAULT_LOSS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted Dice + BCE (+ L1 IoU when `iou_pred` is given, grid mode) and the detached parts.

    `loss` picks the Dice: `paper` soft Dice, `reference` squared-denominator Dice (see the module).
    logits (B,1,H,W); target (B,1,H,W) or (B,H,W) in {0,1}; iou_pred (B,1) or (B,); iou_target (B,).
    """
    if loss not in LOSS_WEIGHTS:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    target = target.float().reshape(logits.shape)
    logits = logits.float()
    dice = soft_dice_loss(logits, target) if loss == "paper" else squared_dice_loss(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    if iou_pred is None:
        iou = logits.new_zeros(())
    else:
        if iou_target is None:
            raise ValueError("iou_pred needs iou_target")
        iou = (iou_pred.float().reshape(-1) - iou_target.float().reshape(-1).to(iou_pred.device)).abs().mean()
    w_dice, w_bce, w_iou = weights
    total = w_dice * dice + w_bce * bce + w_iou * iou
    return total, {"dice": dice.detach(), "bce": bce.detach(), "iou": iou.detach()}
