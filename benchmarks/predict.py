"""Prediction benchmark: the whole `desam_predict` versus the bare encoder forward over the same slices.

    python -m benchmarks.predict [--encoder vit_b|tiny|litemedsam] [--volumes N] [--slices S] [--precision bf16|fp32]
                                 [--batch-size B] [--folds F] [--grid K] [--device cpu|cuda] [--repeats R]
                                 [--model-folder M]

Everything is a whole process (start-up and weight loading included): (a) loads the encoder and runs its
forward over every slice of the N volumes, preprocessed as the predictor does, through the runtime
desam_predict uses (`encoders.runtime`: ONNX Runtime for LiteMedSAM in fp32 on CPU, else torch);
(a') the same in torch eager where that differs (the encoder speed-up); (b) is `desam_predict` in box
mode; (c) grid mode with the default rule and IoU threshold; (d) and (e) grid mode with every point
accepted (IoU threshold -1), `top1` and `reference` rules, K x K points. The model folder of F untrained
folds is written here (a random SAM ViT saved as a .pth, or litemedsam's packaged weights; nothing
downloaded), or `--model-folder` names a trained one (its box runs use the same weights); same precision and
batch size, no embedding cache. Prints b/a, c/a and e/d in wall and CPU seconds; the last line is one JSON
object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.embed import timed

DATASET = "Dataset998_PredictBench"


def write_volumes(folder: Path, volumes: int, slices: int, size: tuple[int, int] = (192, 160)) -> list[Path]:
    """N prostate-like volumes (a bright ellipse in noise) in nnU-Net naming, anisotropic spacing."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    x, y = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    blob = ((x - size[0] / 2) / (size[0] / 5)) ** 2 + ((y - size[1] / 2) / (size[1] / 6)) ** 2 < 1
    paths = []
    for v in range(volumes):
        image = 200 + 50 * rng.standard_normal((*size, slices)) + 300 * blob[..., None]
        path = folder / f"Bench_Case{v:02d}_0000.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([0.6, 0.6, 3.0, 1.0])), str(path))
        paths.append(path)
    return paths


def write_model_folders(results: Path, encoder: str, checkpoint: Path, precision: str, batch_size: int,
                        folds: int) -> dict[str, Path]:
    """Untrained grid and box model folders in the trainer's layout, with a plan for this encoder."""
    import torch

    from desam_pipeline.io.atomic import write_json
    from desam_pipeline.io.nifti_io import file_sha256
    from desam_pipeline.io.results_layout import DEFAULT_TRAINER, model_folder_name
    from desam_pipeline.network import DeSAM
    from desam_pipeline.network.encoders import load_image_encoder
    from plans.planner import make_plan

    plan = make_plan(f"DeSAMPlans_{encoder}", encoder, checkpoint, file_sha256(checkpoint),
                     load_image_encoder(encoder, checkpoint),
                     precision={"cpu": precision, "cuda": precision},
                     batch_size={"cpu": batch_size, "cuda": batch_size})
    folders = {}
    for mode in ("box", "grid"):
        folder = results / DATASET / model_folder_name(DEFAULT_TRAINER, plan["plans_name"], mode, None)
        write_json(plan, folder / "plans.json")
        write_json({"channel_names": {"0": "T2"}, "labels": {"background": 0, "prostate": 1},
                    "numTraining": 0, "file_ending": ".nii.gz"}, folder / "dataset.json")
        for fold in range(folds):
            torch.manual_seed(fold)
            net = DeSAM.from_sam_checkpoint(checkpoint, encoder, plan["tap_shapes"])
            (folder / f"fold_{fold}").mkdir()
            torch.save({"network": net.inference_state_dict(),
                        "network_config": {**net.config, "encoder": encoder, "mode": mode}},
                       folder / f"fold_{fold}" / "checkpoint_final.pth")
        folders[mode] = folder
    return folders


def bare_forward(encoder: str, checkpoint: str, slices_file: str, precision: str, batch_size: int,
                 device_name: str, runtime: str) -> None:
    """Process (a): load the encoder and run its forward over the slices, nothing else; `runtime` "auto" as
    desam_predict runs it (`embedding.encode_slices`), "torch" the module in torch eager."""
    import torch

    from desam_pipeline.network.embedding import encode_slices
    from desam_pipeline.network.encoders import encoder_input, load_image_encoder
    from desam_pipeline.utilities.runtime import autocast, select_device, tune_malloc

    tune_malloc()
    device = select_device(device_name)
    image_encoder = load_image_encoder(encoder, checkpoint).to(device)
    volumes = np.load(slices_file)
    with torch.inference_mode(), autocast(device, precision):
        for name in volumes.files:
            slices = volumes[name]
            for start in range(0, len(slices), batch_size):
                if runtime == "torch":
                    image_encoder(encoder_input(image_encoder, slices[start:start + batch_size], device))
                else:
                    encode_slices(image_encoder, slices[start:start + batch_size], device, precision)
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", choices=("vit_b", "vit_l", "vit_h", "tiny", "litemedsam"), default="vit_b")
    parser.add_argument("--volumes", type=int, default=2)
    parser.add_argument("--slices", type=int, default=3, help="slices per volume")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="default: the encoder family's CPU one")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per batch (default: the plan's)")
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument("--grid", type=int, default=9)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="run every process this many times; keep the fastest")
    parser.add_argument("--model-folder", help="a trained grid-mode model folder for the grid runs (default: untrained)")
    parser.add_argument("--bare", nargs=3, metavar=("CHECKPOINT", "SLICES_NPZ", "RUNTIME"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size is None:
        from desam_pipeline.data.plan_io import DEFAULT_CHOICES

        args.batch_size = DEFAULT_CHOICES["batch_size"][args.device]
    if args.precision is None:
        from desam_pipeline.network.encoders import family

        args.precision = family(args.encoder).cpu_precision if args.device == "cpu" else "bf16"
    if args.bare:
        bare_forward(args.encoder, args.bare[0], args.bare[1], args.precision, args.batch_size, args.device,
                     args.bare[2])
        return 0

    import torch

    from desam_pipeline.data.preprocessing import preprocess_volume
    from desam_pipeline.io.nifti_io import read_volume, voxel_spacing
    from desam_pipeline.network.encoders import default_checkpoint, family, runtime
    from desam_pipeline.network.sam_models import build_sam, save_sam_checkpoint

    encoder_runtime = runtime(family(args.encoder), torch.device(args.device), args.precision)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="desam-bench-predict-") as scratch:
        scratch = Path(scratch)
        inputs = write_volumes(scratch / "in", args.volumes, args.slices)
        checkpoint = default_checkpoint(args.encoder) or save_sam_checkpoint(
            build_sam(args.encoder, seed=0), scratch / f"sam_{args.encoder}.pth")
        models = write_model_folders(scratch / "results", args.encoder, checkpoint, args.precision,
                                     args.batch_size, args.folds)
        if args.model_folder:
            models["grid"] = Path(args.model_folder)
        plan = json.loads((models["box"] / "plans.json").read_text(encoding="utf-8"))
        # One array per volume: like the predictor, the bare forward never batches across volumes.
        slices_file = scratch / "slices.npz"
        np.savez(slices_file, *[preprocess_volume(volume, plan, voxel_spacing(image))
                                for volume, image in map(read_volume, inputs)])

        def bare(runtime_choice: str) -> list[str]:
            return [sys.executable, "-m", "benchmarks.predict", "--encoder", args.encoder, "--precision",
                    args.precision, "--device", args.device, "--batch-size", str(args.batch_size),
                    "--bare", str(checkpoint), str(slices_file), runtime_choice]

        def predict(model: Path, *flags: str) -> list[str]:
            out = scratch / "out"
            shutil.rmtree(out, ignore_errors=True)
            return [sys.executable, "-m", "desam_pipeline.inference.predict", "-i", str(scratch / "in"), "-o", str(out),
                    "-m", str(model), "--device", args.device, "--grid", str(args.grid),
                    "--preprocessed", str(scratch / "no-cache"), *flags]

        # built just before each run: predict() empties the output folder
        commands = {"bare": lambda: bare("auto"), "box": lambda: predict(models["box"]),
                    "grid": lambda: predict(models["grid"]),
                    "grid_top1_all": lambda: predict(models["grid"], "--grid-rule", "top1", "--iou-threshold", "-1"),
                    "grid_reference_all": lambda: predict(models["grid"], "--grid-rule", "reference",
                                                          "--iou-threshold", "-1")}
        if encoder_runtime != "torch":
            commands["bare_torch"] = lambda: bare("torch")
        runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in commands}
        for repeat in range(args.repeats):
            for name, command in commands.items():
                runs[name].append(timed(command()))
            print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {runs[k][-1][0]:.1f} s wall / {runs[k][-1][1]:.1f} s CPU"
                                                      for k in runs), flush=True)

    slices = args.volumes * args.slices
    figures = {"encoder": args.encoder, "precision": args.precision, "device": args.device, "volumes": args.volumes,
               "slices": slices, "batch_size": args.batch_size, "folds": args.folds, "grid": args.grid,
               "encoder_runtime": encoder_runtime, "trained_model": bool(args.model_folder),
               "cpu_threads": os.cpu_count()}
    ratios = {"box_vs_bare": ("box", "bare"), "grid_vs_bare": ("grid", "bare"),
              "reference_vs_top1_all_points": ("grid_reference_all", "grid_top1_all"),
              "encoder_speedup_vs_torch": ("bare_torch", "bare")}
    for index, clock in ((0, "wall"), (1, "cpu")):
        best = {k: min(run[index] for run in runs[k]) for k in runs}
        figures.update({f"{k}_{clock}_s": round(v, 2) for k, v in best.items()})
        figures.update({f"{k}_{clock}_s_per_slice": round(v / slices, 3) for k, v in best.items()})
        for name, (top, bottom) in ratios.items():
            if top in best:
                figures[f"{name}_{clock}"] = round(best[top] / best[bottom], 3)
        print(f"{args.encoder} {args.precision} on {args.device} ({encoder_runtime}), {args.volumes} volume(s) x "
              f"{args.slices} slices, batch {args.batch_size}, {args.folds} fold(s), {args.grid}x{args.grid} grid, "
              f"{clock}: " + ", ".join(f"{name} {figures[f'{name}_{clock}']:.3f}" for name in ratios
                                       if f"{name}_{clock}" in figures)
              + " (" + ", ".join(f"{k} {v:.1f} s" for k, v in best.items()) + ")")
    figures.update({f"{k}_peak_rss_mb": round(max(run[2] for run in runs[k])) for k in runs})
    figures["load_average_start"], figures["load_average_end"] = round(load_start, 2), round(os.getloadavg()[0], 2)
    print("peak RSS: " + ", ".join(f"{k} {figures[f'{k}_peak_rss_mb']} MiB" for k in runs))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
