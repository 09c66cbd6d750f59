"""Slice inference: grid mode picks the top-IoU prompt and runs PDMM once per slice; box mode; chunking."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from desam_pipeline.data.prompts import grid_points, whole_box
from desam_pipeline.inference.settings import PredictionSettings
from desam_pipeline.inference.slice_prediction import predict_slices
from desam_pipeline.network import DeSAM

from toy_data import TINY_FRAME, TINY_TAPS


SLICES = 2
GRID = 2


def top1(iou_threshold: float) -> PredictionSettings:
    """The `top1` rule on the test's grid: this module is about it (`test_grid_rules` has the reference rule)."""
    return PredictionSettings(grid=GRID, iou_threshold=iou_threshold, grid_rule="top1")


@pytest.fixture(scope="module")
def net(tiny_checkpoint) -> DeSAM:
    return DeSAM.from_sam_checkpoint(tiny_checkpoint, "tiny", TINY_TAPS).eval()


@pytest.fixture(scope="module")
def features():
    gen = torch.Generator().manual_seed(3)
    neck = torch.randn(SLICES, 256, 64, 64, generator=gen)
    taps = [torch.randn(SLICES, 32, 64, 64, generator=gen) for _ in range(3)]
    return neck, taps


class Spy:
    """Records PRIM's inputs/outputs and PDMM's inputs/outputs through forward hooks, and the rows PDMM's
    prompt-dependent part decodes (its bottleneck's input, reached by `forward` and `decode` alike)."""

    def __init__(self, net: DeSAM) -> None:
        self.prim, self.pdmm, self.decoded = [], [], []
        self.handles = [
            net.prim.register_forward_hook(self._prim, with_kwargs=True),
            net.pdmm.register_forward_hook(self._pdmm, with_kwargs=True),
            net.pdmm.bottleneck.register_forward_hook(lambda module, args, out: self.decoded.append(args[0].shape[0]))]

    def _prim(self, module, args, kwargs, out):
        self.prim.append(dict(neck=args[0], points=kwargs.get("points"), embedding=out[0], iou=out[1]))

    def _pdmm(self, module, args, kwargs, out):
        self.pdmm.append(dict(taps=args[0], embedding=args[1], logits=out))

    def pdmm_rows(self) -> int:
        return sum(self.decoded)

    def __enter__(self) -> "Spy":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture(scope="module")
def grid_run(net, features):
    """Grid prediction accepting every prompt, with what PRIM and PDMM saw."""
    neck, taps = features
    with Spy(net) as spy:
        probs, best_iou = predict_slices(net, neck, taps, "grid", top1(-1e9))
    return spy, probs, best_iou


def dense_grid_ious(net, neck_slice):
    """The k*k predicted IoUs of the grid through the dense PRIM (one copy of the image per prompt)."""
    grid = torch.as_tensor(grid_points(GRID, TINY_FRAME))[:, None]
    with torch.no_grad():
        embedding, iou = net.prim(neck_slice.expand(GRID * GRID, -1, -1, -1),
                                  points=(grid, torch.ones(GRID * GRID, 1, dtype=torch.int64)))
    return embedding, iou[:, 0]


@pytest.mark.slow
def test_grid_runs_pdmm_once_per_slice_on_the_top_iou_prompt(net, features, grid_run):
    neck, taps = features
    spy, probs, best_iou = grid_run
    assert probs.shape == (SLICES, 256, 256) and probs.dtype == np.float32
    assert best_iou.shape == (SLICES,) and best_iou.dtype == np.float32
    # The dense PRIM runs once per slice, on the point the dense k x k scoring ranks first.
    assert len(spy.prim) == SLICES
    grid = torch.as_tensor(grid_points(GRID, TINY_FRAME))
    fed = torch.cat([call["embedding"] for call in spy.pdmm])
    logits = torch.cat([call["logits"] for call in spy.pdmm])
    # PDMM: exactly one row per slice, fed the embedding of the highest-IoU point.
    assert spy.pdmm_rows() == SLICES
    for s, call in enumerate(spy.prim):
        embedding, iou = dense_grid_ious(net, neck[s:s + 1])
        best, worst = int(torch.argmax(iou)), int(torch.argmin(iou))
        assert iou.std() > 0 and best_iou[s] == pytest.approx(float(iou.max()), abs=1e-5)
        assert torch.equal(call["points"][0][0, 0], grid[best]) and call["neck"].shape[0] == 1
        torch.testing.assert_close(fed[s], embedding[best], rtol=0, atol=1e-5)
        assert not torch.allclose(fed[s], embedding[worst], atol=1e-3)
        for t_fed, t in zip(spy.pdmm[0]["taps"], taps):
            assert torch.equal(t_fed[s], t[s])
    np.testing.assert_allclose(probs, torch.sigmoid(logits[:, 0]).numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_grid_leaves_slices_without_a_confident_prompt_empty(net, features, grid_run):
    neck, taps = features
    best_iou = grid_run[2]
    order = np.argsort(best_iou)
    threshold = float(best_iou[order[0]] + best_iou[order[1]]) / 2  # rejects exactly the lowest slice
    with Spy(net) as spy:
        probs, again = predict_slices(net, neck, taps, "grid", top1(threshold), batch_size=1)
    np.testing.assert_array_equal(again, best_iou)
    assert spy.pdmm_rows() == SLICES - 1
    assert (probs[order[0]] == 0).all() and all(probs[s].max() > 0 for s in order[1:])
    with Spy(net) as spy:
        probs, _ = predict_slices(net, neck, taps, "grid", top1(float(best_iou.max())))
    assert spy.pdmm_rows() == 0 and (probs == 0).all()


@pytest.mark.slow
def test_grid_average_over_accepted_prompts(net, features):
    neck, taps = features
    one = [neck[:1], [t[:1] for t in taps]]
    with torch.no_grad():
        embedding, iou = net.prim(one[0].expand(GRID * GRID, -1, -1, -1),
                                  points=(torch.as_tensor(grid_points(GRID, TINY_FRAME))[:, None],
                                          torch.ones(GRID * GRID, 1, dtype=torch.int64)))
        threshold = float(iou.median())
        accepted = embedding[iou[:, 0] > threshold]
        expected = torch.stack([torch.sigmoid(net.pdmm(one[1], e[None]))[0, 0] for e in accepted]).mean(0)
    with Spy(net) as spy:
        probs, best = predict_slices(net, *one, "grid", top1(threshold), average=True, batch_size=2)
    assert 1 < accepted.shape[0] < GRID * GRID and spy.pdmm_rows() == accepted.shape[0]
    assert best[0] == pytest.approx(float(iou.max()), abs=1e-5)
    np.testing.assert_allclose(probs[0], expected.numpy(), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_box_mode_is_one_forward_pass_per_chunk(net, features):
    neck, taps = features
    with torch.no_grad():
        logits, iou = net(neck, taps, boxes=torch.as_tensor(whole_box(SLICES, TINY_FRAME)))
    with Spy(net) as spy:
        probs, box_iou = predict_slices(net, neck, taps, mode="box", batch_size=1)
    assert len(spy.prim) == SLICES and len(spy.pdmm) == SLICES and spy.pdmm_rows() == SLICES
    assert all(torch.equal(call["neck"], neck[s:s + 1]) for s, call in enumerate(spy.prim))
    np.testing.assert_allclose(probs, torch.sigmoid(logits[:, 0]).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(box_iou, iou[:, 0].numpy(), rtol=0, atol=1e-5)
    # float16 arrays (as memory-mapped from the cache) are accepted as well as tensors.
    probs16, _ = predict_slices(net, neck[:1].half().numpy(), [t[:1].half().numpy() for t in taps], mode="box")
    np.testing.assert_allclose(probs16[0], probs[0], rtol=0, atol=2e-2)


@pytest.mark.slow
def test_training_mode_is_restored_and_bad_arguments_fail(net, features):
    neck, taps = features
    net.train()
    try:
        probs, _ = predict_slices(net, neck[:1], [t[:1] for t in taps], mode="box", precision="bf16")
        assert net.training and not net.prim.prompt_encoder.training
    finally:
        net.eval()
    assert probs.dtype == np.float32 and np.isfinite(probs).all()
    with pytest.raises(ValueError, match="unknown prediction mode 'points'"):
        predict_slices(net, neck, taps, mode="points")
