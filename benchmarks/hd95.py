"""`python -m benchmarks.hd95`: HD95 (and all four metrics) on a 512x512x60 prostate-sized volume pair, one thread.

The reference is a lobed ellipsoid about 45 x 35 x 36 mm at 0.5 x 0.5 x 3 mm voxels; the prediction is
a shifted, rescaled copy plus two small false-positive blobs far away, which widens the crop as real
failures do (also timed without them). Prints the best of several runs and, once, MedPy's uncropped HD95 for comparison.
Last line: one JSON object of figures.
"""
from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from desam_pipeline.utilities.metrics import compute_metrics, hd95  # noqa: E402

SHAPE = (512, 512, 60)
SPACING = (0.5, 0.5, 3.0)
REPEATS = 5


def prostate(shape, spacing, centre_mm, radii_mm, seed: int) -> np.ndarray:
    """A lobed ellipsoid (radius modulated by a few low-order harmonics), computed in its bounding box."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    lo = [max(int((c - 1.4 * r) / s), 0) for c, r, s in zip(centre_mm, radii_mm, spacing)]
    hi = [min(int((c + 1.4 * r) / s) + 1, n) for c, r, s, n in zip(centre_mm, radii_mm, spacing, shape)]
    grid = np.meshgrid(*[np.arange(a, b) * s for a, b, s in zip(lo, hi, spacing)], indexing="ij")
    offsets = [(g - c) / r for g, c, r in zip(grid, centre_mm, radii_mm)]
    radius = np.sqrt(sum(o ** 2 for o in offsets))
    angle = np.arctan2(offsets[1], offsets[0])
    lobes = 1 + sum(rng.uniform(0.03, 0.08) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = radius <= lobes
    return mask


def volume_pair(stray: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction; `stray` adds the two far false-positive blobs."""
    centre = np.array([128.0, 120.0, 90.0])
    reference = prostate(SHAPE, SPACING, centre, (22.5, 17.5, 18.0), seed=0)
    prediction = prostate(SHAPE, SPACING, centre + [2.0, -1.5, 3.0], (24.0, 16.5, 16.0), seed=1)
    if not stray:
        return reference, prediction
    prediction |= prostate(SHAPE, SPACING, (60.0, 40.0, 60.0), (3.0, 3.0, 4.0), seed=2)
    prediction |= prostate(SHAPE, SPACING, (200.0, 210.0, 130.0), (4.0, 3.0, 5.0), seed=3)
    return reference, prediction


def best_time(function, repeats: int = REPEATS) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    reference, prediction = volume_pair()
    print(f"volume {SHAPE} at {SPACING} mm: reference {reference.sum()} voxels, prediction {prediction.sum()} voxels")
    hd95_s, value = best_time(lambda: hd95(reference, prediction, SPACING))
    all_s, metrics = best_time(lambda: compute_metrics(reference, prediction, SPACING))
    print(f"hd95 (cropped EDT, 1 thread): {hd95_s:.3f} s, value {value:.4f} mm")
    print(f"compute_metrics (dice, hd95, assd, nsd): {all_s:.3f} s, {metrics}")
    tight = volume_pair(stray=False)
    tight_s, tight_value = best_time(lambda: hd95(*tight, SPACING))
    print(f"hd95 without the stray blobs (crop around the organ only): {tight_s:.3f} s, value {tight_value:.4f} mm")
    figures = {"hd95_s": round(hd95_s, 4), "compute_metrics_s": round(all_s, 4), "hd95_mm": round(value, 4),
               "hd95_no_stray_s": round(tight_s, 4)}
    try:
        from medpy.metric.binary import hd95 as medpy_hd95
    except ImportError:
        print("medpy not installed: no comparison")
    else:
        medpy_s, medpy_value = best_time(lambda: medpy_hd95(prediction, reference, voxelspacing=SPACING), repeats=1)
        print(f"medpy hd95 (whole volume): {medpy_s:.3f} s, value {medpy_value:.4f} mm, "
              f"|difference| {abs(medpy_value - value):.2e}")
        figures |= {"medpy_hd95_s": round(medpy_s, 4), "medpy_abs_difference": float(abs(medpy_value - value))}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
