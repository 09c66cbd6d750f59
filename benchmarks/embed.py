"""Embedding benchmark: the bare `image_encoder` forward versus the whole `desam_plan_and_embed`.

    python -m benchmarks.embed [--encoder vit_b|tiny|litemedsam] [--slices N] [--precision bf16|fp32]
                               [--batch-size B] [--repeats R] [--compare-precision]

Both are measured as whole processes (start-up, weight loading and everything else included)
over the same preprocessed slices, with the same encoder, precision and batch size: (a) loads
the encoder and runs its forward, (b) is the full command (dataset check, fingerprint, plan,
checkpoint hash, preprocessing, encoding, fsynced cache writes). A SAM ViT is randomly
initialised and saved as a .pth; litemedsam uses its packaged weights (nothing is downloaded).
Prints b/a, slices/s, peak RSS and the cache's bytes per slice against the float16 array sizes;
`--compare-precision` adds seconds per slice of the bare encoder in fp32 and in bf16 and the
neck's relative L2 error of bf16 against fp32. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

DATASET = "Dataset999_EmbedBench"
CASE = "Bench_Case00"


def write_dataset(raw_root: Path, slices: int, size: int = 192) -> Path:
    """One case of `slices` axial slices, each with foreground, in nnU-Net v2 layout plus domains."""
    rng = np.random.default_rng(0)
    folder = raw_root / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    x, y = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    disc = ((x - size / 2) ** 2 + (y - size / 2) ** 2) < (size / 5) ** 2
    label = np.repeat(disc[..., None], slices, axis=2)
    image = (200 + 50 * rng.standard_normal((size, size, slices)) + 300 * label).astype(np.float32)
    affine = np.diag([0.6, 0.6, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(folder / "imagesTr" / f"{CASE}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(folder / "labelsTr" / f"{CASE}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2"}, "labels": {"background": 0, "prostate": 1}, "numTraining": 1,
        "file_ending": ".nii.gz", "domains": {CASE: "Bench"}}), encoding="utf-8")
    return folder


def bare_forward(encoder: str, checkpoint: str, slices_file: str, precision: str, batch_size: int) -> None:
    """Process (a): load the encoder and run its forward over the slices, nothing else."""
    import torch

    from desam_pipeline.network.encoders import encoder_input, load_image_encoder
    from desam_pipeline.utilities.runtime import autocast, tune_malloc

    tune_malloc()
    image_encoder = load_image_encoder(encoder, checkpoint)
    slices = np.load(slices_file)
    device = torch.device("cpu")
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, len(slices), batch_size):
            image_encoder(encoder_input(image_encoder, slices[start:start + batch_size], device))


def compare_precision(encoder: str, checkpoint: str, slices: np.ndarray) -> dict:
    """Seconds per slice of the bare encoder (batch 1, after one warm-up slice) in fp32 and bf16, and
    the neck's relative L2 error and cosine of bf16 against fp32 over the slices."""
    import torch

    from desam_pipeline.network.encoders import encoder_input, load_image_encoder
    from desam_pipeline.utilities.runtime import autocast, tune_malloc

    tune_malloc()
    image_encoder = load_image_encoder(encoder, checkpoint)
    device = torch.device("cpu")
    necks, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        with torch.inference_mode(), autocast(device, precision):
            image_encoder(encoder_input(image_encoder, slices[:1], device))
            start, outputs = time.perf_counter(), []
            for i in range(len(slices)):
                outputs.append(image_encoder(encoder_input(image_encoder, slices[i:i + 1], device)).float())
            seconds[precision] = (time.perf_counter() - start) / len(slices)
        necks[precision] = torch.cat(outputs)
    error = torch.linalg.vector_norm(necks["bf16"] - necks["fp32"]) / torch.linalg.vector_norm(necks["fp32"])
    cosine = torch.nn.functional.cosine_similarity(necks["bf16"].flatten(), necks["fp32"].flatten(), dim=0)
    return {"fp32_s_per_slice": round(seconds["fp32"], 3), "bf16_s_per_slice": round(seconds["bf16"], 3),
            "bf16_speedup": round(seconds["fp32"] / seconds["bf16"], 3),
            "bf16_neck_relative_l2": round(float(error), 5), "bf16_neck_cosine": round(float(cosine), 6)}


def timed(command: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one child process.

    A failure stops the benchmark. CPU time is reported besides wall time because other work
    on the machine stretches wall time far more than CPU time.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    error = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        sys.exit(f"benchmark step failed ({' '.join(command[:4])} ...):\n{error[-2000:]}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", choices=("vit_b", "vit_l", "vit_h", "tiny", "litemedsam"), default="vit_b")
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="default: the encoder family's CPU default")
    parser.add_argument("--compare-precision", action="store_true",
                        help="also time the bare encoder in fp32 and bf16 and measure bf16's neck error")
    parser.add_argument("--batch-size", type=int, help="default: the plan's CPU default")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate a and b this many times; ratio = fastest b / fastest a")
    parser.add_argument("--bare", nargs=2, metavar=("CHECKPOINT", "SLICES_NPY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare:
        bare_forward(args.encoder, args.bare[0], args.bare[1], args.precision, args.batch_size)
        return 0

    from desam_pipeline.data.plan_io import DEFAULT_CHOICES
    from desam_pipeline.data.preprocessing import preprocess_volume
    from desam_pipeline.io.nifti_io import read_volume
    from desam_pipeline.network import encoders
    from desam_pipeline.network.sam_models import build_sam, save_sam_checkpoint

    args.batch_size = args.batch_size or DEFAULT_CHOICES["batch_size"]["cpu"]
    args.precision = args.precision or encoders.family(args.encoder).cpu_precision
    shapes = encoders.feature_shapes(encoders.build_image_encoder(args.encoder))
    load_before = os.getloadavg()[0]  # other work on the machine skews both timings; reported with them
    with tempfile.TemporaryDirectory(prefix="desam-bench-embed-") as scratch:
        scratch = Path(scratch)
        raw = write_dataset(scratch / "raw", args.slices)
        checkpoint = encoders.default_checkpoint(args.encoder) or save_sam_checkpoint(
            build_sam(args.encoder, seed=0), scratch / f"sam_{args.encoder}.pth")
        volume, _ = read_volume(raw / "imagesTr" / f"{CASE}_0000.nii.gz")
        slices = preprocess_volume(volume, DEFAULT_CHOICES)
        np.save(scratch / "slices.npy", slices)
        common = ["--encoder", args.encoder, "--precision", args.precision, "--batch-size", str(args.batch_size)]
        bare_command = [sys.executable, "-m", "benchmarks.embed", *common,
                        "--bare", str(checkpoint), str(scratch / "slices.npy")]
        # Untimed warm-up with no slices: brings torch's libraries and the checkpoint into the page cache.
        np.save(scratch / "no_slices.npy", np.zeros((0, 256, 256), np.uint8))
        timed(bare_command[:-1] + [str(scratch / "no_slices.npy")])
        bare, pipeline = [], []
        for repeat in range(args.repeats):
            bare.append(timed(bare_command))
            preprocessed = scratch / f"preprocessed{repeat}"
            pipeline.append(timed([sys.executable, "-m", "plans.plan_and_embed", "-d", DATASET, *common,
                                   "--checkpoint", str(checkpoint), "--slices", "all", "--device", "cpu",
                                   "--raw", str(scratch / "raw"), "--preprocessed", str(preprocessed)]))
            print(f"repeat {repeat + 1}: (a) bare forward {bare[-1][0]:.1f} s ({bare[-1][1]:.1f} s CPU), "
                  f"(b) desam_plan_and_embed {pipeline[-1][0]:.1f} s ({pipeline[-1][1]:.1f} s CPU)", flush=True)
        case_dir = preprocessed / DATASET / f"DeSAMPlans_{args.encoder}" / CASE
        cache_bytes = sum(path.stat().st_size for path in case_dir.iterdir())
        precisions = compare_precision(args.encoder, str(checkpoint), slices) if args.compare_precision else {}

    a, b = min(t for t, _, _ in bare), min(t for t, _, _ in pipeline)
    paired = [round(pb[0] / pa[0], 3) for pa, pb in zip(bare, pipeline)]
    cpu_paired = [round(pb[1] / pa[1], 3) for pa, pb in zip(bare, pipeline)]
    features = sum(int(np.prod(shape)) for shape in shapes.values()) * 2
    arrays = features + 2 * 256 * 256
    figures = {
        "encoder": args.encoder, "precision": args.precision, "slices": args.slices, "batch_size": args.batch_size,
        "bare_s": round(a, 2), "pipeline_s": round(b, 2), "ratio": round(b / a, 3),
        "paired_ratios": paired, "cpu_ratio_median": round(float(np.median(cpu_paired)), 3), "cpu_paired_ratios": cpu_paired,
        "bare_slices_per_s": round(args.slices / a, 4), "pipeline_slices_per_s": round(args.slices / b, 4),
        "bare_peak_rss_mb": round(max(r for _, _, r in bare)),
        "pipeline_peak_rss_mb": round(max(r for _, _, r in pipeline)),
        "bytes_per_slice": round(cache_bytes / args.slices), "float16_feature_bytes_per_slice": features,
        "float16_arrays_bytes_per_slice": arrays,
        "bytes_vs_float16_features": round(cache_bytes / args.slices / features, 4),
        "bytes_vs_arrays": round(cache_bytes / args.slices / arrays, 4),
        **precisions,
        "load_average_start": round(load_before, 2), "load_average_end": round(os.getloadavg()[0], 2),
    }
    print(f"{args.encoder} {args.precision}, {args.slices} slices, batch {args.batch_size}, CPU threads "
          f"{os.cpu_count()}: b/a = {figures['ratio']:.3f} (a {a:.1f} s, b {b:.1f} s; "
          f"{figures['bare_slices_per_s']:.3f} vs {figures['pipeline_slices_per_s']:.3f} slices/s); "
          f"per repeat b/a {paired}, CPU time b/a {cpu_paired}")
    print(f"peak RSS: a {figures['bare_peak_rss_mb']} MiB, b {figures['pipeline_peak_rss_mb']} MiB; "
          f"cache {figures['bytes_per_slice']} bytes/slice = {figures['bytes_vs_float16_features']:.4f} x the "
          f"float16 neck+taps ({features} bytes), {figures['bytes_vs_arrays']:.4f} x those plus the uint8 image "
          f"and label ({arrays} bytes)")
    if precisions:
        print(f"bare encoder, batch 1: fp32 {precisions['fp32_s_per_slice']} s/slice, bf16 "
              f"{precisions['bf16_s_per_slice']} s/slice (x{precisions['bf16_speedup']}); bf16 neck vs fp32: "
              f"relative L2 {precisions['bf16_neck_relative_l2']}, cosine {precisions['bf16_neck_cosine']}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
