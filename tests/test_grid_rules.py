"""The reference grid rule, step by step against segment_anything's own code: SAM's logit resampling and
the automatic mask generator's clean-up and re-ranking; then through slice_prediction.predict_slices."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import MaskData, batched_mask_to_box, mask_to_rle_pytorch, rle_to_mask
from torchvision.ops import batched_nms

from desam_pipeline.data.prompts import grid_points
from desam_pipeline.inference import slice_prediction
from desam_pipeline.inference.grid_rules import first_mask, reference_slice, resample_like_sam
from desam_pipeline.inference.settings import PredictionSettings
from desam_pipeline.network import DeSAM
from desam_pipeline.network.sam_models import build_sam

from toy_data import TINY_FRAME, TINY_TAPS


def test_logits_are_resampled_as_sam_postprocess_masks():
    sam = build_sam("tiny", seed=0)
    low = torch.randn(3, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    expected = sam.postprocess_masks(low, (1024, 1024), (256, 256))
    assert torch.equal(resample_like_sam(low, 256, 1024), expected)


def square(top: int, left: int, side: int, hole: int = 0) -> torch.Tensor:
    mask = torch.zeros(256, 256, dtype=torch.bool)
    mask[top:top + side, left:left + side] = True
    if hole:
        middle = top + side // 2 - hole // 2, left + side // 2 - hole // 2
        mask[middle[0]:middle[0] + hole, middle[1]:middle[1] + hole] = False
    return mask


def generator_answer(masks: torch.Tensor, iou: torch.Tensor) -> np.ndarray:
    """segment_anything's generator on the same masks: NMS 0.7 on the IoU (as in its crop step), then its
    postprocess_small_regions(1000, 0.7); the first record's mask."""
    kept = batched_nms(batched_mask_to_box(masks).float(), iou, torch.zeros(len(masks)), iou_threshold=0.7)
    data = MaskData(rles=mask_to_rle_pytorch(masks[kept]), boxes=batched_mask_to_box(masks[kept]).float(),
                    iou_preds=iou[kept])
    data = SamAutomaticMaskGenerator.postprocess_small_regions(data, 1000, 0.7)
    return rle_to_mask(data["rles"][0])


def test_first_mask_is_the_generators_first_record():
    masks = torch.stack([
        square(20, 20, 60, hole=10),      # IoU 0.9, 3500 px with a 100 px hole: changed by the clean-up
        square(21, 21, 60, hole=10),      # IoU 0.8, a duplicate of the first: gone at the first NMS
        square(150, 150, 50),             # IoU 0.7, 2500 px, clean: ranked first after the clean-up
        square(100, 180, 20),             # IoU 0.6, 400 px: its only island is kept as the largest, but
    ])                                    # remove_small_regions reports that as a change
    iou = torch.tensor([0.9, 0.8, 0.7, 0.6])
    answer = first_mask(masks, iou)
    assert np.array_equal(answer, generator_answer(masks, iou))
    assert np.array_equal(answer, masks[2].numpy())
    # without the clean mask both remaining ones count as changed: the higher IoU, hole filled, wins
    rest = masks[[0, 1, 3]], iou[[0, 1, 3]]
    assert np.array_equal(first_mask(*rest), generator_answer(*rest))
    assert np.array_equal(first_mask(*rest), square(20, 20, 60).numpy())
    clean_small = torch.stack([masks[0], square(100, 180, 40)]), torch.tensor([0.9, 0.5])
    assert np.array_equal(first_mask(*clean_small), generator_answer(*clean_small))
    assert np.array_equal(first_mask(*clean_small), square(100, 180, 40).numpy())  # unchanged beats a higher IoU
    assert not first_mask(torch.zeros((0, 256, 256), dtype=torch.bool), torch.zeros(0)).any()


@pytest.fixture(scope="module")
def net(tiny_checkpoint):
    torch.manual_seed(3)
    return DeSAM.from_sam_checkpoint(tiny_checkpoint, "tiny", TINY_TAPS).eval()


@pytest.mark.slow
def test_reference_rule_through_predict_slices_equals_the_generator_per_point(net):
    generator = torch.Generator().manual_seed(1)
    neck = torch.randn(2, 256, 64, 64, generator=generator)
    taps = [torch.randn(2, 32, 64, 64, generator=generator) for _ in range(3)]
    probabilities, best = slice_prediction.predict_slices(net, neck, taps, "grid",
                                                          PredictionSettings(grid=3, iou_threshold=-1.0,
                                                                             grid_rule="reference"))
    points = torch.as_tensor(grid_points(3, TINY_FRAME))[:, None, :]
    labels = torch.ones(9, 1, dtype=torch.int64)
    sam = build_sam("tiny", seed=0)
    with torch.no_grad():
        for s in range(2):
            # every point, one at a time, through the whole network; SAM's own resampling; threshold
            logits, iou = net(neck[s:s + 1].expand(9, -1, -1, -1), [t[s:s + 1].expand(9, -1, -1, -1) for t in taps],
                              points=(points, labels))
            masks = torch.sigmoid(sam.postprocess_masks(logits, (1024, 1024), (256, 256)))[:, 0] > 0.5
            expected = generator_answer(masks, iou[:, 0])
            assert np.array_equal(probabilities[s] > 0.5, expected)
            assert set(np.unique(probabilities[s])) <= {0.0, 1.0}
            assert best[s] == pytest.approx(float(iou.max()), abs=1e-4)
    rejecting = PredictionSettings(grid=3, iou_threshold=2.0, grid_rule="reference")
    empty, _ = slice_prediction.predict_slices(net, neck, taps, "grid", rejecting)
    assert not empty.any()
    with pytest.raises(ValueError, match="unknown grid rule"):
        slice_prediction.predict_slices(net, neck, taps, "grid", PredictionSettings(grid_rule="vote"))
    with torch.no_grad():
        direct = reference_slice(net, neck[:1], [t[:1] for t in taps], (points, labels),
                                 torch.full((9,), 0.0), -1.0, 4, 256)
    assert np.array_equal(direct, probabilities[0])
