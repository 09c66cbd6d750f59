"""How the abdominal phantom's two modalities acquire and store an image of the same anatomy.

What differs (modelled on the cross-modality benchmark: BTCV/SABS CT vs CHAOS T2-SPIR MR):
- contrast: CT in Hounsfield units, portal-venous-like: kidneys enhanced (150-200), liver (60-72) a
  little above spleen (42-54), fat -100, gas -900; T2 MR (SPIR), relative to fluid = 1: kidneys
  (0.70-0.85) and spleen (0.52-0.62) bright, liver dark (0.14-0.22), fat brighter than liver but
  partly suppressed (0.30-0.38, so spleen and kidneys still stand out), flowing blood dark. So liver
  and spleen swap order, and fat goes from the darkest soft tissue to brighter than liver;
- geometry: CT 1.30-1.45 mm in-plane, 4.5-5 mm slices; MR 1.5-1.9 mm in-plane (a larger field of view,
  so a smaller body), 6-8 mm slices; both 256 x 256 (coarser than the real 512 CT, for speed);
- noise and artefacts: CT additive Gaussian noise (10-18 HU); MR Rician noise (0.015-0.03) and a
  smooth receive bias field;
- storage: CT int16 HU; MR uint16 with a per-case scale (700-1500 for fluid).
Each case draws its tissue levels from the ranges, so contrast also varies within a modality.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from dataset_conversion.abdominal_anatomy import TISSUES
from dataset_conversion.make_phantom import smooth_noise
from dataset_conversion.phantom_sites import rician

PSF_SIGMA_VOXELS = 0.6
TEXTURE_MM = 8.0            # correlation length of the tissue texture
CT_RANGE = (-1024, 3071)


@dataclass(frozen=True)
class Modality:
    name: str                               # the domain: CT or MR
    mr: bool                                # MR: texture and bias multiply, Rician noise, unsigned storage;
                                            # CT: texture and Gaussian noise add, HU clipped to int16
    folder: str                             # its folder in the processed layout
    spacing_xy: tuple[float, float]         # in-plane spacing range (mm)
    slice_mm: tuple[float, float]           # slice thickness range (mm)
    matrix: int
    margin_slices: tuple[int, int]          # organ-free slices at each end
    levels: dict[str, tuple[float, float]]  # tissue -> range of its value
    texture: float                          # texture amplitude: HU (CT) or relative (MR)
    noise: tuple[float, float]              # noise sigma range, in the levels' units
    bias: float                             # receive bias amplitude (log units), MR
    scale: tuple[float, float]              # stored value of level 1 (MR); 1 for CT
    dtype: str


MODALITIES = {
    "CT": Modality("CT", False, "SABSCT", (1.30, 1.45), (4.5, 5.0), 256, (2, 3), {
        "air": (-1000, -1000), "fat": (-110, -90), "muscle": (40, 60), "bone": (600, 800), "marrow": (180, 260),
        "fluid": (0, 15), "bowel": (20, 45), "gas": (-950, -850), "artery": (150, 220), "vein": (110, 150),
        "liver": (60, 72), "spleen": (42, 54), "kidney": (150, 200)},
        6.0, (10.0, 18.0), 0.0, (1.0, 1.0), "int16"),
    "MR": Modality("MR", True, "CHAOST2", (1.5, 1.9), (6.0, 8.0), 256, (2, 3), {
        "air": (0.0, 0.0), "fat": (0.30, 0.38), "muscle": (0.10, 0.16), "bone": (0.02, 0.05), "marrow": (0.30, 0.40),
        "fluid": (0.9, 1.0), "bowel": (0.35, 0.6), "gas": (0.01, 0.03), "artery": (0.03, 0.08), "vein": (0.05, 0.12),
        "liver": (0.14, 0.22), "spleen": (0.52, 0.62), "kidney": (0.70, 0.85)},
        0.06, (0.015, 0.03), 0.3, (700.0, 1500.0), "uint16"),
}


def draw_levels(modality: Modality, rng: np.random.Generator) -> np.ndarray:
    """This case's value of every tissue, indexed like TISSUES."""
    return np.array([rng.uniform(*modality.levels[t]) for t in TISSUES], np.float32)


def coarse_texture(rng: np.random.Generator, shape: tuple[int, int, int], spacing) -> np.ndarray:
    """Unit-variance smooth texture (TEXTURE_MM correlation), drawn on a grid of half the in-plane size (4x
    faster) and repeated: the steps are far below its correlation length and the PSF blurs them."""
    half = smooth_noise(rng, (shape[0] // 2, shape[1] // 2, shape[2]),
                        TEXTURE_MM / (np.asarray(spacing) * [2, 2, 1]))
    return np.repeat(np.repeat(half, 2, axis=0), 2, axis=1)


def bias_field(rng: np.random.Generator, amplitude: float, xs, ys, zs) -> np.ndarray:
    """A smooth multiplicative receive sensitivity over the body (1 at the centre)."""
    x, y, z = xs[:, None, None] / 150.0, ys[None, :, None] / 150.0, zs[None, None, :] / 150.0
    c = rng.uniform(-1.0, 1.0, 4)
    return np.exp(amplitude * (c[0] * x + c[1] * y + c[2] * (x * x + y * y - 0.5) + c[3] * z)).astype(np.float32)


def acquire(modality: Modality, tissues: np.ndarray, rng: np.random.Generator,
            spacing: tuple[float, float, float], xs, ys, zs) -> tuple[np.ndarray, dict]:
    """The stored image of a tissue map, and the case's acquisition parameters."""
    levels = draw_levels(modality, rng)
    texture = coarse_texture(rng, tissues.shape, spacing)
    signal = levels[tissues]
    if modality.mr:
        signal *= 1.0 + modality.texture * texture
    else:
        signal += modality.texture * texture
    signal = gaussian_filter(signal, (PSF_SIGMA_VOXELS, PSF_SIGMA_VOXELS, 0.0))
    sigma = float(rng.uniform(*modality.noise))
    scale = float(rng.uniform(*modality.scale))
    if modality.mr:
        signal = rician(signal * bias_field(rng, modality.bias, xs, ys, zs), sigma, rng) * scale
        stored = np.clip(np.round(signal), 0, np.iinfo(np.uint16).max)
    else:
        signal += sigma * rng.standard_normal(signal.shape, dtype=np.float32)
        stored = np.clip(np.round(signal), *CT_RANGE)
    info = {"levels": {t: round(float(v), 3) for t, v in zip(TISSUES, levels)}, "noise_sigma": round(sigma, 4),
            "storage_scale": round(scale, 2)}
    return stored.astype(modality.dtype), info
