"""Slice-wise DeSAM prediction from cached features, in the grid-points or whole-box mode.

Grid mode (the `top1` rule; `grid_rules` has the reference's) scores a k x k grid of points with
PRIM's IoU head and runs PDMM ONCE per slice, on the mask embedding of the best-scoring point (PDMM's
masks are nearly prompt-independent by design). The k*k IoUs come from `network.grid_iou.prompt_ious`,
the same maths as k*k dense PRIM passes at a fraction of the cost; the dense PRIM then runs only for
the chosen point(s) to give their mask embedding. A slice whose best predicted IoU is not above the threshold
is empty. Where several points of a slice are decoded (`average`, the `reference` rule), PDMM's tap branches
are computed once per slice and only its prompt-dependent part runs per point, in batches. Box mode runs one
forward pass per chunk of slices with the whole-image box.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from desam_pipeline.data.prompts import MODES, grid_points, whole_box
from desam_pipeline.inference.grid_rules import GRID_RULES, point_logits, reference_slice
from desam_pipeline.inference.settings import PredictionSettings
from desam_pipeline.network import DeSAM
from desam_pipeline.network.grid_iou import prompt_ious
from desam_pipeline.network.registry import mask_size
from desam_pipeline.utilities.runtime import autocast

# Slices per forward pass where the caller has no plan (the predictor and the trainer pass theirs).
SLICE_BATCH = 8


def _chunk(array, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows start:stop of a tensor or (memory-mapped) array as float32 on `device`."""
    rows = array[start:stop]
    if not torch.is_tensor(rows):
        rows = torch.from_numpy(np.array(rows))  # a copy: memory-mapped rows are read-only
    return rows.to(device, torch.float32)


def _grid_chunk(net: DeSAM, neck: torch.Tensor, taps: list[torch.Tensor], points: torch.Tensor,
                iou_threshold: float, average: bool, batch_size: int,
                probabilities: np.ndarray, best_iou: np.ndarray, grid_rule: str) -> None:
    """Grid-mode prediction of one chunk of slices, written into `probabilities` and `best_iou`."""
    labels = torch.ones(points.shape[:2], dtype=torch.int64, device=points.device)
    chosen, chosen_embeddings = [], []
    for s in range(neck.shape[0]):
        iou = prompt_ious(net, neck[s:s + 1], points=(points, labels)).float()
        best = int(torch.argmax(iou))
        best_iou[s] = float(iou[best])
        if grid_rule == "reference":
            probabilities[s] = reference_slice(net, neck[s:s + 1], [t[s:s + 1] for t in taps], (points, labels),
                                               iou, iou_threshold, batch_size, probabilities.shape[-1])
            continue
        if best_iou[s] <= iou_threshold:
            continue
        if not average:
            embedding, _ = net.prim(neck[s:s + 1], points=(points[best:best + 1], labels[best:best + 1]))
            chosen.append(s)
            chosen_embeddings.append(embedding[0])
            continue
        accepted = torch.nonzero(iou > iou_threshold)[:, 0]
        branches = net.pdmm.encode_taps([t[s:s + 1] for t in taps])
        total = torch.zeros(probabilities.shape[1:], dtype=torch.float32, device=neck.device)
        for start in range(0, accepted.shape[0], batch_size):
            logits = point_logits(net, neck[s:s + 1], branches, (points, labels), accepted[start:start + batch_size])
            total += torch.sigmoid(logits.float())[:, 0].sum(0)
        probabilities[s] = (total / accepted.shape[0]).cpu().numpy()
    if chosen:
        index = torch.tensor(chosen, device=neck.device)
        logits = net.pdmm([t[index] for t in taps], torch.stack(chosen_embeddings))
        probabilities[chosen] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()


def predict_slices(net: DeSAM, neck, taps: Sequence, mode: str, settings: PredictionSettings = PredictionSettings(),
                   *, average: bool = False, batch_size: int = SLICE_BATCH, device: torch.device | str | None = None,
                   precision: str = "fp32", size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Foreground probabilities (S,size,size) float32 and the best predicted IoU per slice (S,) float32.

    neck (S,256,g,g) and the three taps (S,C,H,W), shallow to deep, as tensors (or memory-mapped
    arrays) on any device; they are moved to `device` (default: the network's) `batch_size` slices
    at a time, so memory does not grow with S. mode "grid": the settings' `grid` x `grid` points per
    slice and `grid_rule` (`reference`: the reference code's mask, see `grid_rules`; `top1`: PDMM once per
    slice on the top-IoU point, zero probabilities where no IoU > `iou_threshold`, or with
    `average=True` the mean probabilities of all accepted points). mode "box": the whole-image box, the
    IoU being the IoU head's output for it. `precision` is a `runtime.autocast` precision (fp32, bf16,
    fp16). `size` is the plan's slice size; by default the network's mask size.
    """
    grid, iou_threshold, grid_rule = settings.grid, settings.iou_threshold, settings.grid_rule
    if mode not in MODES:
        raise ValueError(f"unknown prediction mode {mode!r}; choose one of {', '.join(MODES)}")
    if grid_rule not in GRID_RULES:
        raise ValueError(f"unknown grid rule {grid_rule!r}; choose one of {', '.join(GRID_RULES)}")
    if len(taps) != 3:
        raise ValueError(f"expected 3 taps, got {len(taps)}")
    device = torch.device(device) if device is not None else next(net.parameters()).device
    count = neck.shape[0]
    size = mask_size(net) if size is None else int(size)
    probabilities = np.zeros((count, size, size), np.float32)
    best_iou = np.zeros(count, np.float32)
    points = torch.as_tensor(grid_points(grid, net.prim.frame), device=device)[:, None, :]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), autocast(device, precision):
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                chunk_neck = _chunk(neck, start, stop, device)
                chunk_taps = [_chunk(t, start, stop, device) for t in taps]
                if mode == "grid":
                    _grid_chunk(net, chunk_neck, chunk_taps, points, iou_threshold, average, batch_size,
                                probabilities[start:stop], best_iou[start:stop], grid_rule)
                    continue
                boxes = torch.as_tensor(whole_box(stop - start, net.prim.frame), device=device)
                logits, iou = net(chunk_neck, chunk_taps, boxes=boxes)
                probabilities[start:stop] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
                best_iou[start:stop] = iou[:, 0].float().cpu().numpy()
    finally:
        net.train(was_training)
    return probabilities, best_iou
