"""The factored many-prompt IoU (network.grid_iou) equals PRIM's dense path, stage by stage and at the end."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from desam_pipeline.data.prompts import grid_points
from desam_pipeline.network import DeSAM, grid_iou
from desam_pipeline.network.grid_iou import iou_token_outputs, prompt_ious

from toy_data import TINY_FRAME, TINY_TAPS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these many mid-sized GEMMs run several times slower with two threads when
    other processes share the cores (threads spin-wait for each other); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_net(tiny_checkpoint) -> DeSAM:
    return DeSAM.from_sam_checkpoint(tiny_checkpoint, "tiny", TINY_TAPS).eval()


def rescaled(net: DeSAM, seed: int) -> DeSAM:
    """A copy of `net` whose decoder and prompt embeddings are re-drawn at larger scales than SAM's init."""
    net = copy.deepcopy(net)
    generator = torch.Generator().manual_seed(seed)

    def draw(shape, std):
        return torch.randn(shape, generator=generator) * std

    with torch.no_grad():
        for module in net.prim.mask_decoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(draw(module.weight.shape, 2.0 / module.in_features ** 0.5))
                module.bias.copy_(draw(module.bias.shape, 0.5))
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 1.5 + 0.5)
                module.bias.copy_(draw(module.bias.shape, 0.5))
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(draw(module.weight.shape, 1.0))
        encoder = net.prim.prompt_encoder
        for embedding in [*encoder.point_embeddings, encoder.not_a_point_embed, encoder.no_mask_embed]:
            embedding.weight.copy_(draw(embedding.weight.shape, 1.0))
    return net


def grid_prompts(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    points = torch.as_tensor(grid_points(k, TINY_FRAME))[:, None, :]
    return points, torch.ones(points.shape[:2], dtype=torch.int64)


def neck_like(seed: int, scale: float = 1.0) -> torch.Tensor:
    """A (1,256,64,64) embedding with smooth spatial structure, so points at different places differ."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 256, 8, 8, generator=generator)
    fine = torch.randn(1, 256, 64, 64, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
    return scale * (smooth + 0.3 * fine)


def dense_ious(net: DeSAM, neck: torch.Tensor, points=None, boxes=None) -> torch.Tensor:
    """PRIM's own path, `neck` repeated per prompt, 8 prompts at a time (faster on CPU than all at once)."""
    count = (points[0] if points is not None else boxes).shape[0]
    out = []
    with torch.no_grad():
        for start in range(0, count, 8):
            part = slice(start, start + 8)
            chunk_points = None if points is None else (points[0][part], points[1][part])
            chunk_boxes = None if boxes is None else boxes[part]
            size = (chunk_points[0] if points is not None else chunk_boxes).shape[0]
            out.append(net.prim(neck.expand(size, -1, -1, -1), points=chunk_points, boxes=chunk_boxes)[1][:, 0])
    return torch.cat(out)


def decoder_inputs(net: DeSAM, neck: torch.Tensor, points=None, boxes=None, dtype=torch.float64, size=32):
    """(decoder in `dtype`, image (1,C,size,size), image_pe, tokens (P,T,C)) as PRIM.forward builds them.

    The transformer works on any number of image tokens; the top-left size x size corner keeps the
    float64 tests fast.
    """
    prim = net.prim
    with torch.no_grad():
        sparse, dense, pe = prim.encode_prompts(points, boxes, neck.device)
    decoder = copy.deepcopy(prim.mask_decoder).to(dtype)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.expand(sparse.shape[0], -1, -1), sparse.to(dtype)], dim=1)
    corner = (..., slice(0, size), slice(0, size))
    return decoder, (neck + dense[:1])[corner].to(dtype), pe[corner].to(dtype), tokens


def test_checkpoint_grid_matches_dense_prim(tiny_net):
    neck = neck_like(0)
    prompts = grid_prompts(5)
    expected = dense_ious(tiny_net, neck, prompts)
    got = prompt_ious(tiny_net, neck, prompts)
    assert got.shape == (25,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert expected.std() > 1e-3                     # the 81 prompts really score differently
    torch.testing.assert_close(prompt_ious(tiny_net.prim, neck[0], prompts, chunk=7), got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [1, 2])
def test_rescaled_weights_float32_match_dense(tiny_net, seed):
    net = rescaled(tiny_net, seed)
    neck = neck_like(seed, scale=3.0)
    prompts = grid_prompts(4)
    expected = dense_ious(net, neck, prompts)
    got = prompt_ious(net, neck, prompts, chunk=10)
    assert expected.std() > 0.05 * expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_rescaled_weights_float64_exact(tiny_net):
    net = rescaled(tiny_net, 3)
    neck = neck_like(3, scale=3.0)
    decoder, image, pe, tokens = decoder_inputs(net, neck, grid_prompts(4))
    with torch.no_grad():
        queries, _ = decoder.transformer(image.expand(tokens.shape[0], -1, -1, -1),
                                         pe.expand(tokens.shape[0], -1, -1, -1), tokens)
        got = iou_token_outputs(decoder.transformer, image, pe, tokens, chunk=6)
        expected_iou = decoder.iou_prediction_head(queries[:, 0])[:, 0]
        got_iou = decoder.iou_prediction_head(got)[:, 0]
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), queries[:, 0].numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got_iou.numpy(), expected_iou.numpy(), rtol=1e-9, atol=1e-9)
    assert expected_iou.std() > 0.05 * expected_iou.abs().max()


def test_float32_as_accurate_as_dense(tiny_net):
    """The expanded-square variances lose nothing that matters: against a float64 reference, the factored
    float32 IoUs err about as much as the dense float32 ones."""
    net = rescaled(tiny_net, 7)
    neck = neck_like(7, scale=5.0)
    ious = {}
    for dtype in (torch.float32, torch.float64):
        decoder, image, pe, tokens = decoder_inputs(net, neck, grid_prompts(4), dtype=dtype)
        with torch.no_grad():
            queries, _ = decoder.transformer(image.expand(tokens.shape[0], -1, -1, -1),
                                             pe.expand(tokens.shape[0], -1, -1, -1), tokens)
            ious["dense", dtype] = decoder.iou_prediction_head(queries[:, 0])[:, 0].double()
            factored = iou_token_outputs(decoder.transformer, image, pe, tokens)
            ious["factored", dtype] = decoder.iou_prediction_head(factored)[:, 0].double()
    truth = ious["dense", torch.float64]
    dense_error = float((ious["dense", torch.float32] - truth).abs().max())
    factored_error = float((ious["factored", torch.float32] - truth).abs().max())
    assert 0 < dense_error < 1e-4 * float(truth.abs().max())
    assert factored_error < 10 * dense_error


def test_each_layer_matches_dense_stage_by_stage(tiny_net, monkeypatch):
    """Per layer, the factored token states (after the MLP) and LayerNorm scales equal the dense path's
    (norm3 outputs, 1/std of the norm4 inputs), float64, rescaled weights."""
    net = rescaled(tiny_net, 4)
    decoder, image, pe, tokens = decoder_inputs(net, neck_like(4, scale=2.0), grid_prompts(3))
    dense = {"queries": [], "scales": []}
    factored = {"queries": [], "scales": []}

    def record_queries(module, inputs, output):
        dense["queries"].append(output)

    def record_scale(module, inputs, output):
        dense["scales"].append(torch.rsqrt(inputs[0].var(-1, unbiased=False) + module.eps))

    hooks = []
    for layer in decoder.transformer.layers:
        hooks.append(layer.norm3.register_forward_hook(record_queries))
        hooks.append(layer.norm4.register_forward_hook(record_scale))
    image_to_token, layer_norm = grid_iou._image_to_token, grid_iou._layer_norm

    def recording_image_to_token(attention, queries, *args):
        factored["queries"].append(queries)
        return image_to_token(attention, queries, *args)

    def recording_layer_norm(image_tokens, norm):
        result = layer_norm(image_tokens, norm)
        factored["scales"].append(result.scales[-1])
        return result

    monkeypatch.setattr(grid_iou, "_image_to_token", recording_image_to_token)
    monkeypatch.setattr(grid_iou, "_layer_norm", recording_layer_norm)
    with torch.no_grad():
        decoder.transformer(image.expand(tokens.shape[0], -1, -1, -1), pe.expand(tokens.shape[0], -1, -1, -1),
                            tokens)
        for hook in hooks:
            hook.remove()
        iou_token_outputs(decoder.transformer, image, pe, tokens)
    for stage in ("queries", "scales"):
        assert len(dense[stage]) == len(factored[stage]) == 2
        for expected, got in zip(dense[stage], factored[stage]):
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-9, atol=1e-10)
    assert float(dense["scales"][1].std() / dense["scales"][1].mean()) > 1e-2    # the scales vary over tokens


def test_several_points_and_boxes_match_dense(tiny_net):
    """Other prompt shapes: two points with mixed labels per prompt (8 tokens), and boxes (7 tokens)."""
    net = rescaled(tiny_net, 5)
    neck = neck_like(5, scale=2.0)
    generator = torch.Generator().manual_seed(5)
    coords = torch.rand(8, 2, 2, generator=generator) * 1024
    labels = torch.randint(0, 2, (8, 2), generator=generator)
    expected = dense_ious(net, neck, (coords, labels))
    torch.testing.assert_close(prompt_ious(net, neck, (coords, labels), chunk=5), expected,
                               rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    corners = torch.sort(torch.rand(4, 2, 2, generator=generator) * 1024, dim=1).values
    boxes = corners.reshape(4, 4)                      # (x0, y0) <= (x1, y1)
    expected = dense_ious(net, neck, boxes=boxes)
    torch.testing.assert_close(prompt_ious(net, neck, boxes=boxes), expected,
                               rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_float32_under_bf16_autocast(tiny_net):
    """Autocast is switched off inside: the result is the float32 one, not a bf16 approximation."""
    neck = neck_like(6)
    prompts = grid_prompts(3)
    reference = prompt_ious(tiny_net, neck, prompts)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = prompt_ious(tiny_net, neck, prompts)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-7)
