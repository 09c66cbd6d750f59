"""DeSAM's training loss: soft Dice + binary cross-entropy on the mask logits, L1 on the predicted IoU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_WEIGHTS = (1.0, 1.0, 10.0)


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


def desam_loss(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor | None = None,
               iou_target: torch.Tensor | None = None, weights: tuple[float, float, float] = DEFAULT_WEIGHTS
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted Dice + BCE (+ L1 IoU when `iou_pred` is given, grid mode) and the detached parts.

    logits (B,1,H,W); target (B,1,H,W) or (B,H,W) in {0,1}; iou_pred (B,1) or (B,); iou_target (B,).
    """
    target = target.float().reshape(logits.shape)
    logits = logits.float()
    dice = soft_dice_loss(logits, target)
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
