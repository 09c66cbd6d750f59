"""Intensity-augmented views of a case's uint8 slices, cached for training; numpy only. Two kinds:

- `nnunet` (the default): nnU-Net's intensity augmentations from batchgenerators (Gaussian noise, Gaussian
  blur, multiplicative brightness, contrast, simulated low resolution, gamma and inverted gamma), with higher
  probabilities than nnU-Net's, as a cached view is drawn many times. Each slice is z-scored before the
  transforms (the scale nnU-Net's parameters are set for) and mapped back to its own mean and spread.
- `location_scale`: SLAug's (AAAI 2023) global and local location-scale augmentation, for sites that differ
  in contrast, such as CT and MR, where the order of the tissues' brightness changes. Odd views are global:
  each slice's intensities go through one random increasing Bezier curve, then a random scale (0.9-1.1) and
  shift. Even views are local: each label class of the slice (the background included) gets its own random
  curve, not monotonic for the background and with probability 0.5 for each structure, and its own scale and
  shift, so a structure can turn darker or brighter than its neighbours. Local views need the labels.
- `scale`: nnU-Net's scaling, for sites whose fields of view differ (the same organ spans more or fewer
  pixels once each slice is resized to the encoder's input): each slice is zoomed about its centre by a
  factor drawn log-uniformly in 0.7-1.4 (nnU-Net's range), cubic for the image and nearest for the label,
  and cropped or padded with 0 back to its size.

The intensity kinds clip to 0..255 and leave voxels that were exactly 0 at 0, like the preprocessing; they
move no pixel, so the label of every view is the original's. A `scale` view moves pixels: `view_labels`
gives its labels, which the cache keeps per view. Views are seeded per case and view, so a re-run caches
the same views.

The plan's `augmented_views` entry (absent when there are none): {"count": K, "sites": [...] or null (all),
"seed": ..., "transforms": [...]}, plus "kind": "location_scale" for that kind; K views are cached for the
cases of those sites (the training sources).
"""
from __future__ import annotations

import contextlib
import random
import zlib
from typing import Iterator

import numpy as np
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import (BrightnessMultiplicativeTransform,
                                                         ContrastAugmentationTransform, GammaTransform)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from skimage.transform import AffineTransform, warp

from desam_pipeline.data.plan_io import DEFAULT_VIEW_KIND, VIEW_KINDS
from desam_pipeline.utilities.errors import DesamError

VIEW_SEED = 20240
TRANSFORMS = ["gaussian_noise(var 0-0.1, p 0.5)", "gaussian_blur(sigma 0.5-1, p 0.3)",
              "brightness_multiplicative(0.75-1.25, p 0.5)", "contrast(0.75-1.25, p 0.5)",
              "simulate_low_resolution(zoom 0.5-1, p 0.3)", "gamma_inverted(0.7-1.5, p 0.2)",
              "gamma(0.7-1.5, p 0.5)"]
LOCATION_SCALE = ["odd views, global: per slice one random increasing Bezier intensity curve, scale 0.9-1.1, "
                  "shift N(0, 0.5)", "even views, local: per slice and label class one random Bezier curve (not "
                  "monotonic: background always, structures with p 0.5), scale 0.9-1.1, shift N(0, 0.5)"]
SCALE_RANGE = (0.7, 1.4)  # nnU-Net's default scaling range
SCALE = [f"per slice, zoom about the centre by a factor log-uniform in {SCALE_RANGE[0]}-{SCALE_RANGE[1]}, cubic "
         f"for the image, nearest for the label, cropped or padded with 0 to the slice size"]
DESCRIPTIONS = {"nnunet": TRANSFORMS, "location_scale": LOCATION_SCALE, "scale": SCALE}
MOVING_KINDS = ("scale",)  # kinds whose views move pixels: each view has labels of its own
BEZIER_SAMPLES = 1001
_T = np.linspace(0.0, 1.0, BEZIER_SAMPLES)
# The cubic Bernstein polynomials at BEZIER_SAMPLES points: a curve's samples are its control points times this.
BEZIER_BASIS = np.stack([(1 - _T) ** 3, 3 * _T * (1 - _T) ** 2, 3 * _T ** 2 * (1 - _T), _T ** 3])
SHIFT_PERCENTILE = 20  # a shift keeps the region's 20th to 80th percentile inside 0..1 (SLAug's slide limit)


def plan_entry(count: int | None, sites: list[str] | None, existing: dict | None,
               kind: str | None = None) -> dict | None:
    """The plan's `augmented_views` entry: from the flags when given (count 0 removes it), else the existing
    plan's. `kind` is written only when it is not the default, so plans made before kinds keep their hash."""
    if count is None:
        if kind is not None:
            raise DesamError("--view-kind needs --augmented-views K (how many views to cache)")
        return (existing or {}).get("augmented_views")
    if count < 0:
        raise DesamError(f"--augmented-views must be >= 0, got {count}")
    kind = kind or DEFAULT_VIEW_KIND
    if kind not in VIEW_KINDS:
        raise DesamError(f"unknown --view-kind {kind!r}: expected one of {', '.join(VIEW_KINDS)}")
    if count == 0:
        return None
    entry = {"count": int(count), "sites": sorted(set(sites)) if sites else None, "seed": VIEW_SEED,
             "transforms": DESCRIPTIONS[kind]}
    return entry if kind == DEFAULT_VIEW_KIND else {**entry, "kind": kind}


def view_kind(plan: dict) -> str:
    """The kind of the plan's augmented views (plans without `kind` made nnU-Net's)."""
    return (plan.get("augmented_views") or {}).get("kind", DEFAULT_VIEW_KIND)


def views_for(plan: dict, site: str) -> int:
    """How many augmented views the plan caches for a case of this site."""
    entry = plan.get("augmented_views")
    if not entry or (entry["sites"] is not None and site not in entry["sites"]):
        return 0
    return int(entry["count"])


def _pipeline() -> Compose:
    return Compose([
        GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_sample=0.5),
        GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.3, p_per_channel=1),
        BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.5),
        ContrastAugmentationTransform(contrast_range=(0.75, 1.25), p_per_sample=0.5),
        SimulateLowResolutionTransform(zoom_range=(0.5, 1), per_channel=True, p_per_channel=1, order_downsample=0,
                                       order_upsample=3, p_per_sample=0.3),
        GammaTransform((0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.2),
        GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.5),
    ])


@contextlib.contextmanager
def _seeded_global_generators(seed: int) -> Iterator[None]:
    """batchgenerators draws from numpy's and Python's global generators: seed both for the call, then
    restore them."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def view_seed(seed: int, case: str, view: int) -> int:
    """A 32-bit seed that depends only on the plan's seed, the case id and the view number."""
    return int(np.random.SeedSequence([seed, zlib.crc32(case.encode()), view]).generate_state(1)[0])


def make_views(slices: np.ndarray, count: int, case: str, seed: int = VIEW_SEED, kind: str = DEFAULT_VIEW_KIND,
               labels: np.ndarray | None = None) -> np.ndarray:
    """(count, S, H, W) uint8 augmented copies of a case's (S, H, W) uint8 slices; view k is seeded by
    (seed, case, k). `labels` (S, H, W), the case's label classes, are needed by location_scale's local views."""
    slices = np.asarray(slices)
    if slices.ndim != 3 or slices.dtype != np.uint8:
        raise ValueError(f"{case}: expected (S, H, W) uint8 slices, got {slices.shape} {slices.dtype}")
    views = np.empty((count, *slices.shape), np.uint8)
    if kind == "scale":
        for k in range(count):
            views[k] = _zoomed(slices, _zoom_factors(seed, case, k, len(slices)), order=3)
        return views
    if kind == "location_scale":
        if labels is None or np.shape(labels) != slices.shape:
            raise ValueError(f"{case}: location_scale views need the labels, shaped like the slices {slices.shape}")
        for k in range(count):
            views[k] = _location_scale_view(slices, np.asarray(labels), view_seed(seed, case, k + 1), k % 2 == 1)
        return views
    if kind != DEFAULT_VIEW_KIND:
        raise ValueError(f"unknown augmented view kind {kind!r}: expected one of {', '.join(VIEW_KINDS)}")
    data = slices[:, None].astype(np.float32)
    mean = data.mean(axis=(2, 3), keepdims=True)
    std = np.maximum(data.std(axis=(2, 3), keepdims=True), 1e-3)
    zscored = (data - mean) / std
    transforms = _pipeline()
    for k in range(count):
        with _seeded_global_generators(view_seed(seed, case, k + 1)):
            augmented = transforms(data=zscored.copy())["data"]
        restored = np.clip(np.round(augmented * std + mean), 0, 255)[:, 0]
        restored[slices == 0] = 0
        views[k] = restored.astype(np.uint8)
    return views


def _bezier_curve(rng: np.random.Generator, values: np.ndarray, monotonic: bool) -> np.ndarray:
    """`values` through a random cubic Bezier curve from (min, min) to (max, max), as SLAug draws it: two inner
    control points uniform in the range; the curve's y is sorted too when it must be increasing."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return values
    xs = np.array([low, *rng.uniform(low, high, 2), high])
    ys = np.array([low, *rng.uniform(low, high, 2), high])
    curve_x, curve_y = np.sort(xs @ BEZIER_BASIS), ys @ BEZIER_BASIS
    return np.interp(values, curve_x, np.sort(curve_y) if monotonic else curve_y)


def _location_scale(rng: np.random.Generator, values: np.ndarray) -> np.ndarray:
    """A random scale (N(1, 0.1) within 0.9-1.1) and shift (N(0, 0.5), limited so that the values' 20th to
    80th percentile stay inside 0..1), clipped to 0..1."""
    scale = float(np.clip(rng.normal(1.0, 0.1), 0.9, 1.1))
    low, high = np.percentile(values, [SHIFT_PERCENTILE, 100 - SHIFT_PERCENTILE])
    shift = float(np.clip(rng.normal(0.0, 0.5), -low, 1.0 - high))
    return np.clip(values * scale + shift, 0.0, 1.0)


def _location_scale_view(slices: np.ndarray, labels: np.ndarray, seed: int, local: bool) -> np.ndarray:
    """One location_scale view: global (one increasing curve per slice) or local (one curve per label class
    and slice); voxels that are 0 stay 0."""
    rng = np.random.default_rng(seed)
    view = np.zeros_like(slices)
    for s in range(len(slices)):
        body = slices[s] > 0
        values = slices[s].astype(np.float64) / 255.0
        for c in (np.unique(labels[s][body]) if local else [None]):
            region = body if c is None else body & (labels[s] == c)
            if not region.any():
                continue
            monotonic = c is None or (c != 0 and rng.random() < 0.5)
            mapped = _location_scale(rng, _bezier_curve(rng, values[region], monotonic))
            view[s][region] = np.round(mapped * 255.0).astype(np.uint8)
    return view


def view_labels(labels: np.ndarray, count: int, case: str, seed: int = VIEW_SEED,
                kind: str = DEFAULT_VIEW_KIND) -> np.ndarray | None:
    """(count, S, H, W) uint8 labels of the views `make_views` makes from the same arguments, for a kind that
    moves pixels (the label classes carried by nearest-neighbour zoom); None for the intensity kinds, whose
    views share the original's labels."""
    if kind not in MOVING_KINDS:
        return None
    labels = np.asarray(labels, np.uint8)
    return np.stack([_zoomed(labels, _zoom_factors(seed, case, k, len(labels)), order=0) for k in range(count)])


def _zoom_factors(seed: int, case: str, view: int, count: int) -> np.ndarray:
    """The `scale` kind's zoom factor of each of a case's `count` slices in view `view` (0-based), log-uniform in
    SCALE_RANGE; images and labels draw the same ones."""
    rng = np.random.default_rng(view_seed(seed, case, view + 1))
    return np.exp(rng.uniform(*np.log(SCALE_RANGE), count))


def _zoomed(slices: np.ndarray, factors: np.ndarray, order: int) -> np.ndarray:
    """Each (H, W) uint8 slice zoomed about its centre by its factor (> 1 enlarges), same size, 0 outside."""
    height, width = slices.shape[1:]
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    out = np.empty_like(slices)
    for s, factor in enumerate(factors):
        # warp maps each output pixel to the input: x_in = centre + (x_out - centre) / factor
        inverse = AffineTransform(scale=1.0 / factor, translation=centre * (1.0 - 1.0 / factor))
        zoomed = warp(slices[s], inverse, order=order, mode="constant", cval=0, preserve_range=True)
        out[s] = np.clip(np.round(zoomed), 0, 255).astype(np.uint8)
    return out
