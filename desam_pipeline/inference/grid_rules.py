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
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.amg import batched_mask_to_box, remove_small_regions
from torchvision.ops import batched_nms

from desam_pipeline.network import DeSAM
from desam_pipeline.network.prim import Points

GRID_RULES = ("top1", "reference")
REFERENCE_NMS_IOU = 0.7
REFERENCE_MIN_REGION = 1000  # pixels of the 256x256 slice
# Candidates are picked on the fast IoU of every point (`grid_iou.prompt_ious`), with this margin, and then
# accepted on the IoU of their own forward pass, as the reference accepts them.
CANDIDATE_MARGIN = 1e-3


def resample_like_sam(logits: torch.Tensor, size: int, frame: int) -> torch.Tensor:
    """(N,1,h,w) low-resolution logits -> (N,1,size,size) as `Sam.postprocess_masks` does for a square
    `size` x `size` image: bilinear to the `frame` input square (the network's prompt frame: 1024 for SAM's
    ViT, 256 for LiteMedSAM), crop to the (unpadded) input, bilinear to `size`."""
    upsampled = F.interpolate(logits, (frame, frame), mode="bilinear", align_corners=False)
    return F.interpolate(upsampled[..., :frame, :frame], (size, size), mode="bilinear", align_corners=False)


def first_mask(masks: torch.Tensor, iou: torch.Tensor, nms_iou: float = REFERENCE_NMS_IOU,
               min_region: int = REFERENCE_MIN_REGION) -> np.ndarray:
    """The reference's answer among thresholded masks (N,H,W) bool with predicted IoUs (N,): NMS on the
    IoU, clean-up of each kept mask, NMS preferring unchanged masks, first kept. All empty when N = 0."""
    if masks.shape[0] == 0:
        return np.zeros(tuple(masks.shape[1:]), bool)
    masks, iou = masks.cpu(), iou.float().cpu()
    zeros = torch.zeros(masks.shape[0], dtype=torch.int64)
    kept = batched_nms(batched_mask_to_box(masks).float(), iou, zeros, iou_threshold=nms_iou)
    cleaned, unchanged = [], []
    for index in kept.tolist():
        mask, holes_changed = remove_small_regions(masks[index].numpy(), min_region, mode="holes")
        mask, islands_changed = remove_small_regions(mask, min_region, mode="islands")
        cleaned.append(torch.as_tensor(mask))
        unchanged.append(float(not (holes_changed or islands_changed)))
    cleaned_masks = torch.stack(cleaned)
    ranked = batched_nms(batched_mask_to_box(cleaned_masks).float(), torch.tensor(unchanged),
                         torch.zeros(len(cleaned), dtype=torch.int64), iou_threshold=nms_iou)
    return cleaned_masks[int(ranked[0])].numpy()


def reference_slice(net: DeSAM, neck: torch.Tensor, taps: list[torch.Tensor], points: Points,
                    iou: torch.Tensor, iou_threshold: float, batch_size: int, size: int) -> np.ndarray:
    """One slice (neck (1,...), taps [(1,...)]) under the `reference` rule, given every point's IoU (P,):
    a (size, size) float32 mask in {0, 1}."""
    coords, labels = points
    candidates = torch.nonzero(iou > iou_threshold - CANDIDATE_MARGIN)[:, 0]
    masks, scores = [], []
    for start in range(0, candidates.shape[0], batch_size):
        part = candidates[start:start + batch_size]
        count = part.shape[0]
        logits, part_iou = net(neck.expand(count, -1, -1, -1), [t.expand(count, -1, -1, -1) for t in taps],
                               points=(coords[part], labels[part]))
        accepted = part_iou[:, 0].float() > iou_threshold
        masks.append(torch.sigmoid(resample_like_sam(logits.float(), size, net.prim.frame)[:, 0])[accepted] > 0.5)
        scores.append(part_iou[:, 0].float()[accepted])
    masks_all = torch.cat(masks) if masks else torch.zeros((0, size, size), dtype=torch.bool)
    return first_mask(masks_all, torch.cat(scores) if scores else torch.zeros(0)).astype(np.float32)
