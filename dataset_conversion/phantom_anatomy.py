"""Synthetic male pelvis for the phantom: T2 signal and prostate zones, in millimetres.

Coordinates are anatomical and centred on the prostate: x towards the patient's left, y anterior,
z superior. One case is a set of random parameters (`sample_anatomy`); `render_signal` paints the
noise-free T2-weighted signal (air outside the body outline, fat bright, muscle dark, urine
brightest, bone marrow intermediate with a dark cortex, femoral heads, gluteal muscles, rectum,
seminal vesicles, a prostate with a bright peripheral zone and a darker nodular transition zone) and `prostate_zones` gives the ground truth (0 outside, 1 transition zone,
2 peripheral zone). Scanner effects (coil, bias, noise, storage) are in phantom_sites.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TZ, PZ = 1, 2
CAPSULE_MM = 1.2
WALL_MM = 3.0
CORTEX_MM = 2.0
STROMA_DEPTH = 0.62  # anterior fibromuscular stroma: the gland's dark front, beyond this fraction of b

# Relative T2 signal of each tissue (urine = 1); each case jitters them by +-10 %.
BASE_SIGNAL = {
    "fat": 0.80, "muscle": 0.22, "marrow": 0.55, "cortex": 0.04, "urine": 1.0, "bladder_wall": 0.25,
    "rectal_wall": 0.30, "rectal_content": 0.22, "balloon": 0.03, "seminal_vesicle": 0.85,
    "pz": 0.70, "tz": 0.38, "capsule": 0.30, "stroma": 0.22, "lesion": 0.33, "vessel": 0.12,
    "plexus": 0.92, "air": 0.0,
}


@dataclass(frozen=True)
class Anatomy:
    """Random parameters of one case (all lengths in mm)."""

    radii: tuple[float, float, float]           # prostate semi-axes: left-right, anterior-posterior, cranio-caudal
    taper: float                                # base wider than apex
    flattening: float                           # posterior surface flattened (more with an endorectal balloon)
    modes: np.ndarray                           # (K, 5): wave vector (3), phase, amplitude of the surface ripple
    tz_radii: tuple[float, float, float]
    tz_shift: tuple[float, float]               # anterior and superior shift of the transition zone
    lesion: tuple[float, float, float, float] | None  # x, y, z, radius of a dark peripheral-zone focus
    rectum: tuple[float, float, float, float]   # semi-axes x, y, gap to the prostate, posterior curvature
    balloon: bool                               # endorectal coil balloon fills the rectum
    bladder: tuple[float, float, float, float, float]  # semi-axes x, y, z, anterior shift, bottom height
    vesicles: tuple[float, float, float, float, float, float]  # lateral offset, angle, semi-axes x y z, height
    pubis: tuple[float, float, float]           # gap anterior of the prostate, semi-axes x, y
    ischium: tuple[float, float]                # lateral distance, centre y
    vessels: np.ndarray                         # (V, 4): x, y, radius, bright (1) or flow void (0)
    body: tuple[float, float, float]            # outline semi-axes x, y and centre y: air outside
    femur: tuple[float, float, float]           # femoral head radius, lateral distance, height of its centre
    gluteus: tuple[float, float, float]         # gluteal muscle semi-axes x, y and lateral distance
    signal: dict[str, float] = field(default_factory=dict)

    @property
    def prostate_extent(self) -> tuple[float, float, float]:
        """Half-size of a box that surely holds the gland (taper and surface ripple included)."""
        ripple = 1.0 + float(self.modes[:, 4].sum())
        a, b, c = self.radii
        return a * (1 + self.taper) * ripple, b * (1 + self.taper) * ripple, c * ripple

    @property
    def rectum_center_y(self) -> float:
        """Rectum centre at z = 0: behind the flattened posterior prostate surface, plus the gap."""
        posterior = self.radii[1] * (1.0 - self.flattening)
        return -(posterior + self.rectum[2] + self.rectum[1])


def sample_anatomy(rng: np.random.Generator, endorectal_coil: bool) -> Anatomy:
    """Draw one case's anatomy; prostate volumes come out at roughly 15-45 mL."""
    u = rng.uniform
    a, b, c = u(20, 25.5), u(14, 18.5), u(15, 19.5)
    directions = rng.normal(size=(5, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    modes = np.column_stack([directions * u(1.5, 3.0, (5, 1)), u(0, 2 * np.pi, 5), u(0.015, 0.045, 5)])
    lesion = None
    if rng.random() < 0.5:
        side = rng.choice([-1.0, 1.0])
        lesion = (side * 0.55 * a, -0.6 * b, u(-0.5, 0.3) * c, u(3, 6))
    if endorectal_coil:
        rectum = (u(17, 20), u(14, 17), u(-1.0, 1.0), u(0.1, 0.3))
    else:
        rectum = (u(13, 17), u(7, 10), u(2, 4), u(0.1, 0.3))
    n_vessels = 10
    vessels = np.column_stack([
        rng.choice([-1.0, 1.0], n_vessels) * u(a + 8, a + 32, n_vessels), u(-20, 25, n_vessels),
        u(1.0, 2.5, n_vessels), (rng.random(n_vessels) < 0.3).astype(float),
    ])
    return Anatomy(
        radii=(a, b, c), taper=u(0.1, 0.25),
        flattening=u(0.25, 0.35) if endorectal_coil else u(0.1, 0.2),
        modes=modes,
        tz_radii=(u(0.55, 0.7) * a, u(0.5, 0.62) * b, u(0.6, 0.75) * c),
        tz_shift=(u(0.1, 0.25) * b, u(0.15, 0.3) * c),
        lesion=lesion, rectum=rectum, balloon=endorectal_coil,
        bladder=(u(30, 45), u(22, 32), u(20, 30), u(0, 8), u(0.6, 0.85) * c),
        vesicles=(u(12, 17), np.deg2rad(u(20, 40)), u(9, 13), u(3.5, 5.5), u(5, 8), u(2, 6)),
        pubis=(u(18, 28), u(8, 11), u(6, 8)),
        ischium=(u(58, 66), u(-20, -10)),
        vessels=vessels,
        body=(u(165, 195), u(105, 125), u(-15, -5)),
        femur=(u(22, 26), u(88, 98), u(15, 30)),
        gluteus=(u(45, 60), u(35, 45), u(60, 75)),
        signal={k: v * u(0.9, 1.1) for k, v in BASE_SIGNAL.items()},
    )


def _axis_range(values: np.ndarray, low: float, high: float) -> slice:
    inside = np.nonzero((values >= low) & (values <= high))[0]
    return slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0)


def box(xs, ys, zs, center, half) -> tuple[tuple[slice, slice, slice], tuple[np.ndarray, ...]]:
    """Index slices of the grid within center +- half, and the broadcastable coordinates there."""
    slices = tuple(_axis_range(v, c - h, c + h) for v, c, h in zip((xs, ys, zs), center, half))
    coords = (xs[slices[0]][:, None, None], ys[slices[1]][None, :, None], zs[slices[2]][None, None, :])
    return slices, coords


def prostate_fields(anatomy: Anatomy, x, y, z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inside-prostate mask, transition-zone mask and the normalised radius (1 on the surface)."""
    a, b, c = anatomy.radii
    w = z / c
    scale = 1.0 + anatomy.taper * np.clip(w, -1.0, 1.0)
    b_side = np.where(y >= 0, b, b * (1.0 - anatomy.flattening))
    u, v = x / (a * scale), y / (b_side * scale)
    rho = np.sqrt(u * u + v * v + w * w)
    safe = np.maximum(rho, 1e-6)
    ripple = np.zeros_like(rho)
    for kx, ky, kz, phase, amplitude in anatomy.modes:
        ripple += amplitude * np.cos((kx * u + ky * v + kz * w) / safe + phase)
    rho = rho / (1.0 + ripple)
    inside = (rho <= 1.0) & ~(rectum_rho(anatomy, x, y, z, margin=1.5) <= 1.0)
    ta, tb, tc = anatomy.tz_radii
    ty, tz = anatomy.tz_shift
    tz_rho = np.sqrt((x / ta) ** 2 + ((y - ty) / tb) ** 2 + ((z - tz) / tc) ** 2) / (1.0 + ripple)
    return inside, inside & (tz_rho <= 1.0), rho


def rectum_rho(anatomy: Anatomy, x, y, z, margin: float = 0.0) -> np.ndarray:
    """Normalised radius of the rectum's outer wall (enlarged by `margin` mm); it curves back going up."""
    rx, ry, _, curvature = anatomy.rectum
    center_y = anatomy.rectum_center_y - curvature * np.maximum(z, 0.0)
    return np.sqrt((x / (rx + margin)) ** 2 + ((y - center_y) / (ry + margin)) ** 2)


def gland_extent(anatomy: Anatomy, step: float = 1.0) -> tuple[float, float, float]:
    """Half-extents (mm) of the gland along x, y, z, measured on a `step` mm grid (plus one step)."""
    axes = [np.arange(-e, e + step, step, dtype=np.float32) for e in anatomy.prostate_extent]
    inside, _, _ = prostate_fields(anatomy, axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
    extents = []
    for axis, values in enumerate(axes):
        other = tuple(a for a in range(3) if a != axis)
        present = values[inside.any(axis=other)]
        extents.append(float(np.abs(present).max()) + step if present.size else step)
    return tuple(extents)


def prostate_zones(anatomy: Anatomy, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """Ground truth on the grid: 0 outside, TZ (1) and PZ (2) inside the gland."""
    zones = np.zeros((xs.size, ys.size, zs.size), np.uint8)
    slices, (x, y, z) = box(xs, ys, zs, (0.0, 0.0, 0.0), anatomy.prostate_extent)
    inside, tz, _ = prostate_fields(anatomy, x, y, z)
    zones[slices] = np.where(tz, TZ, np.where(inside, PZ, 0))
    return zones


def _ellipse(x, y, cx, cy, rx, ry, angle=0.0) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if angle:
        dx, dy = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
    return np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)


def _paint(volume: np.ndarray, slices, mask: np.ndarray, value) -> None:
    """volume[slices][mask] = value, with `mask`/`value` broadcast to the box."""
    view = volume[slices]
    mask = np.broadcast_to(mask, view.shape)
    view[mask] = np.broadcast_to(value, view.shape)[mask] if np.ndim(value) else value


def render_signal(anatomy: Anatomy, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray,
                  coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """Noise-free T2 signal (X, Y, Z) float32; `coarse`/`fine` are unit-variance smooth textures of that shape."""
    s = anatomy.signal
    a, b, c = anatomy.radii
    full = (slice(None),) * 3
    x, y, z = xs[:, None, None], ys[None, :, None], zs[None, None, :]
    signal = (s["fat"] * (1.0 + 0.06 * coarse)).astype(np.float32)
    body_x, body_y, body_center = anatomy.body
    gluteus_x, gluteus_y, gluteus_offset = anatomy.gluteus
    femur_radius, femur_offset, femur_height = anatomy.femur
    for side in (-1.0, 1.0):
        gluteus = _ellipse(x, y, side * gluteus_offset, body_center - body_y + gluteus_y + 12, gluteus_x, gluteus_y)
        _paint(signal, full, gluteus <= 1.0, s["muscle"] * (1.0 + 0.05 * coarse))
        head = np.sqrt((x - side * femur_offset) ** 2 + (y + 5.0) ** 2 + (z - femur_height) ** 2)
        _paint(signal, full, head <= femur_radius, s["cortex"])
        _paint(signal, full, head <= femur_radius - CORTEX_MM, s["marrow"] * (1.0 + 0.1 * coarse))
    _paint(signal, full, _ellipse(x, y, 0.0, body_center, body_x, body_y) > 1.0, s["air"])

    gap, pubis_rx, pubis_ry = anatomy.pubis
    z_pubis = (z >= -c - 12) & (z <= c + 4)
    for side in (-1.0, 1.0):
        for cx, cy, rx, ry, zmask in ((side * (pubis_rx + 2), b + gap + pubis_ry, pubis_rx, pubis_ry, z_pubis),
                                      (side * anatomy.ischium[0], anatomy.ischium[1], 8.0, 16.0, True)):
            _paint(signal, full, (_ellipse(x, y, cx, cy, rx, ry) <= 1.0) & zmask, s["cortex"])
            marrow = _ellipse(x, y, cx, cy, rx - CORTEX_MM, ry - CORTEX_MM) <= 1.0
            _paint(signal, full, marrow & zmask, s["marrow"] * (1.0 + 0.1 * coarse))
        obturator = _ellipse(x, y, side * (anatomy.ischium[0] - 13), -5.0, 6.0, 24.0) <= 1.0
        _paint(signal, full, obturator, s["muscle"] * (1.0 + 0.05 * coarse))
    for vx, vy, radius, bright in anatomy.vessels:
        _paint(signal, full, _ellipse(x, y, vx, vy, radius, radius) <= 1.0,
               s["plexus"] if bright else s["vessel"])

    ring = _ellipse(x, y, 0.0, -(b + 8), a + 12, b + 20)
    levator = (np.abs(ring - 1.0) * min(a + 12, b + 20) <= 2.25) & (y < b * 0.3) & (z < 0.3 * c)
    _paint(signal, full, levator, s["muscle"] * (1.0 + 0.05 * coarse))

    bx, by, bz, shift, bottom = anatomy.bladder
    center = (0.0, shift, bottom + bz)
    slices, (bxg, byg, bzg) = box(xs, ys, zs, center, (bx, by, bz))
    urine = s["urine"] * (1.0 + 0.02 * fine[slices])
    for inset, value in ((0.0, s["bladder_wall"]), (WALL_MM, urine)):  # wall: outer minus inner ellipsoid
        rho = np.sqrt((bxg / (bx - inset)) ** 2 + ((byg - shift) / (by - inset)) ** 2
                      + ((bzg - center[2]) / (bz - inset)) ** 2)
        _paint(signal, slices, rho <= 1.0, value)

    offset, angle, vx_, vy_, vz_, height = anatomy.vesicles
    for side in (-1.0, 1.0):
        center = (side * offset, -0.55 * b, c + height)
        slices, (sx, sy, sz) = box(xs, ys, zs, center, (vx_ + 2, vx_ + 2, vz_))
        rho2 = _ellipse(sx, sy, center[0], center[1], vx_, vy_, side * angle)
        inside = rho2 ** 2 + ((sz - center[2]) / vz_) ** 2 <= 1.0
        _paint(signal, slices, inside, s["seminal_vesicle"] * (1.0 + 0.25 * fine[slices]))

    rx, ry, _, curvature = anatomy.rectum
    low_y = anatomy.rectum_center_y - curvature * max(float(zs.max()), 0.0) - ry - WALL_MM
    slices, (rxg, ryg, rzg) = box(xs, ys, zs, (0.0, (low_y + anatomy.rectum_center_y + ry) / 2, 0.0),
                                  (rx + 1, (anatomy.rectum_center_y + ry - low_y) / 2 + 1, 1e6))
    rho = rectum_rho(anatomy, rxg, ryg, rzg)
    _paint(signal, slices, rho <= 1.0, s["rectal_wall"])
    lumen = rectum_rho(anatomy, rxg, ryg, rzg, margin=-WALL_MM) <= 1.0
    content = s["balloon"] if anatomy.balloon else s["rectal_content"] * (1.0 + 0.5 * fine[slices])
    _paint(signal, slices, lumen, content)

    ex, ey, ez = anatomy.prostate_extent
    slices, (px, py, pz) = box(xs, ys, zs, (0.0, 0.0, 0.0), (ex + 4, ey + 4, ez))
    inside, tz, rho = prostate_fields(anatomy, px, py, pz)
    mean_radius = (a * b * c) ** (1 / 3)
    plexus = ~inside & (rho <= 1.0 + 2.5 / mean_radius) & (py > 0) & (fine[slices] > 0.3)
    _paint(signal, slices, plexus, s["plexus"])
    _paint(signal, slices, inside, s["pz"] * (1.0 + 0.08 * fine[slices]))
    _paint(signal, slices, tz, s["tz"] * (1.0 + 0.18 * fine[slices] + 0.08 * coarse[slices]))
    stroma = (py > (STROMA_DEPTH + 0.08 * fine[slices]) * b) & (np.abs(px) < 0.45 * a)
    _paint(signal, slices, inside & stroma, s["stroma"])
    if anatomy.lesion is not None:
        lx, ly, lz, radius = anatomy.lesion
        focus = ((px - lx) ** 2 + (py - ly) ** 2 + (pz - lz) ** 2) <= radius ** 2
        _paint(signal, slices, inside & ~tz & focus, s["lesion"])
    _paint(signal, slices, inside & (rho >= 1.0 - CAPSULE_MM / mean_radius), s["capsule"])
    return signal
