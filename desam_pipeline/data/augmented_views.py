"""Intensity-augmented views of a case's uint8 slices, made with batchgenerators' transforms (numpy only).

A view is the case's slices after nnU-Net's intensity augmentations (Gaussian noise, Gaussian blur,
multiplicative brightness, contrast, simulated low resolution, gamma and inverted gamma), with higher
probabilities than nnU-Net's, as a cached view is drawn many times. Each slice is z-scored before the
transforms (the scale nnU-Net's parameters are set for) and mapped back to its own mean and spread, clipped to
0..255; voxels that were exactly 0 stay 0, like the preprocessing. No transform moves a pixel, so the label of
every view is the original's. Views are seeded per case and view, so a re-run caches the same views.

The plan's `augmented_views` entry (absent when there are none): {"count": K, "sites": [...] or null (all),
"seed": ..., "transforms": [...]}; K views are cached for the cases of those sites (the training sources).
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

from desam_pipeline.utilities.errors import DesamError

VIEW_SEED = 20240
TRANSFORMS = ["gaussian_noise(var 0-0.1, p 0.5)", "gaussian_blur(sigma 0.5-1, p 0.3)",
              "brightness_multiplicative(0.75-1.25, p 0.5)", "contrast(0.75-1.25, p 0.5)",
              "simulate_low_resolution(zoom 0.5-1, p 0.3)", "gamma_inverted(0.7-1.5, p 0.2)",
              "gamma(0.7-1.5, p 0.5)"]


def plan_entry(count: int | None, sites: list[str] | None, existing: dict | None) -> dict | None:
    """The plan's `augmented_views` entry: from the flag when given (0 removes it), else the existing plan's."""
    if count is None:
        return (existing or {}).get("augmented_views")
    if count < 0:
        raise DesamError(f"--augmented-views must be >= 0, got {count}")
    if count == 0:
        return None
    return {"count": int(count), "sites": sorted(set(sites)) if sites else None, "seed": VIEW_SEED,
            "transforms": TRANSFORMS}


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


def make_views(slices: np.ndarray, count: int, case: str, seed: int = VIEW_SEED) -> np.ndarray:
    """(count, S, H, W) uint8 augmented copies of a case's (S, H, W) uint8 slices; view k is seeded by
    (seed, case, k)."""
    slices = np.asarray(slices)
    if slices.ndim != 3 or slices.dtype != np.uint8:
        raise ValueError(f"{case}: expected (S, H, W) uint8 slices, got {slices.shape} {slices.dtype}")
    data = slices[:, None].astype(np.float32)
    mean = data.mean(axis=(2, 3), keepdims=True)
    std = np.maximum(data.std(axis=(2, 3), keepdims=True), 1e-3)
    zscored = (data - mean) / std
    views = np.empty((count, *slices.shape), np.uint8)
    transforms = _pipeline()
    for k in range(count):
        with _seeded_global_generators(view_seed(seed, case, k + 1)):
            augmented = transforms(data=zscored.copy())["data"]
        restored = np.clip(np.round(augmented * std + mean), 0, 255)[:, 0]
        restored[slices == 0] = 0
        views[k] = restored.astype(np.uint8)
    return views
