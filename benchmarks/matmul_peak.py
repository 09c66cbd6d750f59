"""The machine's measured matmul peak: what the profile's GFLOP/s are compared against.

    python -m benchmarks.matmul_peak [--threads T] [--repeats R]

Best of R runs, in GFLOP/s (2 flops per multiply-add), with torch's thread count (default: all cores):
- `gemm`: torch.mm of 2048 x 2048 by 2048 x 2048 (MKL), fp32 and bf16;
- `conv3x3`: a 3x3 convolution of 128 -> 128 channels on 128 x 128 pixels, batch 4 (oneDNN), the kernel
  PDMM's time goes to, fp32 and bf16;
- `onnxruntime_gemm`: the same fp32 GEMM as a one-node ONNX MatMul under ONNX Runtime (its MLAS kernels).
The peak is the best of them per dtype. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

GEMM = (2048, 2048, 2048)
CONV = (4, 128, 128, 128)  # batch, channels in = out, side


def best_rate(run: Callable[[], object], flops: float, repeats: int) -> float:
    """GFLOP/s of the fastest of `repeats` calls, after one warm-up call."""
    run()
    best = min(_seconds(run) for _ in range(repeats))
    return flops / best / 1e9


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def onnx_gemm_session(k: int, n: int, threads: int):
    """An ONNX Runtime session of one MatMul (m x k by a constant k x n, float32)."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure(repeats: int) -> dict[str, float]:
    m, k, n = GEMM
    batch, channels, _, side = CONV
    conv_flops = 2.0 * batch * side * side * channels * channels * 9
    figures = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        figures[f"gemm_{name}_gflops"] = best_rate(lambda: a @ b, 2.0 * m * k * n, repeats)
        x = torch.randn(batch, channels, side, side, dtype=dtype)
        w = torch.randn(channels, channels, 3, 3, dtype=dtype)
        with torch.no_grad():
            figures[f"conv3x3_{name}_gflops"] = best_rate(lambda: F.conv2d(x, w, padding=1), conv_flops, repeats)
    session = onnx_gemm_session(k, n, torch.get_num_threads())
    feed = {"x": np.random.default_rng(1).standard_normal((m, k), np.float32)}
    figures["onnxruntime_gemm_fp32_gflops"] = best_rate(lambda: session.run(None, feed), 2.0 * m * k * n, repeats)
    for name in ("fp32", "bf16"):
        figures[f"peak_{name}_gflops"] = max(v for key, v in figures.items() if f"_{name}_" in key)
    return {key: round(value, 1) for key, value in figures.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    figures = {"threads": torch.get_num_threads(), **measure(args.repeats), "load_average_start": round(load, 2),
               "load_average_end": round(os.getloadavg()[0], 2)}
    for key, value in figures.items():
        print(f"{key:32s} {value}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
