"""How grid mode turns k x k point prompts into one mask per slice: `reference` or `top1` (desam's).

The default rule is `inference.settings.DEFAULT_GRID_RULE` (`reference`).

- `top1`: PRIM's IoU head scores every point; PDMM runs once, on the best point's mask embedding; the
  slice is empty unless that IoU exceeds the threshold (see `inference.slice_prediction`).
- `reference`: the reference code's automatic mask generator with one 256x256 crop. Every point whose
  predicted IoU exceeds the threshold goes through the whole network; each mask's logits are resampled
  as SAM's `postprocess_masks` does (bilinear to the prompt frame, 1024 for SAM's ViT and 256 for
  LiteMedSAM, then to the 256 image) and thresholded at sigmoid 0.5; duplicates are removed by box NMS
  at 0.7 on the predicted IoU; every kept mask is cleaned with segment_anything's `remove_small_regions`
  (holes, then islands, under 1000 px); a second box NMS at 0.7 ranks the masks the cleaning left
  unchanged first; the first mask is the answer.
  The generator's crop-edge filter never fires with a single full-image crop and its stability score is
  computed but unused, so both are left out.

The two NMS passes reduce to one greedy scan in the order of decreasing IoU (torchvision's NMS sorts
stably): a mask survives unless its box overlaps an earlier survivor's by more than 0.7, and the answer
is the first survivor the clean-up leaves unchanged, else the first survivor cleaned. So masks are made
in that order, a few points at a time, and only until the answer is known: after one mask when the best
point's mask is clean. The points are scored and ordered by `grid_iou.prompt_ious` (float32, the dense
PRIM's IoU up to rounding), and PDMM's tap branches are computed once per slice (`PDMM.encode_taps`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.amg import batched_mask_to_box, remove_small_regions
from torchvision.ops import box_iou

from desam_pipeline.network import DeSAM
from desam_pipeline.network.prim import Points

GRID_RULES = ("top1", "reference")
REFERENCE_NMS_IOU = 0.7
REFERENCE_MIN_REGION = 1000  # pixels of the 256x256 slice


def resample_like_sam(logits: torch.Tensor, size: int, frame: int) -> torch.Tensor:
    """(N,1,h,w) low-resolution logits -> (N,1,size,size) as `Sam.postprocess_masks` does for a square
    `size` x `size` image: bilinear to the `frame` input square (the network's prompt frame: 1024 for SAM's
    ViT, 256 for LiteMedSAM), crop to the (unpadded) input, bilinear to `size`."""
    upsampled = F.interpolate(logits, (frame, frame), mode="bilinear", align_corners=False)
    return F.interpolate(upsampled[..., :frame, :frame], (size, size), mode="bilinear", align_corners=False)


class FirstMaskScan:
    """The reference's answer, fed thresholded masks one at a time in the order of decreasing predicted IoU.

    A mask whose box overlaps an earlier survivor's by more than `nms_iou` (the first NMS) is dropped; a
    survivor is cleaned (holes, then islands, under `min_region` px); the first survivor left unchanged is
    the answer (the second NMS ranks it first), else the first survivor, cleaned.
    """

    def __init__(self, nms_iou: float = REFERENCE_NMS_IOU, min_region: int = REFERENCE_MIN_REGION) -> None:
        self.nms_iou, self.min_region = nms_iou, min_region
        self.boxes: list[torch.Tensor] = []
        self.first: np.ndarray | None = None
        self.answer: np.ndarray | None = None

    def add(self, mask: torch.Tensor) -> bool:
        """Feed the next mask (H,W) bool; True once the answer is known (later masks cannot change it)."""
        mask = mask.cpu()
        box = batched_mask_to_box(mask[None]).float()
        if self.boxes and bool((box_iou(torch.cat(self.boxes), box)[:, 0] > self.nms_iou).any()):
            return False
        self.boxes.append(box)
        cleaned, holes_changed = remove_small_regions(mask.numpy(), self.min_region, mode="holes")
        cleaned, islands_changed = remove_small_regions(cleaned, self.min_region, mode="islands")
        if self.first is None:
            self.first = cleaned
        if not (holes_changed or islands_changed):
            self.answer = cleaned
        return self.answer is not None

    def result(self, shape: tuple[int, int]) -> np.ndarray:
        """The answer (H,W) bool; all empty when no mask was fed."""
        for mask in (self.answer, self.first):
            if mask is not None:
                return mask
        return np.zeros(shape, bool)


def first_mask(masks: torch.Tensor, iou: torch.Tensor, nms_iou: float = REFERENCE_NMS_IOU,
               min_region: int = REFERENCE_MIN_REGION) -> np.ndarray:
    """The reference's answer among thresholded masks (N,H,W) bool with predicted IoUs (N,): NMS on the
    IoU, clean-up of each kept mask, NMS preferring unchanged masks, first kept. All empty when N = 0."""
    scan = FirstMaskScan(nms_iou, min_region)
    for index in torch.argsort(iou.float().cpu(), descending=True, stable=True).tolist():
        if scan.add(masks[index]):
            break
    return scan.result(tuple(masks.shape[1:]))


def point_logits(net: DeSAM, neck: torch.Tensor, branches: list[torch.Tensor], points: Points,
                 part: torch.Tensor) -> torch.Tensor:
    """Mask logits (N,1,h,w) of the N points `part` on one slice (neck (1,...), `pdmm.encode_taps` branches
    [(1,...)]): one batched PRIM pass, then PDMM's prompt-dependent part on the branches, expanded, not copied."""
    coords, labels = points
    count = part.shape[0]
    embedding, _ = net.prim(neck.expand(count, -1, -1, -1), points=(coords[part], labels[part]))
    return net.pdmm.decode([b.expand(count, -1, -1, -1) for b in branches], embedding)


def reference_slice(net: DeSAM, neck: torch.Tensor, taps: list[torch.Tensor], points: Points,
                    iou: torch.Tensor, iou_threshold: float, batch_size: int, size: int) -> np.ndarray:
    """One slice (neck (1,...), taps [(1,...)]) under the `reference` rule, given every point's IoU (P,):
    a (size, size) float32 mask in {0, 1}.

    The points over the threshold go best first in chunks of 1, 2, 4, ... up to `batch_size`, until the
    scan knows the answer.
    """
    accepted = torch.nonzero(iou > iou_threshold)[:, 0]
    order = accepted[torch.argsort(iou[accepted], descending=True, stable=True)]
    scan = FirstMaskScan()
    branches = net.pdmm.encode_taps(taps) if order.shape[0] else []
    start, chunk = 0, 1
    while start < order.shape[0]:
        part = order[start:start + chunk]
        logits = point_logits(net, neck, branches, points, part)
        masks = torch.sigmoid(resample_like_sam(logits.float(), size, net.prim.frame)[:, 0]) > 0.5
        if any(scan.add(mask) for mask in masks):
            break
        start += part.shape[0]
        chunk = min(2 * chunk, batch_size)
    return scan.result((size, size)).astype(np.float32)
