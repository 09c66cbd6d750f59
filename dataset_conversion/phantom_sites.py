"""The phantom's six sites and how each one acquires and stores an image.

What changes per site (modelled on the public multi-site prostate T2 collection):
- geometry: voxel spacing, matrix (field of view) and slice count; UCL mixes two scanners;
- field strength: Rician noise twice as strong at 1.5 T (BMC, HK, half of UCL) as at 3 T;
- receive coil: an endorectal coil (BMC, BIDMC, HK) brightens the tissue next to the rectum
  steeply (near-field gain falling with distance from the balloon) and fills the rectum with a
  dark balloon that flattens the gland; the other sites have a smooth surface-coil bias field;
- intensity transfer: a site-specific monotone curve (gamma and saturation knee);
- storage: dtype, scale and offset (int16, uint16 with an offset, float32), plus a per-case gain;
- labels: zone labels {1 TZ, 2 PZ} at RUNMC and BMC like the real data, {1} elsewhere; BMC names its
  masks `_Segmentation`; case numbers follow the real, non-contiguous numbering (UCL, HK).
Fields of view follow the real data (RUNMC 240 mm the widest, BIDMC 128 mm the most zoomed), so the
body outline and the air around it are in the image as in the real scans.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataset_conversion.phantom_anatomy import Anatomy

NOISE_SIGMA = {1.5: 0.045, 3.0: 0.022}  # Rician sigma relative to urine = 1
COIL_FALLOFF = 1.5


@dataclass(frozen=True)
class Protocol:
    """One scanner protocol: field strength (T), spacing (mm), square matrix, slice count range."""

    field_tesla: float
    spacing: tuple[float, float, float]
    matrix: int
    slices: tuple[int, int]


@dataclass(frozen=True)
class Site:
    name: str
    protocols: tuple[Protocol, ...]  # a case draws one (UCL has two scanners)
    endorectal_gain: float           # near-field gain of an endorectal coil; 0 without one
    bias: float                      # amplitude (log units) of the smooth receive bias
    gamma: float                     # transfer curve exponent
    knee: float                      # transfer curve saturation: u / (1 + knee * u)
    dtype: str
    scale: float                     # stored value of signal 1 (before the per-case gain)
    offset: float
    zone_labels: bool
    mask_suffix: str
    label_dtype: str
    case_numbers: tuple[int, ...]

    @property
    def endorectal_coil(self) -> bool:
        return self.endorectal_gain > 0


SITES = {
    "RUNMC": Site("RUNMC", (Protocol(3.0, (0.625, 0.625, 3.6), 384, (18, 22)),), 0.0, 0.15, 1.0, 0.0,
                  "int16", 1100.0, 0.0, True, "_segmentation", "uint8", tuple(range(30))),
    "BMC": Site("BMC", (Protocol(1.5, (0.4, 0.4, 3.0), 384, (20, 24)),), 5.0, 0.10, 1.2, 0.0,
                "int16", 450.0, 0.0, True, "_Segmentation", "uint8", tuple(range(30))),
    "I2CVB": Site("I2CVB", (Protocol(3.0, (0.78, 0.78, 1.25), 256, (36, 40)),), 0.0, 0.30, 0.7, 0.5,
                  "uint16", 2600.0, 40.0, False, "_segmentation", "uint8", tuple(range(19))),
    "UCL": Site("UCL", (Protocol(1.5, (0.625, 0.625, 3.6), 320, (18, 22)),
                        Protocol(3.0, (0.5, 0.5, 3.0), 352, (20, 24))), 0.0, 0.20, 0.9, 0.15,
                "float32", 1.0, 0.0, False, "_segmentation", "float32", (1, *range(26, 38))),
    "BIDMC": Site("BIDMC", (Protocol(3.0, (0.25, 0.25, 3.0), 512, (20, 24)),), 3.0, 0.10, 1.4, 0.0,
                  "int16", 2200.0, 0.0, False, "_segmentation", "uint8", tuple(range(12))),
    "HK": Site("HK", (Protocol(1.5, (0.625, 0.625, 3.6), 288, (18, 22)),), 8.0, 0.10, 0.75, 0.3,
               "int16", 700.0, 0.0, False, "_segmentation", "uint8", tuple(range(38, 50))),
}


def case_numbers(site: Site, count: int) -> list[int]:
    """The first `count` real case numbers of the site, continued past the last one when more are asked."""
    numbers = list(site.case_numbers[:count])
    while len(numbers) < count:
        numbers.append(numbers[-1] + 1)
    return numbers


def receive_sensitivity(site: Site, anatomy: Anatomy, rng: np.random.Generator,
                        xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """Smooth bias field, times the endorectal near-field profile (1 at the prostate centre) at coil sites."""
    x, y, z = xs[:, None, None] / 120.0, ys[None, :, None] / 120.0, zs[None, None, :] / 40.0
    c = rng.uniform(-1.0, 1.0, 5)
    sensitivity = np.exp(site.bias * (c[0] * x + c[1] * y + c[2] * (x * x - 0.3) + c[3] * (y * y - 0.3) + c[4] * z))
    if site.endorectal_coil:
        gain = site.endorectal_gain * rng.uniform(0.8, 1.2)
        radius = anatomy.rectum[1]
        axis_y = anatomy.rectum_center_y - anatomy.rectum[3] * np.maximum(zs, 0.0)[None, None, :]
        distance = np.sqrt(xs[:, None, None] ** 2 + (ys[None, :, None] - axis_y) ** 2)
        near = (radius / np.maximum(distance, radius)) ** COIL_FALLOFF
        at_center = (radius / max(-anatomy.rectum_center_y, radius)) ** COIL_FALLOFF
        sensitivity = sensitivity * (1.0 + gain * near) / (1.0 + gain * at_center)
    return sensitivity.astype(np.float32)


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise."""
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary)


def store(magnitude: np.ndarray, site: Site, gain: float) -> np.ndarray:
    """Apply the site's monotone transfer curve and storage scale, and cast to its dtype."""
    curve = (magnitude / (1.0 + site.knee * magnitude)) ** site.gamma * (1.0 + site.knee) ** site.gamma
    values = site.offset + site.scale * gain * curve
    dtype = np.dtype(site.dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.round(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)
