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
from desam_pipeline.inference.grid_rules import (FirstMaskScan, first_mask, point_logits, reference_slice,
                                                resample_like_sam)
from desam_pipeline.inference.settings import PredictionSettings
from desam_pipeline.network import CoupledSAM, DeSAM
from desam_pipeline.network.grid_iou import prompt_ious
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
    scan = FirstMaskScan()  # fed best first, it stops at the first clean survivor
    assert [scan.add(mask) for mask in masks[:3]] == [False, False, True]
    assert np.array_equal(scan.result((256, 256)), answer)
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
                                 prompt_ious(net, neck[:1], points=(points, labels)), -1.0, 4, 256)
    assert np.array_equal(direct, probabilities[0])


def every_point_answer(net, neck, taps, points, labels, threshold: float) -> tuple[np.ndarray, torch.Tensor]:
    """The reference rule as it ran before the tap branches were shared: every point through the whole network
    (`net.forward`, taps copied per point), accepted on its own IoU, SAM's resampling, segment_anything's
    generator; and the points' dense IoUs."""
    count = points.shape[0]
    with torch.no_grad():
        logits, iou = net(neck.expand(count, -1, -1, -1), [t.expand(count, -1, -1, -1).clone() for t in taps],
                          points=(points, labels))
    accepted = iou[:, 0] > threshold
    masks = torch.sigmoid(resample_like_sam(logits, 256, net.prim.frame))[:, 0] > 0.5
    if not accepted.any():
        return np.zeros((256, 256), bool), iou[:, 0]
    return generator_answer(masks[accepted], iou[accepted, 0]), iou[:, 0]


def decoded_rows(net) -> list[int]:
    """Rows PDMM's prompt-dependent part decodes, recorded at its bottleneck (empty for CoupledSAM)."""
    rows = []
    if hasattr(net.pdmm, "bottleneck"):
        net.pdmm.bottleneck.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("network", ["desam", "desam_clean_masks", "coupled"])
def test_reference_rule_equals_every_point_through_the_whole_network(tiny_checkpoint, network):
    """Shared tap branches, best-first chunks and the early stop give today's masks: the random DeSAM's noisy
    masks are all changed by the clean-up (every accepted point decoded), a head biased to the full slice makes
    the best point's mask clean (one decoded), CoupledSAM has no branches at all."""
    torch.manual_seed(5)
    if network == "coupled":
        net = CoupledSAM.from_sam_checkpoint(tiny_checkpoint, "tiny").eval()
    else:
        net = DeSAM.from_sam_checkpoint(tiny_checkpoint, "tiny", TINY_TAPS).eval()
    if network == "desam_clean_masks":
        with torch.no_grad():
            net.pdmm.head.weight.mul_(1e-3)
            net.pdmm.head.bias.fill_(20.0)
    generator = torch.Generator().manual_seed(2)
    neck = torch.randn(2, 256, 64, 64, generator=generator)
    taps = [torch.randn(2, 32, 64, 64, generator=generator) for _ in range(3)]
    points = torch.as_tensor(grid_points(3, TINY_FRAME))[:, None, :]
    labels = torch.ones(9, 1, dtype=torch.int64)
    rows = decoded_rows(net)
    for s, every_point in ((0, True), (1, False)):
        fast = prompt_ious(net, neck[s:s + 1], points=(points, labels))
        middle = fast.sort().values[3:5]
        cut = -1.0 if every_point else float(middle.mean())  # every point, or the best five
        expected, dense = every_point_answer(net, neck[s:s + 1], [t[s:s + 1] for t in taps], points, labels, cut)
        gaps = (dense[:, None] - dense[None, :]).abs() + torch.eye(9)
        assert gaps.min() > 1e-5 and (dense - cut).abs().min() > 1e-5  # no tie for float rounding to break
        rows.clear()
        with torch.no_grad():
            answer = reference_slice(net, neck[s:s + 1], [t[s:s + 1] for t in taps], (points, labels), fast,
                                     cut, 4, 256)
        assert np.array_equal(answer > 0.5, expected)
        if network == "desam_clean_masks":
            assert rows == [1] and expected.all()
        elif network == "desam":
            assert rows == ([1, 2, 4, 2] if every_point else [1, 2, 2])


@pytest.mark.slow
def test_decoding_shared_branches_equals_the_whole_pdmm(net):
    """PDMM's prompt-dependent part on one slice's branches, expanded to several points, gives the logits of
    the whole PDMM with the taps copied per point."""
    generator = torch.Generator().manual_seed(4)
    neck = torch.randn(1, 256, 64, 64, generator=generator)
    taps = [torch.randn(1, 32, 64, 64, generator=generator) for _ in range(3)]
    points = torch.as_tensor(grid_points(2, TINY_FRAME))[:, None, :]
    labels = torch.ones(4, 1, dtype=torch.int64)
    with torch.no_grad():
        shared = point_logits(net, neck, net.pdmm.encode_taps(taps), (points, labels), torch.arange(4))
        whole, _ = net(neck.expand(4, -1, -1, -1), [t.expand(4, -1, -1, -1).clone() for t in taps],
                       points=(points, labels))
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(shared > 0, whole > 0)
    assert shared.std(0).max() > 1e-3  # the points' masks differ: the prompt reaches the decoder
