"""The hard demo: synthetic GI-tract MRI that is hard in the real data's ways (`giseg demo-data --difficulty hard`).

The default demo (data/demo.py) is easy: every recipe scores 0.95-0.97 mean Dice on it, so nothing can be ranked
there. This generator keeps its layout, its organ sizes (the real data's median areas, REAL_MEDIAN_AREA) and its
organ-free volume ends, and adds what makes the real scans hard, each as a knob (HardKnobs: a default and why).
A case's anatomy is shared by its days; intensities, filling, position and noise change from day to day.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np

from giseg.utils.options import at_least, flag


@dataclass(frozen=True)
class HardKnobs:
    """What makes the hard demo hard; 0 turns a knob off (`--hard_knobs noise=0,motion=0`)."""
    overlap: float = flag(
        0.5, "organ intensities overlap their surroundings by this share of their contrast: MRI has no fixed "
        "intensity scale, and the bowel's contents (air, fluid, food) vary", **at_least(0))
    bias: float = flag(
        0.35, "amplitude of a smooth multiplicative bias field (coil sensitivity): the same tissue is brighter on "
        "one side of the body than on the other", **at_least(0))
    noise: float = flag(
        0.055, "Rician noise, as a share of the soft tissue's intensity: magnitude images of complex Gaussian noise, "
        "biased upwards in dark regions", **at_least(0))
    tortuous: float = flag(
        1.0, "the small bowel as thin tortuous loops that run across slices and touch the large bowel (1), instead "
        "of round blobs (0)", **at_least(0))
    motion: float = flag(
        2.0, "slice-to-slice motion in pixels (breathing and peristalsis): an organ is not where it was on the "
        "neighbouring slice", **at_least(0))
    partial_volume: float = flag(
        1.0, "edges as the share of each pixel an organ covers (1), not hard steps (0): thick slices average "
        "tissues at boundaries", **at_least(0))
    day_change: float = flag(
        1.0, "how much the days of one case differ (filling, position, contrast): the same patient scanned again "
        "is not the same image", **at_least(0))
    confounders: float = flag(
        1.0, "organ-like tissue that is not an organ: liver beside the stomach, fluid-filled loops outside the "
        "small bowel's masks, kidneys", **at_least(0))

    @classmethod
    def parse(cls, text: str) -> "HardKnobs":
        """'noise=0,motion=1.5' -> HardKnobs with those values (the rest at their defaults)."""
        knobs = {f.name: f.metadata for f in dataclasses.fields(cls)}
        values = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            name, _, value = item.partition("=")
            if name not in knobs:
                raise ValueError(f"unknown knob {name!r} (knobs: {', '.join(sorted(knobs))})")
            try:
                values[name] = float(value)
            except ValueError:
                raise ValueError(f"knob {name}={value!r}: expected a number") from None
            meta = knobs[name]
            if not meta["check"](values[name]):
                raise ValueError(f"knob {name}={value}: must be {meta['what']}")
        return cls(**values)


def knob_help() -> str:
    return "; ".join(f"{f.name} (default {f.default}): {f.metadata['help']}" for f in dataclasses.fields(HardKnobs))


# ------------------------------------------------------------------ per case, per day
def case_anatomy(rng: np.random.Generator) -> dict:
    """What the days of one case share: where the organs' parts lie, the small bowel's loops' paths."""
    j = lambda: rng.uniform(-0.03, 0.03)  # noqa: E731
    loops = []
    for _ in range(4):  # each loop: a smooth random path through the lower abdomen, drifting with depth
        loops.append({"centre": (rng.uniform(0.0, 0.2), rng.uniform(-0.2, 0.2)),
                      "freq": rng.uniform(1.5, 3.5, 2), "phase": rng.uniform(0, 2 * np.pi, 2),
                      "span": (rng.uniform(0.08, 0.14), rng.uniform(0.10, 0.18)), "drift": rng.uniform(-2, 2, 2)})
    loops[0]["centre"] = (0.08, -0.22)  # runs along the colon's edge: the two organs touch
    outline = lambda: [(rng.uniform(0.1, 0.35), rng.uniform(0, 2 * np.pi)) for _ in range(3)]  # noqa: E731
    return {"lb_centres": [(0.05 + j(), -0.27 + j()), (-0.19 + j(), j()), (0.06 + j(), 0.27 + j())],
            "lb_outlines": [outline() for _ in LB_PARTS], "st_outline": [outline()],
            "st_centre": (-0.13 + j(), 0.17 + j()), "liver": (-0.10 + j(), -0.22 + j()), "loops": loops,
            "kidneys": [(0.05 + j(), -0.16 + j()), (0.05 + j(), 0.16 + j())], "fluid": (0.18 + j(), 0.02 + j())}


def day_state(rng: np.random.Generator, knobs: HardKnobs) -> dict:
    """What changes between days: contents (contrast), filling, position, bias field, noise."""
    d, o = knobs.day_change, knobs.overlap
    body = 6000.0
    # each organ's mean as body + contrast; overlap pulls the contrast towards 0 (and across it) day by day
    contrast = {"large_bowel": -3200 * (1 - o * rng.uniform(0.3, 1.1)),
                "small_bowel": 4200 * (1 - o * rng.uniform(0.4, 1.2)),
                "stomach": (8500 if rng.random() < 0.5 else -3800) * (1 - o * rng.uniform(0.15, 0.75))}
    return {"body": body, "contrast": contrast, "fill": 1 + d * rng.uniform(-0.35, 0.3),
            "shift": d * rng.uniform(-0.03, 0.03, 2), "bias": rng.normal(0, 1, (4, 4)),
            "breath": rng.uniform(0, 2 * np.pi)}


# ------------------------------------------------------------------ one slice
SUPER = 2  # masks are drawn at twice the resolution: a pixel's coverage is the share of its 4 sub-pixels


def _coverage(canvas: np.ndarray, shape: tuple[int, int], soft: bool) -> np.ndarray:
    """A (2H, 2W) 0/1 drawing -> (H, W) coverage in [0, 1] (hard: 0 or 1 by the majority)."""
    cov = cv2.resize(canvas.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return cov if soft else (cov >= 0.5).astype(np.float32)


def _blob(shape2: tuple[int, int], cy: float, cx: float, r: float, shape: np.ndarray, z: float) -> np.ndarray:
    """An irregular round blob (radius r, in super-pixels) drawn as a polygon; ``shape`` (3 harmonics' amplitude
    and phase, the case's) makes its outline, which turns slowly with depth z."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = 1 + sum(a * np.sin(k * t + p + 3 * z) / k for k, (a, p) in zip((2, 3, 5), shape))
    pts = np.stack([cx + r * 1.1 * wobble * np.cos(t), cy + r * 0.9 * wobble * np.sin(t)], 1)
    canvas = np.zeros(shape2, np.uint8)
    cv2.fillPoly(canvas, [np.round(pts * 4).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=2)
    return canvas


def _grown(part: tuple[float, float], z: float) -> float:
    lo, hi = part
    return float(np.sin(np.pi * (z - lo) / (hi - lo))) if lo < z < hi else 0.0


# where along the volume (relative depth z) each organ's parts appear, and each part's area at full growth as a
# fraction of the slice, set so that the median areas stay the real data's (data/demo.py REAL_MEDIAN_AREA; a test)
PART_AREA = {"large_bowel": 0.011, "small_bowel": 0.0111, "stomach": 0.0234}
LB_PARTS = ((0.22, 0.60), (0.28, 0.74), (0.40, 0.78))
SB_PARTS = ((0.30, 0.66), (0.36, 0.74), (0.42, 0.80), (0.32, 0.60))
ST_PART = (0.18, 0.52)
SB_THICKNESS = 0.034  # the loops' width, as a share of the slice's side


def _loop(shape2: tuple[int, int], loop: dict, z: float, g: float, origin: tuple[float, float], s2: float,
          knobs: HardKnobs) -> np.ndarray:
    """One small-bowel loop at depth z: a tortuous tube whose length grows with g (tortuous knob), else a blob."""
    cy, cx = origin[0] + loop["centre"][0] * s2, origin[1] + loop["centre"][1] * s2
    canvas = np.zeros(shape2, np.uint8)
    area = g * PART_AREA["small_bowel"] * 1.25 * shape2[0] * shape2[1]
    if knobs.tortuous <= 0:
        r = np.sqrt(area / np.pi)
        cv2.ellipse(canvas, (int(cx), int(cy)), (int(r * 1.1), int(r * 0.9)), 0, 0, 360, 1, -1)
        return canvas
    width = max(2, SB_THICKNESS * s2)
    length = area / width  # tube length that gives the part's area
    t = np.linspace(0, 1, 64)
    (fy, fx), (py, px), (sy, sx) = loop["freq"], loop["phase"] + loop["drift"] * z, loop["span"]
    y = np.sin(2 * np.pi * fy * t + py) * sy * s2 * 0.5
    x = (t - 0.5) * sx * s2 + np.sin(2 * np.pi * fx * t + px) * 0.3 * sx * s2 * knobs.tortuous
    seg = np.hypot(np.diff(y), np.diff(x)).sum()
    keep = t <= min(1.0, length / max(seg, 1e-6))
    pts = np.stack([cx + x[keep], cy + y[keep]], 1)
    cv2.polylines(canvas, [np.round(pts * 4).astype(np.int32)], False, 1, thickness=int(round(width)),
                  lineType=cv2.LINE_8, shift=2)
    return canvas


def draw_hard_slice(rng: np.random.Generator, shape: tuple[int, int], z: float, k: int, anatomy: dict, day: dict,
                    knobs: HardKnobs) -> tuple[np.ndarray, dict]:
    """One 16-bit slice and its organ masks at relative depth z (slice k of its volume)."""
    h, w = shape
    h2, w2, s2 = h * SUPER, w * SUPER, min(h, w) * SUPER
    motion = knobs.motion * SUPER * (np.sin(day["breath"] + 0.7 * k) + rng.normal(0, 0.5, 2))
    cy, cx = h2 * 0.5 + day["shift"][0] * s2 + motion[0], w2 * 0.5 + day["shift"][1] * s2 + motion[1]
    soft = knobs.partial_volume > 0
    body = _coverage(cv2.ellipse(np.zeros((h2, w2), np.uint8), (int(cx), int(cy)), (int(0.44 * w2), int(0.40 * h2)),
                                 0, 0, 360, 1, -1), shape, True)
    fill = {"large_bowel": 1.0, "small_bowel": 1.0, "stomach": day["fill"]}
    draws = {}
    for name, parts, centres, outlines in (
            ("large_bowel", LB_PARTS, anatomy["lb_centres"], anatomy["lb_outlines"]),
            ("stomach", (ST_PART,), (anatomy["st_centre"],), anatomy["st_outline"])):
        canvas = np.zeros((h2, w2), np.uint8)
        for part, (oy, ox), outline in zip(parts, centres, outlines):
            g = _grown(part, z) * fill[name]
            if g >= 0.15:
                r = np.sqrt(g * PART_AREA[name] * h2 * w2 / np.pi)
                canvas |= _blob((h2, w2), cy + oy * s2, cx + ox * s2, r, outline, z)
        draws[name] = canvas
    canvas = np.zeros((h2, w2), np.uint8)
    for part, loop in zip(SB_PARTS, anatomy["loops"]):
        g = _grown(part, z)
        if g >= 0.15:
            canvas |= _loop((h2, w2), loop, z, g, (cy, cx), s2, knobs)
    draws["small_bowel"] = canvas
    cover = {name: _coverage(c, shape, soft) * (body >= 0.5) for name, c in draws.items()}
    img = _tissue(rng, shape, (cy / SUPER, cx / SUPER), min(h, w), body, z, anatomy, day, knobs)
    for name in ("large_bowel", "small_bowel", "stomach"):  # each organ over what lies beneath, by its coverage
        level = day["body"] + day["contrast"][name]
        texture = rng.normal(0, 0.12 * abs(day["contrast"][name]) + 300, shape)
        if name == "large_bowel":  # haustra and air pockets: stripes
            texture += 0.25 * day["contrast"][name] * np.sin(np.arange(w)[None, :] * 0.9 + np.arange(h)[:, None] * 0.3)
        img = img * (1 - cover[name]) + (level + texture) * cover[name]
    img *= _bias_field(day["bias"], shape, knobs.bias)
    sigma = knobs.noise * day["body"]
    if sigma > 0:  # Rician: the magnitude of the signal plus complex Gaussian noise
        img = np.hypot(img + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
    img = cv2.GaussianBlur(img.astype(np.float32), (3, 3), 0)
    masks = {name: c >= 0.5 for name, c in cover.items()}
    return np.clip(img, 0, 65535).astype(np.uint16), masks


def _tissue(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float], s: int,
            body: np.ndarray, z: float, anatomy: dict, day: dict, knobs: HardKnobs) -> np.ndarray:
    """Air, body and the structures that are not organs (liver, kidneys, fluid-filled loops, spine)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 300 + (day["body"] - 300) * body + rng.normal(0, 0.06 * day["body"], shape) * body
    if knobs.confounders <= 0:
        return img
    cy, cx = centre
    c = knobs.confounders
    looks = [(anatomy["liver"], 0.17, day["contrast"]["stomach"] * 0.5 * c, 1.0 - z),  # liver: upper abdomen
             (anatomy["fluid"], 0.05, day["contrast"]["small_bowel"] * 0.9 * c, _grown((0.25, 0.85), z)),
             *((k, 0.045, 2500 * c, _grown((0.3, 0.7), z)) for k in anatomy["kidneys"]),
             ((0.30, 0.0), 0.05, -4000 * c, 1.0)]  # the spine
    for (oy, ox), r, delta, g in looks:
        if g <= 0.1:
            continue
        rr = r * s * np.sqrt(g)
        m = ((yy - cy - oy * s) / (rr * 0.9)) ** 2 + ((xx - cx - ox * s) / (rr * 1.1)) ** 2
        img += delta * np.clip(1.5 - m, 0, 1) * body  # soft-edged
    return img


def _bias_field(grid: np.ndarray, shape: tuple[int, int], amplitude: float) -> np.ndarray:
    """A smooth multiplicative field: a 4x4 random grid, upsampled with bicubic interpolation, in 1 +- amplitude."""
    if amplitude <= 0:
        return np.ones(shape, np.float32)
    field = cv2.resize(grid.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return np.exp(amplitude * np.tanh(field / 1.5)).astype(np.float32)
