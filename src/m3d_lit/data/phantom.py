"""A brain-CT phantom in Hounsfield units with findings drawn where they occur and as they look.

The volume is built in the canonical array orientation of `m3d_lit.data.io`: axis 0 runs inferior ->
superior (slices), axis 1 anterior -> posterior (rows), axis 2 patient right -> patient left (columns).
Coordinates are normalised to [-1, 1] on every axis; in-plane one unit is 120 mm (a 240 mm field of
view), along z one unit is 80 mm (160 mm of head).

Findings are deliberately large and contrasting: the demo trains a tiny model from scratch on 1x32x64x64
volumes with 4x16x16 patches, which cannot see small or faint lesions (docs: MEASURED.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BLEED_TYPES",
    "FIELD_OF_VIEW_MM",
    "HEAD_HEIGHT_MM",
    "RATES",
    "Phantom",
    "draw_findings",
    "render_phantom",
]

FIELD_OF_VIEW_MM = 240.0
HEAD_HEIGHT_MM = 160.0
# Label-map codes; a voxel keeps the type painted last.
BLEED_TYPES = ("IPH", "IVH", "SDH", "EDH", "SAH")

_AIR, _SCALP, _BONE, _GREY, _WHITE, _CSF, _FALX = -1000.0, 30.0, 1000.0, 38.0, 29.0, 5.0, 60.0
_HEAD_AXES = (1.2, 0.9, 0.74)  # z, y, x semi-axes of the outer skull surface
_HEAD_Z0 = -0.25
_INNER, _SKULL_OUT = 0.89, 0.97  # rho of the inner and outer skull table (rho = 1 is the scalp surface)
_Z_SCALE = FIELD_OF_VIEW_MM / 2 / (HEAD_HEIGHT_MM / 2)  # z units -> in-plane units (physical mm ratio)
_CHRONIC_SCALE = 1.3  # size of a chronic collection against an acute one of its type


@dataclass
class Phantom:
    """One rendered head.

    Args:
        hu: int16 D x H x W volume in Hounsfield units.
        bleeds: int8 D x H x W label map, 0 = no blood, k = BLEED_TYPES[k - 1].
        fracture: bool D x H x W, the bone removed by a fracture.
        truth: the findings as drawn (CQ500 column names without the reader prefix), each 0 or 1.
    """

    hu: np.ndarray
    bleeds: np.ndarray
    fracture: np.ndarray
    truth: dict[str, int] = field(default_factory=dict)


class _Grid:
    """Normalised coordinates of every voxel, plus the head's radial coordinate rho (1 = scalp)."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        d, h, w = shape
        self.z = np.linspace(-1, 1, d, dtype=np.float32)[:, None, None]
        self.y = np.linspace(-1, 1, h, dtype=np.float32)[None, :, None]
        self.x = np.linspace(-1, 1, w, dtype=np.float32)[None, None, :]
        az, ay, ax = _HEAD_AXES
        self.rho = np.sqrt(((self.z - _HEAD_Z0) / az) ** 2 + (self.y / ay) ** 2 + (self.x / ax) ** 2)
        self.theta = np.arctan2(self.y, self.x)  # in-plane angle; 0 = patient left, pi = patient right
        self.voxel = 2.0 / w  # one column in normalised units

    def ellipsoid(self, center: tuple[float, float, float], axes: tuple[float, float, float]) -> np.ndarray:
        (cz, cy, cx), (rz, ry, rx) = center, axes
        return ((self.z - cz) / rz) ** 2 + ((self.y - cy) / ry) ** 2 + ((self.x - cx) / rx) ** 2 <= 1.0


def _anatomy(g: _Grid, shift: float, compress_side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Skull, scalp, grey/white matter, sulci, ventricles and falx; returns (hu, intracranial, ventricles)."""
    hu = np.full(g.rho.shape, _AIR, np.float32)
    hu[g.rho <= 1.0] = _SCALP
    hu[g.rho <= _SKULL_OUT] = _BONE
    inside = g.rho < _INNER
    hu[inside] = _WHITE
    hu[inside & (g.rho > 0.76)] = _GREY
    sulci = inside & (g.rho > 0.80) & (np.cos(14 * g.theta + 4 * g.z) > 0.7)
    sulci |= inside & (g.rho > _INNER - 0.02)
    if compress_side:  # mass effect effaces the sulci on the side of the lesion
        sulci &= g.x * compress_side < 0
    hu[sulci] = _CSF
    ventricles = np.zeros(g.rho.shape, bool)
    for side in (-1, 1):
        width = 0.04 if side == compress_side else 0.09
        ventricles |= g.ellipsoid((0.05, -0.05, side * 0.11 + shift), (0.28, 0.32, width))
    ventricles &= inside
    hu[ventricles] = _CSF
    falx_x = shift * np.exp(-((g.y / 0.45) ** 2))
    falx = inside & (np.abs(g.x - falx_x) < g.voxel) & ((g.y < -0.35) | (g.y > 0.45))
    hu[falx] = _FALX
    return hu, inside, ventricles


def _iph(g: _Grid, rng: np.random.Generator, side: int, scale: float = 1.0) -> np.ndarray:
    r = rng.uniform(0.13, 0.18) * scale
    center = (rng.uniform(-0.05, 0.45), rng.uniform(-0.35, 0.35), side * rng.uniform(0.35, 0.42))
    return g.ellipsoid(center, (r * _Z_SCALE * rng.uniform(0.8, 1.2), r * rng.uniform(0.9, 1.3), r))


def _sdh(g: _Grid, rng: np.random.Generator, side: int, scale: float = 1.0) -> np.ndarray:
    """A crescent along the inner table, thickest laterally, tapering to the front, back, top and bottom."""
    lateral = np.maximum(np.cos(g.theta - (0.0 if side > 0 else np.pi)), 0.0) ** 0.5
    zc = rng.uniform(0.0, 0.4)
    taper = np.clip(1 - ((g.z - zc) / 0.75) ** 2, 0, 1)
    thickness = rng.uniform(0.20, 0.28) * scale * lateral * taper
    return (g.rho < _INNER) & (g.rho > _INNER - thickness)


def _edh(g: _Grid, rng: np.random.Generator, side: int, scale: float = 1.0) -> np.ndarray:
    """A lens: the part of the cranial cavity inside a sphere centred beyond the skull."""
    angle = rng.uniform(-0.5, 0.5) + (0.0 if side > 0 else np.pi)
    zc = rng.uniform(0.0, 0.4)
    radius, depth = rng.uniform(0.34, 0.42) * scale, rng.uniform(0.16, 0.22) * scale
    # Point on the inner table along `angle` at height zc, then push the centre outward.
    az, ay, ax = _HEAD_AXES
    level = np.sqrt(max(_INNER**2 - ((zc - _HEAD_Z0) / az) ** 2, 0.05))
    py, px = level * ay * np.sin(angle), level * ax * np.cos(angle)
    out = radius - depth
    cy, cx = py + out * np.sin(angle), px + out * np.cos(angle)
    dist2 = ((g.z - zc) / _Z_SCALE) ** 2 + (g.y - cy) ** 2 + (g.x - cx) ** 2
    return (g.rho < _INNER) & (dist2 <= radius**2)


def _sah(g: _Grid, rng: np.random.Generator, side: int) -> np.ndarray:
    """Blood in the sulci of one hemisphere and along its Sylvian fissure."""
    sulci = (g.rho > 0.72) & (g.rho < _INNER) & (np.cos(14 * g.theta + 4 * g.z) > 0.2)
    sulci &= g.x * side > 0.05
    sulci &= np.abs(g.z - rng.uniform(0.0, 0.3)) < 0.6
    fissure = (np.abs(g.y + 0.1) < 0.05) & (g.x * side > 0.2) & (g.x * side < 0.65) & (np.abs(g.z) < 0.45)
    return sulci | (fissure & (g.rho < _INNER))


@dataclass
class _Break:
    """What a fracture does to the head: the removed bone, the bone pushed inwards, the scalp swelling."""

    gap: np.ndarray
    fragment: np.ndarray
    swelling: np.ndarray


def _fracture(g: _Grid, rng: np.random.Generator, side: int, base: bool) -> _Break:
    """A depressed fracture: a gap through the bone (at least ~4 columns wide at 64 columns, over many
    slices), the skull beside it pushed inwards, and the scalp swelling (subgaleal haematoma) over it.

    The gap alone crosses a skull only ~2 columns thick at 64 columns, too little for a 16x16 patch to
    see (calvarial-fracture balanced accuracy 0.46 in the demo); with the pushed-in bone and the swelling
    it is 0.92-0.93 over three seeds. The swelling widens the head's bounding box, so the crop moves by
    ~1.7 columns at 64 columns, as it would on a real scan.
    """
    angle = rng.uniform(-0.6, 0.6) + (0.0 if side > 0 else np.pi)
    line = angle + 0.3 * g.z  # the fracture runs obliquely
    half_width = 3.0 * 2.0 / 64 / 0.7  # radians: ~3 columns either side at 64 columns
    dtheta = np.angle(np.exp(1j * (g.theta - line)))
    zone = (g.z < -0.45) if base else (g.z > -0.1) & (g.z < 0.85)
    profile = np.clip(1 - (dtheta / (half_width * rng.uniform(2.5, 3.5))) ** 2, 0, 1)
    depth = rng.uniform(0.07, 0.10) * profile  # in rho; ~2.5-3.5 columns at 64 columns
    pushed = zone & (profile > 0)
    fragment = pushed & (g.rho >= _INNER - depth) & (g.rho < _SKULL_OUT - depth)
    vacated = pushed & (g.rho >= _SKULL_OUT - depth) & (g.rho <= _SKULL_OUT)
    line_gap = (np.abs(dtheta) < half_width) & zone & (g.rho >= _INNER - depth) & (g.rho <= _SKULL_OUT)
    thickness = rng.uniform(0.13, 0.18) * profile
    swelling = pushed & (g.rho > _SKULL_OUT) & (g.rho <= 1.0 + thickness)
    return _Break(line_gap | vacated, fragment & ~line_gap, swelling)


def _paint_bleeds(
    g: _Grid, rng: np.random.Generator, draw: dict, hu: np.ndarray, inside: np.ndarray, ventricles: np.ndarray
) -> np.ndarray:
    """Paint each drawn bleed type; returns the label map."""
    bleeds = np.zeros(hu.shape, np.int8)
    shapes = {"IPH": _iph, "SDH": _sdh, "EDH": _edh, "SAH": _sah}
    chronic = draw.get("chronic_type")
    # The chronic collection last, so acute blood drawn over the same band (SAH in the sulci under a
    # subdural, an epidural beside it) does not hide the part that makes it chronic.
    order = sorted(BLEED_TYPES, key=lambda name: name == chronic)
    for name in order:
        if not draw.get(name):
            continue
        side = draw["sides"][name]
        if name == "IVH":
            region = ventricles & ((g.x * side > 0) | (g.y > 0.1))
        elif name == chronic:  # a collection that has grown for weeks: larger than an acute one
            region = shapes[name](g, rng, side, _CHRONIC_SCALE) & inside
        else:
            region = shapes[name](g, rng, side) & inside
        # chronic blood is near CSF density, acute blood bright
        hu[region] = rng.uniform(8, 14) if name == chronic else rng.uniform(62, 78)
        bleeds[region] = BLEED_TYPES.index(name) + 1
    return bleeds


def _truth(g: _Grid, draw: dict, bleeds: np.ndarray, fracture: dict[str, np.ndarray]) -> dict[str, int]:
    present = {name: bool((bleeds == code).any()) for code, name in enumerate(BLEED_TYPES, start=1)}
    blood_x = np.broadcast_to(g.x, bleeds.shape)[bleeds > 0]
    chronic = draw.get("chronic_type")
    truth = {name: int(present[name]) for name in BLEED_TYPES}
    truth["ICH"] = int(any(present.values()))
    truth["BleedLocation-Left"] = int((blood_x > 0.02).any())
    truth["BleedLocation-Right"] = int((blood_x < -0.02).any())
    truth["ChronicBleed"] = int(chronic is not None and present[chronic])
    truth["CalvarialFracture"] = int(fracture["calvarial"].any())
    truth["OtherFracture"] = int(fracture["base"].any())
    truth["Fracture"] = int(truth["CalvarialFracture"] or truth["OtherFracture"])
    truth["MassEffect"] = int(bool(draw.get("mass_effect")))
    truth["MidlineShift"] = int(bool(draw.get("shift")))
    return truth


def render_phantom(shape: tuple[int, int, int], draw: dict, rng: np.random.Generator) -> Phantom:
    """Render one head with the drawn findings.

    Args:
        shape: (D, H, W) of the volume; H == W is assumed by the field of view.
        draw: output of `draw_findings` (types, sides, chronic type, fracture
            kinds, mass effect, midline-shift direction).
        rng: the scan's random generator.
    """
    g = _Grid(shape)
    shift = 0.0
    if draw.get("shift"):
        # The midline moves away from the lesion by ~5-6 columns at 64 columns.
        shift = -draw["lesion_side"] * rng.uniform(0.16, 0.20)
    compress = draw["lesion_side"] if draw.get("mass_effect") else 0
    hu, inside, ventricles = _anatomy(g, shift, compress)
    bleeds = _paint_bleeds(g, rng, draw, hu, inside, ventricles)
    fracture = {"calvarial": np.zeros(hu.shape, bool), "base": np.zeros(hu.shape, bool)}
    for kind in draw.get("fractures", ()):
        broken = _fracture(g, rng, draw["fracture_side"], base=kind == "base")
        hu[broken.fragment] = _BONE
        bleeds[broken.fragment] = 0  # the pushed-in bone takes the place of what lay beneath
        hu[broken.gap] = 40.0  # soft tissue fills the break
        hu[broken.swelling] = rng.uniform(50, 62)
        fracture[kind] |= broken.gap
    truth = _truth(g, draw, bleeds, fracture)
    hu += rng.normal(0.0, 5.0, hu.shape).astype(np.float32)
    return Phantom(np.rint(hu).astype(np.int16), bleeds, fracture["calvarial"] | fracture["base"], truth)


# Rates counted in the real label files (CQ500's reads.csv, PhysioNet's per-slice CSV): CQ500 majority
# counts over 491 scans and 205 with ICH; PhysioNet 36 of 75 patients with hemorrhage, 22 with fracture
# (21 of them with hemorrhage).
RATES = {
    "cq500": {"ICH": 205 / 491, "IPH": 134 / 205, "IVH": 28 / 205, "SDH": 53 / 205, "EDH": 13 / 205,
              "SAH": 60 / 205, "left": 131 / 205, "right": 129 / 205, "chronic": 19 / 205,
              "fracture_ich": 0.13, "fracture_clear": 0.05, "calvarial": 34 / 39, "base": 12 / 39,
              "mass": 127 / 205, "shift": 65 / 127},
    "physionet": {"ICH": 36 / 75, "IPH": 16 / 36, "IVH": 5 / 36, "SDH": 4 / 36, "EDH": 21 / 36,
                  "SAH": 7 / 36, "left": 0.64, "right": 0.63, "chronic": 0.0,
                  "fracture_ich": 21 / 36, "fracture_clear": 1 / 39, "calvarial": 34 / 39, "base": 12 / 39,
                  "mass": 0.4, "shift": 0.5},
    # Every finding in about half of the scans, for small demos.
    "balanced": {"ICH": 0.8, "IPH": 0.55, "IVH": 0.55, "SDH": 0.55, "EDH": 0.55, "SAH": 0.55,
                 "left": 0.6, "right": 0.6, "chronic": 0.6, "fracture_ich": 0.5, "fracture_clear": 0.5,
                 "calvarial": 0.7, "base": 0.5, "mass": 0.65, "shift": 0.75},
}  # fmt: skip
# Balanced, for a dataset whose labels name no chronic bleed (PhysioNet CT-ICH: acute trauma).
RATES["balanced_acute"] = {**RATES["balanced"], "chronic": 0.0}


def draw_findings(rng: np.random.Generator, rates: str = "cq500") -> dict:
    """Draw one scan's findings.

    Args:
        rng: the scan's random generator.
        rates: "cq500", "physionet" (real label frequencies), "balanced" or "balanced_acute" (no
            chronic bleed).
    """
    p = RATES[rates]
    draw: dict = {"sides": {}, "fractures": [], "lesion_side": int(rng.choice((-1, 1)))}
    if rng.random() < p["ICH"]:
        types = [t for t in BLEED_TYPES if rng.random() < p[t]]
        if not types:
            weights = np.array([p[t] for t in BLEED_TYPES])
            types = [str(rng.choice(BLEED_TYPES, p=weights / weights.sum()))]
        sides = [s for s, key in ((1, "left"), (-1, "right")) if rng.random() < p[key]]
        sides = sides or [int(rng.choice((-1, 1)))]
        draw["lesion_side"] = sides[0]
        for i, name in enumerate(types):
            draw[name] = True
            draw["sides"][name] = sides[i % len(sides)]
        chronic_able = [t for t in ("SDH", "IPH", "EDH") if t in types]
        if chronic_able and rng.random() < p["chronic"]:
            draw["chronic_type"] = chronic_able[0]
        draw["mass_effect"] = bool(rng.random() < p["mass"])
        draw["shift"] = draw["mass_effect"] and bool(rng.random() < p["shift"])
    if rng.random() < p["fracture_ich" if draw["sides"] else "fracture_clear"]:
        kinds = [k for k in ("calvarial", "base") if rng.random() < p[k]] or ["calvarial"]
        draw["fractures"] = kinds
        extra_axial = [draw["sides"][t] for t in ("EDH", "SDH") if t in draw["sides"]]
        draw["fracture_side"] = extra_axial[0] if extra_axial else int(rng.choice((-1, 1)))
    return draw
