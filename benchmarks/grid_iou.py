"""`python -m benchmarks.grid_iou`: IoU of a k x k point grid on one slice, PRIM's dense path vs the factored one.

    python -m benchmarks.grid_iou [--grid K] [--repeats R] [--threads T] [--encoder tiny|vit_b|...]

Same process, same slice, same weights (the tiny SAM's decoder; the decoder is identical for every
SAM variant): (a) dense, all K*K prompts in one batch as grid inference does; (b) dense, 8 prompts
at a time; (c) `network.grid_iou.prompt_ious`; (d) for scale, one whole-box slice through
`predict_slices` (PRIM + PDMM with the --encoder's tap width). Best of R runs, wall and CPU
seconds, runs interleaved so that load from other processes hits them alike. The last line is
one JSON object of figures.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from desam_pipeline.data.prompts import grid_points
from desam_pipeline.inference.slice_prediction import predict_slices
from desam_pipeline.network import DeSAM, sam_models
from desam_pipeline.network.grid_iou import prompt_ious
from desam_pipeline.utilities.runtime import tune_malloc


def timed(function) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--encoder", default="vit_b", choices=sam_models.ENCODERS)
    args = parser.parse_args()
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = sam_models.ensure_tiny_checkpoint(Path(tmp) / "sam_tiny.pth")
        tiny = DeSAM.from_sam_checkpoint(checkpoint, "tiny", [[32, 64, 64]] * 3).eval()
    net = DeSAM.for_encoder(args.encoder, [[sam_models.encoder_width(args.encoder), 64, 64]] * 3).eval()
    net.prim.load_state_dict(tiny.prim.state_dict())
    generator = torch.Generator().manual_seed(0)
    neck = torch.randn(1, 256, 64, 64, generator=generator)
    taps = [torch.randn(1, *shape, generator=generator) for shape in net.config["tap_shapes"]]
    points = torch.as_tensor(grid_points(args.grid, net.prim.frame))[:, None, :]
    labels = torch.ones(points.shape[:2], dtype=torch.int64)
    count = points.shape[0]

    def dense(batch: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([net.prim(neck.expand(len(points[i:i + batch]), -1, -1, -1),
                                       points=(points[i:i + batch], labels[i:i + batch]))[1][:, 0]
                              for i in range(0, count, batch)])

    cases = {"dense_all": lambda: dense(count), "dense_by8": lambda: dense(8),
             "factored": lambda: prompt_ious(net, neck, (points, labels)),
             "box_slice": lambda: predict_slices(net, neck, taps, mode="box")}
    best = {name: (float("inf"), float("inf")) for name in cases}
    results = {}
    for _ in range(args.repeats):
        for name, case in cases.items():
            wall, cpu, results[name] = timed(case)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    difference = float((results["factored"] - results["dense_all"]).abs().max())
    figures = {"prompts": count, "threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
               "max_abs_iou_difference": difference}
    for name, (wall, cpu) in best.items():
        figures[f"{name}_wall_s"] = round(wall, 3)
        figures[f"{name}_cpu_s"] = round(cpu, 3)
    for kind in ("wall", "cpu"):
        factored = figures[f"factored_{kind}_s"]
        figures[f"speedup_vs_dense_all_{kind}"] = round(figures[f"dense_all_{kind}_s"] / factored, 1)
        figures[f"speedup_vs_dense_by8_{kind}"] = round(figures[f"dense_by8_{kind}_s"] / factored, 1)
        figures[f"factored_over_box_slice_{kind}"] = round(factored / figures[f"box_slice_{kind}_s"], 2)
    for name, value in figures.items():
        print(f"{name:>34}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
