"""Where the time of `desam_predict` and of a training step goes, per module, with FLOPs and GFLOP/s.

    python -m benchmarks.profile [--model-folder M] [--slices S] [--grid K] [--threads T]
                                 [--skip-training] [--skip-torch-encoder]

Prediction (LiteMedSAM): one volume of S slices (default 24; a bright ellipse in noise, or `--input` NIfTI),
preprocessed as desam_predict does, encoded once by each encoder runtime (torch eager and ONNX Runtime, the
one desam_predict uses on CPU in fp32), then decoded by `predictor.decode`, the function desam_predict calls per
batch, in box mode and in grid mode under both rules, with the default IoU threshold (0.5: few or no points
accepted by an untrained IoU head) and with -1 (every point accepted). The decoders' modules are timed in
place: the k x k IoUs (`grid_iou.prompt_ious`), PRIM's dense pass, PDMM's tap branches (`encode_taps`) and its
prompt-dependent part (`decode`), the reference rule's resampling and clean-up scan; the rest is the slice
loop's own work. `--model-folder` takes a trained LiteMedSAM model folder (e.g. the demo's), else an
untrained one is written (PRIM from LiteMedSAM, PDMM random: its masks are noise, so the reference rule's scan
never stops early, its worst case).

Training: one step of the trainer's network, loss and Adam under bf16 autocast (the CPU default) at batch B
for LiteMedSAM- and vit_h-shaped features: forward per module, loss, backward, optimiser step.

FLOPs per slice (or sample) come from torch's FlopCounterMode; GFLOP/s = FLOPs / measured seconds, set
against the machine's matmul peak measured in the same process (`benchmarks.matmul_peak`). The last line is
one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.matmul_peak import measure as measure_peak

LITE_TAPS = [[128, 128, 128], [160, 64, 64], [320, 64, 64]]
VIT_H_TAPS = [[1280, 64, 64]] * 3
CONFIGS = (("box", "top1", 0.5), ("grid", "top1", 0.5), ("grid", "reference", 0.5), ("grid", "top1", -1.0),
           ("grid", "reference", -1.0))


class Clock:
    """Seconds per label, filled by wrapped callables; nested labels are subtracted from their callers."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []

    def wrap(self, owner, name: str, label: str) -> None:
        """Replace `owner.name` by a timed call (an instance attribute on objects, the attribute on modules)."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self._stack.append([0.0])
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._stack.pop()[0]
                self.seconds[label] += elapsed - inner
                self.calls[label] += 1
                if self._stack:
                    self._stack[-1][0] += elapsed

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def flops(run: Callable[[], object]) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def best_seconds(run: Callable[[], object], repeats: int = 2) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def volume_slices(args, plan: dict) -> np.ndarray:
    """The preprocessed uint8 slices of the profiled volume."""
    from benchmarks.predict import write_volumes
    from desam_pipeline.data.preprocessing import preprocess_volume
    from desam_pipeline.io.nifti_io import read_volume
    path = Path(args.input) if args.input else write_volumes(Path(args.scratch) / "in", 1, args.slices)[0]
    return preprocess_volume(read_volume(path)[0], plan)


def encoder_figures(plan: dict, slices: np.ndarray, skip_torch: bool) -> tuple[dict, tuple]:
    """Seconds per slice of the encoder in torch and in ONNX Runtime (one slice per call, the CPU batch), the
    ORT session's one-time export, FLOPs per slice, and the features ONNX Runtime gave."""
    from desam_pipeline.network import encoders, onnx_encoder
    from desam_pipeline.network.embedding import encode_slices
    cpu = torch.device("cpu")
    module = encoders.load_image_encoder(plan["encoder"], Path(plan["checkpoint"]))
    x = encoders.encoder_input(module, slices[:1])
    figures = {"encoder_gflop_per_slice": flops(lambda: module(x)) / 1e9}
    start = time.perf_counter()
    onnx_encoder.session(module)
    figures["onnx_export_and_session_s"] = time.perf_counter() - start
    start = time.perf_counter()
    neck, taps = [], []
    for s in range(len(slices)):
        n, t = encode_slices(module, slices[s:s + 1], cpu, "fp32")
        neck.append(n)
        taps.append(t)
    figures["encoder_onnxruntime_s_per_slice"] = (time.perf_counter() - start) / len(slices)
    features = torch.cat(neck), [torch.cat([t[k] for t in taps]) for k in range(3)]
    if not skip_torch:
        start = time.perf_counter()
        with torch.inference_mode():
            reference = [encoders.encode(module, encoders.encoder_input(module, slices[s:s + 1]))[0]
                         for s in range(len(slices))]
        figures["encoder_torch_s_per_slice"] = (time.perf_counter() - start) / len(slices)
        reference = torch.cat(reference)
        figures["onnxruntime_neck_relative_l2"] = float(torch.linalg.vector_norm(features[0] - reference)
                                                        / torch.linalg.vector_norm(reference))
        figures["onnxruntime_speedup"] = figures["encoder_torch_s_per_slice"] / figures[
            "encoder_onnxruntime_s_per_slice"]
    return figures, features


@contextmanager
def timed_modules(clock: Clock, net) -> Iterator[None]:
    """Time the decoder's modules in place for the duration (the wrappers are removed afterwards)."""
    from desam_pipeline.inference import grid_rules, slice_prediction
    saved = [(slice_prediction, "prompt_ious"), (grid_rules, "resample_like_sam"),
             (grid_rules.FirstMaskScan, "add")]
    originals = [getattr(owner, name) for owner, name in saved]
    clock.wrap(slice_prediction, "prompt_ious", "prompt_ious (k x k IoUs)")
    clock.wrap(grid_rules, "resample_like_sam", "reference: resample")
    clock.wrap(grid_rules.FirstMaskScan, "add", "reference: NMS + clean-up scan")
    clock.wrap(net.prim, "forward", "PRIM dense pass")
    clock.wrap(net.pdmm, "encode_taps", "PDMM tap branches")
    clock.wrap(net.pdmm, "decode", "PDMM decode (prompt-dependent)")
    try:
        yield
    finally:
        for (owner, name), original in zip(saved, originals):
            setattr(owner, name, original)
        for module, name in ((net.prim, "forward"), (net.pdmm, "encode_taps"), (net.pdmm, "decode")):
            delattr(module, name)


def decoder_figures(model_folder: Path, features, grid: int, encoder_s: float) -> dict:
    """Per configuration: decode seconds per slice in total and per module (printed as each is measured)."""
    from desam_pipeline.inference import predictor
    from desam_pipeline.inference.model import load_model
    from desam_pipeline.inference.settings import PredictionSettings
    cpu = torch.device("cpu")
    neck, taps = features
    model = load_model(model_folder, None, cpu)
    figures = {}
    for mode, rule, threshold in CONFIGS:
        model.mode = mode
        run = predictor.resolve_run(model.plan, PredictionSettings(device="cpu", grid=grid, iou_threshold=threshold,
                                                                   grid_rule=rule), cpu)
        clock = Clock()
        with timed_modules(clock, model.networks[0]):
            start = time.perf_counter()
            for b in range(0, len(neck), run.batch_size):
                predictor.decode(model, neck[b:b + run.batch_size], [t[b:b + run.batch_size] for t in taps], run)
            total = time.perf_counter() - start
        name = mode if mode == "box" else f"grid_{rule}_threshold_{threshold:g}"
        figures[name] = {"decode_s_per_slice": total / len(neck),
                         **{label: seconds / len(neck) for label, seconds in clock.seconds.items()},
                         "rest": (total - sum(clock.seconds.values())) / len(neck),
                         "calls": dict(clock.calls)}
        print_decode(name, figures[name], encoder_s)
    return figures


def module_flops(model_folder: Path, grid: int) -> dict:
    """GFLOP per slice of each decoder module (per point for PRIM's dense pass and PDMM's decode)."""
    from desam_pipeline.data.prompts import grid_points
    from desam_pipeline.inference.model import load_model
    from desam_pipeline.network.grid_iou import prompt_ious
    net = load_model(model_folder, None, "cpu").networks[0]
    neck = torch.randn(1, 256, 64, 64)
    taps = [torch.randn(1, *shape) for shape in net.config["tap_shapes"]]
    points = torch.as_tensor(grid_points(grid, net.prim.frame))[:, None, :]
    labels = torch.ones(grid * grid, 1, dtype=torch.int64)
    embedding, _ = net.prim(neck, points=(points[:1], labels[:1]))
    branches = net.pdmm.encode_taps(taps)
    return {"prompt_ious (k x k IoUs)": flops(lambda: prompt_ious(net, neck, points=(points, labels))) / 1e9,
            "PRIM dense pass": flops(lambda: net.prim(neck, points=(points[:1], labels[:1]))) / 1e9,
            "PDMM tap branches": flops(lambda: net.pdmm.encode_taps(taps)) / 1e9,
            "PDMM decode (prompt-dependent)": flops(lambda: net.pdmm.decode(branches, embedding)) / 1e9,
            "PDMM whole": flops(lambda: net.pdmm(taps, embedding)) / 1e9}


def training_figures(checkpoint: Path, tap_shapes: list, batch: int) -> dict:
    """One bf16-autocast training step of DeSAM at `batch`: seconds per part and GFLOP per sample."""
    from desam_pipeline.network import DeSAM
    from desam_pipeline.training.losses import desam_loss
    torch.manual_seed(0)
    net = DeSAM.from_sam_checkpoint(checkpoint, "litemedsam", tap_shapes).train()
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    neck = torch.randn(batch, 256, 64, 64)
    taps = [torch.randn(batch, *shape) for shape in tap_shapes]
    points = (torch.rand(batch, 1, 2) * net.prim.frame, torch.ones(batch, 1, dtype=torch.int64))
    label = (torch.rand(batch, 256, 256) > 0.7).float()
    iou_target = torch.rand(batch)
    parts: dict[str, float] = defaultdict(float)

    def step(record: bool) -> None:
        marks = [time.perf_counter()]

        def mark(name: str) -> None:
            marks.append(time.perf_counter())
            if record:
                parts[name] += marks[-1] - marks[-2]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embedding, iou = net.prim(neck, points=points)
            mark("forward PRIM")
            branches = net.pdmm.encode_taps(taps)
            mark("forward PDMM tap branches")
            logits = net.pdmm.decode(branches, embedding)
            mark("forward PDMM decode")
        loss, _ = desam_loss(logits, label, iou, iou_target)
        mark("loss")
        loss.backward()
        mark("backward")
        optimizer.step()
        mark("Adam step")

    step(False)
    repeats = 2
    for _ in range(repeats):
        step(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), FlopCounterMode(display=False) as counter:
        embedding, iou = net.prim(neck, points=points)
        logits = net.pdmm(taps, embedding)
        forward_flops = counter.get_total_flops()
        desam_loss(logits, label, iou, iou_target)[0].backward()
        total_flops = counter.get_total_flops()
    seconds = {name: value / repeats for name, value in parts.items()}
    step_s = sum(seconds.values())
    return {"batch": batch, "step_s": step_s, "samples_per_s": batch / step_s, **seconds,
            "gflop_per_sample_forward": forward_flops / batch / 1e9,
            "gflop_per_sample_step": total_flops / batch / 1e9,
            "step_gflops": total_flops / step_s / 1e9}


def print_encoder(encoder: dict, slices: int) -> None:
    print(f"encoder (LiteMedSAM, {slices} slices, fp32, one slice per call): "
          f"{encoder['encoder_gflop_per_slice']:.1f} GFLOP/slice; ONNX Runtime "
          f"{encoder['encoder_onnxruntime_s_per_slice']:.3f} s/slice "
          f"({encoder['encoder_gflop_per_slice'] / encoder['encoder_onnxruntime_s_per_slice']:.0f} GFLOP/s)"
          + (f", torch {encoder['encoder_torch_s_per_slice']:.3f} s/slice "
             f"({encoder['encoder_gflop_per_slice'] / encoder['encoder_torch_s_per_slice']:.0f} GFLOP/s), "
             f"x{encoder['onnxruntime_speedup']:.2f}, neck relative L2 {encoder['onnxruntime_neck_relative_l2']:.1e}"
             if "encoder_torch_s_per_slice" in encoder else "")
          + f"; one-time export + session {encoder['onnx_export_and_session_s']:.1f} s", flush=True)


def print_decode(name: str, row: dict, encoder_s: float) -> None:
    print(f"\n{name}: decode {row['decode_s_per_slice']:.3f} s/slice (+ encoder {encoder_s:.3f}) = "
          f"{row['decode_s_per_slice'] + encoder_s:.3f} s/slice")
    for label, seconds in row.items():
        if label in ("decode_s_per_slice", "calls"):
            continue
        calls = row["calls"].get(label, "")
        print(f"  {label:34s} {seconds:7.3f} s/slice" + (f"  ({calls} calls)" if calls else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-folder", help="a trained LiteMedSAM model folder (default: an untrained one)")
    parser.add_argument("--input", help="a NIfTI volume to predict (default: a generated one of --slices slices)")
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--grid", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-torch-encoder", action="store_true", help="time only the ONNX Runtime encoder")
    args = parser.parse_args(argv)
    from desam_pipeline.io.atomic import read_json
    from desam_pipeline.network.encoders import packaged_checkpoint
    from desam_pipeline.utilities.runtime import tune_malloc
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    figures: dict = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="desam-bench-profile-") as scratch:
        args.scratch = scratch
        if args.model_folder:
            model_folder = Path(args.model_folder)
        else:
            from benchmarks.predict import write_model_folders
            model_folder = write_model_folders(Path(scratch) / "results", "litemedsam", packaged_checkpoint(),
                                               "fp32", 1, 1)["grid"]
        plan = read_json(model_folder / "plans.json")
        slices = volume_slices(args, plan)
        figures["encoder"], features = encoder_figures(plan, slices, args.skip_torch_encoder)
        print_encoder(figures["encoder"], len(slices))
        figures["gflop_per_slice"] = module_flops(model_folder, args.grid)
        print("GFLOP per slice (PRIM dense and PDMM decode: per point): "
              + ", ".join(f"{k} {v:.2f}" for k, v in figures["gflop_per_slice"].items()), flush=True)
        figures["decode"] = decoder_figures(model_folder, features, args.grid,
                                            figures["encoder"]["encoder_onnxruntime_s_per_slice"])
    if not args.skip_training:
        figures["training"] = {}
        for name, taps, batch in (("litemedsam", LITE_TAPS, 4), ("litemedsam", LITE_TAPS, 8),
                                  ("vit_h_shaped", VIT_H_TAPS, 4), ("vit_h_shaped", VIT_H_TAPS, 8)):
            row = training_figures(packaged_checkpoint(), taps, batch)
            figures["training"][f"{name}_batch{batch}"] = row
            print(f"\ntraining step, {name} features, batch {batch}, bf16 autocast: {row['step_s']:.2f} s "
                  f"({row['samples_per_s']:.2f} samples/s, {row['gflop_per_sample_step']:.0f} GFLOP per sample, "
                  f"{row['step_gflops']:.0f} GFLOP/s)")
            for label in ("forward PRIM", "forward PDMM tap branches", "forward PDMM decode", "loss", "backward",
                          "Adam step"):
                print(f"  {label:28s} {row[label]:7.3f} s", flush=True)
    figures["peak"] = measure_peak(3)
    print(f"\nmatmul peak, {figures['threads']} threads: fp32 {figures['peak']['peak_fp32_gflops']} GFLOP/s, "
          f"bf16 {figures['peak']['peak_bf16_gflops']} GFLOP/s")
    figures["load_average_start"], figures["load_average_end"] = round(load_start, 2), round(os.getloadavg()[0], 2)
    print(json.dumps(figures, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
