"""Synthetic upper abdomen for the abdominal phantom: a tissue index per voxel and the organ labels.

Coordinates are anatomical millimetres as in phantom_anatomy: x towards the patient's left, y anterior,
z superior, centred on the body axis near the renal hila. `sample_anatomy` draws one case: a
rounded-rectangle body with subcutaneous fat and an abdominal wall, and inside it (constant along z)
the spine, paraspinal and psoas muscles, aorta and inferior vena cava; then, as smooth random blobs,
bowel loops (some gas-filled), the stomach, the liver (a large right lobe in the right upper quadrant
and a left lobe across the midline), the spleen (left, posterolateral, high), and the kidneys
(posterior either side of the spine, the right one lower) with a fat-filled sinus at their hilum.
Blobs are painted in that order over the visceral fat only, so later organs win where they meet and
none covers the spine or the great vessels. `render_tissues` paints one case on an image grid,
`organ_labels` gives the classes. Intensities per modality are in abdominal_modalities.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataset_conversion.convert_abdominal import LABELS
from dataset_conversion.phantom_anatomy import box

TISSUES = ("air", "fat", "muscle", "bone", "marrow", "fluid", "bowel", "gas", "artery", "vein",
           "liver", "spleen", "kidney")
TISSUE = {name: index for index, name in enumerate(TISSUES)}
ORGANS = ("liver", "spleen", "kidney")


@dataclass(frozen=True)
class Blob:
    """An ellipsoid turned by `angle` about z, its surface rippled by a few smooth modes."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    angle: float
    modes: np.ndarray  # (K, 5): wave vector (3), phase, relative amplitude

    @property
    def half_extent(self) -> tuple[float, float, float]:
        """Half-size of a box that surely holds the blob."""
        grow = 1.0 + float(self.modes[:, 4].sum())
        in_plane = max(self.radii[:2]) * grow
        return in_plane, in_plane, self.radii[2] * grow

    def inside(self, x, y, z) -> np.ndarray:
        cx, cy, cz = self.center
        rx, ry, rz = self.radii
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        u = ((x - cx) * cos + (y - cy) * sin) / rx
        v = (-(x - cx) * sin + (y - cy) * cos) / ry
        w = (z - cz) / rz
        rho = np.sqrt(u * u + v * v + w * w)
        reach = float(self.modes[:, 4].sum())
        inside = rho <= 1.0 - reach
        shell = ~inside & (rho <= 1.0 + reach)  # only here can the ripple decide, so only here is it computed
        u, v, w = (np.broadcast_to(t, rho.shape)[shell] for t in (u, v, w))
        safe = np.maximum(rho[shell], 1e-6)
        ripple = np.zeros_like(safe)
        for kx, ky, kz, phase, amplitude in self.modes:
            ripple += amplitude * np.cos((kx * u + ky * v + kz * w) / safe + phase)
        inside[shell] = rho[shell] <= 1.0 + ripple
        return inside


@dataclass(frozen=True)
class Anatomy:
    """Random parameters of one case (lengths in mm)."""

    body: tuple[float, float, float]       # semi-axes x, y and the exponent of the body's rounded-rectangle outline
    fat: float                             # subcutaneous fat thickness
    wall: float                            # abdominal wall muscle thickness
    spine_y: float                         # centre of the vertebral body
    parts: tuple[tuple[str, Blob], ...]    # (tissue, blob) painted in order over the visceral fat

    @property
    def cavity(self) -> tuple[float, float]:
        a, b, _ = self.body
        return a - self.fat - self.wall, b - self.fat - self.wall

    def organ_z_range(self, step: float = 3.0) -> tuple[float, float]:
        """Lowest and highest z the organ blobs reach, measured on a `step` mm grid (plus one step); the painted
        organs, clipped by the cavity and by each other, stay within."""
        lows, highs = [], []
        for tissue, blob in self.parts:
            if tissue in ORGANS:
                axes = [np.arange(c - h, c + h + step, step, dtype=np.float32)
                        for c, h in zip(blob.center, blob.half_extent)]
                present = axes[2][blob.inside(axes[0][:, None, None], axes[1][None, :, None],
                                              axes[2][None, None, :]).any(axis=(0, 1))]
                lows.append(float(present.min()) - step)
                highs.append(float(present.max()) + step)
        return min(lows), max(highs)


def random_blob(rng: np.random.Generator, center, radii, angle: float = 0.0,
                amplitude: tuple[float, float] = (0.02, 0.06), n_modes: int = 4) -> Blob:
    """A blob whose surface ripples with `n_modes` smooth random modes of relative amplitude within `amplitude`."""
    directions = rng.normal(size=(n_modes, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    modes = np.column_stack([directions * rng.uniform(1.0, 2.5, (n_modes, 1)), rng.uniform(0, 2 * np.pi, n_modes),
                             rng.uniform(*amplitude, n_modes)])
    return Blob(tuple(float(c) for c in center), tuple(float(r) for r in radii), float(angle), modes)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one case: body size, wall, and the organ and bowel blobs at plausible places."""
    u = rng.uniform
    a, b = u(135, 160), u(100, 122)
    fat, wall = u(8, 25), u(7, 12)
    ca, cb = a - fat - wall, b - fat - wall
    spine_y = -cb + 28
    liver_z = u(40, 52)
    right_z, left_z = u(-20, -8), u(-6, 8)
    kidney_z_low = min(right_z, left_z) - 45
    parts: list[tuple[str, Blob]] = []
    for _ in range(int(rng.integers(10, 17))):
        radius = u(12, 22, 3)
        center = (u(-0.6, 0.6) * ca, u(-0.1, 0.7) * cb, u(kidney_z_low, liver_z - 30))
        parts.append(("gas" if rng.random() < 0.3 else "bowel", random_blob(rng, center, radius)))
    parts.append(("bowel", random_blob(rng, (u(0.2, 0.35) * ca, u(0.25, 0.4) * cb, liver_z - u(0, 20)),
                                       (u(35, 45), u(25, 35), u(30, 45)))))
    parts.append(("liver", random_blob(rng, (-0.45 * ca + u(-8, 8), u(-0.05, 0.15) * cb, liver_z),
                                       (u(0.5, 0.6) * ca, u(0.75, 0.85) * cb, u(62, 75)), u(-0.2, 0.2))))
    parts.append(("liver", random_blob(rng, (u(0.05, 0.2) * ca, u(0.35, 0.5) * cb, liver_z + u(0, 15)),
                                       (u(45, 60), u(25, 35), u(35, 45)), u(-0.2, 0.2))))
    parts.append(("spleen", random_blob(rng, (u(0.55, 0.65) * ca, u(-0.45, -0.3) * cb, liver_z + u(-15, 0)),
                                        (u(22, 30), u(45, 58), u(40, 52)), u(-0.9, -0.5))))
    for side, z in ((-1.0, right_z), (1.0, left_z)):
        center = np.array([side * u(55, 68), spine_y + u(0, 10), z])
        radii = np.array([u(22, 28), u(20, 25), u(45, 55)])
        parts.append(("kidney", random_blob(rng, center, radii, u(-0.3, 0.3), amplitude=(0.01, 0.03))))
        hilum = np.deg2rad(u(20, 40))
        sinus = center + 0.75 * radii[0] * np.array([-side * np.cos(hilum), np.sin(hilum), 0.0])
        parts.append(("fat", random_blob(rng, sinus, radii * [0.45, 0.4, 0.5], amplitude=(0.0, 0.02))))
    return Anatomy((a, b, u(2.2, 3.0)), fat, wall, spine_y, tuple(parts))


def _outline(x, y, a: float, b: float, power: float) -> np.ndarray:
    return np.abs(x / a) ** power + np.abs(y / b) ** power <= 1.0


def _ellipse(x, y, cx, cy, rx, ry) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def static_section(anatomy: Anatomy, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (X, Y) cross-section that does not change along z, and where blobs may be painted (visceral fat)."""
    a, b, power = anatomy.body
    ca, cb = anatomy.cavity
    x, y = xs[:, None], ys[None, :]
    section = np.full((xs.size, ys.size), TISSUE["air"], np.uint8)
    section[_outline(x, y, a, b, power)] = TISSUE["fat"]
    section[_outline(x, y, a - anatomy.fat, b - anatomy.fat, power)] = TISSUE["muscle"]
    cavity = _outline(x, y, ca, cb, power)
    section[cavity] = TISSUE["fat"]
    sy = anatomy.spine_y
    for side in (-1.0, 1.0):
        section[_ellipse(x, y, side * 28, sy - 35, 20, 17)] = TISSUE["muscle"]   # paraspinal
        section[_ellipse(x, y, side * 32, sy + 8, 13, 15)] = TISSUE["muscle"]    # psoas
    section[_ellipse(x, y, 0, sy - 25, 13, 13)] = TISSUE["bone"]                 # vertebral arch
    section[_ellipse(x, y, 0, sy - 25, 8, 8)] = TISSUE["fluid"]                  # spinal canal
    section[_ellipse(x, y, 0, sy, 22, 18)] = TISSUE["bone"]                      # vertebral body: cortex
    section[_ellipse(x, y, 0, sy, 19.5, 15.5)] = TISSUE["marrow"]
    section[_ellipse(x, y, 10, sy + 27, 10, 10)] = TISSUE["artery"]              # aorta
    section[_ellipse(x, y, -20, sy + 29, 13, 9)] = TISSUE["vein"]                # inferior vena cava
    return section, cavity & (section == TISSUE["fat"])


def render_tissues(anatomy: Anatomy, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """Tissue index (X, Y, Z) uint8 on the grid of voxel-centre coordinates xs, ys, zs."""
    section, free = static_section(anatomy, xs, ys)
    tissues = np.repeat(section[:, :, None], zs.size, axis=2)
    for tissue, blob in anatomy.parts:
        slices, (x, y, z) = box(xs, ys, zs, blob.center, blob.half_extent)
        view = tissues[slices]
        view[blob.inside(x, y, z) & free[slices[:2]][:, :, None]] = TISSUE[tissue]
    return tissues


def organ_labels(tissues: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Classes (uint8): liver, spleen, and the kidney on the patient's right (x < 0) or left."""
    labels = np.zeros(tissues.shape, np.uint8)
    labels[tissues == TISSUE["liver"]] = LABELS["liver"]
    labels[tissues == TISSUE["spleen"]] = LABELS["spleen"]
    kidney = tissues == TISSUE["kidney"]
    right = (xs < 0)[:, None, None]
    labels[kidney & right] = LABELS["right_kidney"]
    labels[kidney & ~right] = LABELS["left_kidney"]
    return labels
