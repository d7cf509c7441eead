"""Deterministic demo data in exactly the Kaggle UW-Madison GI-tract layout.

    <out>/train.csv                                   id,class,segmentation (3 rows per slice)
    <out>/train/case<N>/case<N>_day<D>/scans/slice_<SSSS>_<W>_<H>_<PX>_<PY>.png   (16-bit grayscale)

Each case-day is a volume of contiguous slices of a synthetic abdomen: a body ellipse, a bright smooth stomach,
a dark striped large bowel and speckled small-bowel loops (one loop overlaps the large bowel, so some pixels
carry two labels). Scans come in three sizes, 266x266, 234x234 and 360 wide x 310 high. Two anatomies:
  real   (the demo's) organs of the real data's size: on the slices that show it, the median organ covers 1.7 %
         of the slice (large bowel), 2.4 % (small bowel), 1.5 % (stomach), as measured on 1,493 annotated slices
         of the competition data; each organ is a few parts (colon cross-sections, loops) that appear, grow and
         vanish at their own depths, so the first fifth and the last fifth of every volume show no organ (42 % of
         the demo's slices are organ-free)
  large  organs 3-5 times larger on almost every slice (a C-shaped colon tube): the data of the tests, which
         must learn in a few steps, and of the competition-sized sets, which are for speed and memory

    giseg demo-data --out demo/data                       # the demo: 6 cases, 9 case-days, 360 slices
    giseg demo-data --out /data/gi-full --size full        # the competition's shape (below), in parallel
    giseg demo-data --out /data/gi-10x --size 10x          # its first 17 case-days: 2,256 slices

``--size full`` writes a dataset of the real training set's shape: 85 cases, 274 case-days, 38,496 slices (259
case-days of 144 slices and 15 of 80), 115,488 rows in train.csv, and the scan sizes in the proportions of the
competition data as public EDA notebooks count them (by slices: 266x266 25,920; 360x310 11,232; 276x276 1,200,
the 80-slice case-days; 234x234 144). Case-days are drawn in parallel, one process per core; the organs are the
demo's, so the figures it is for are speed and memory, not Dice.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from giseg.data.demo_hard import HardKnobs, case_anatomy, day_state, draw_hard_slice
from giseg.data.rle import encode_rle
from giseg.utils.files import atomic_write_text

# train.csv's classes, in the order of data/gi.py's GI_CLASSES (a test checks; gi.py imports this module)
ORGANS = ("large_bowel", "small_bowel", "stomach")
# (case, days, (W, H)) of the demo cases: three scan sizes, one non-square as in the real data.
DEMO_CASES = ((2, (1, 7), (266, 266)), (7, (3,), (360, 310)), (15, (1, 2), (234, 234)),
              (23, (5,), (360, 310)), (36, (1, 4), (266, 266)), (41, (2,), (360, 310)))
SLICES_PER_DAY = 40  # the demo's case-days (real ones have 144 or 80; the demo must train in 2 minutes)
PIXEL_SPACING = {(266, 266): 1.50, (234, 234): 1.63, (360, 310): 1.50, (276, 276): 1.63}


# the competition's training set by scan size: (W, H), case-days, slices per case-day
COMPETITION_SIZES = (((266, 266), 180, 144), ((360, 310), 78, 144), ((276, 276), 15, 80), ((234, 234), 1, 144))
COMPETITION_CASES = 85
SIZES = {"demo": 0, "10x": 2160, "full": 38496}  # --size -> slices of the competition layout (0: DEMO_CASES)
ANATOMIES = ("real", "large", "hard")  # hard: data/demo_hard.py (giseg demo-data --difficulty hard)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _draw_slice(rng: np.random.Generator, shape: tuple[int, int], z: float, anatomy: dict) -> tuple[np.ndarray, dict]:
    """One 16-bit slice and its three organ masks at relative depth z in [0, 1]."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = min(h, w)
    cy, cx = h * 0.5 + anatomy["dy"] * s, w * 0.5 + anatomy["dx"] * s
    img = rng.normal(300, 80, size=shape).astype(np.float32)  # scanner noise on air
    body = _ellipse(yy, xx, cy, cx, 0.40 * h, 0.44 * w)
    img[body] = rng.normal(6000, 500, size=int(body.sum()))

    def presence(lo: float, hi: float) -> float:  # 0 outside [lo, hi], 1 in the middle of it
        return float(np.clip(np.sin(np.pi * (z - lo) / (hi - lo)), 0, 1)) if lo < z < hi else 0.0

    masks = {}
    # Large bowel: a thick C-shaped tube along the body wall, dark, striped.
    p = presence(0.22, 0.82)
    r = np.hypot((yy - cy) / (0.30 * h), (xx - cx) / (0.33 * w))
    ang = np.arctan2(yy - cy, xx - cx)
    thick = 0.16 * p
    lb = (np.abs(r - 0.85) < thick) & (np.cos(ang - anatomy["lb_gap"]) < 0.55) & body if p > 0.15 else np.zeros(shape, bool)
    masks["large_bowel"] = lb
    # Small bowel: speckled loops near the centre; the first loop sits on the large bowel's wall.
    p = presence(0.32, 0.78)
    sb = np.zeros(shape, bool)
    if p > 0.15:
        for i, (oy, ox) in enumerate(anatomy["sb_loops"]):
            rad = (0.055 + 0.03 * p) * s * (1.3 if i == 0 else 1.0)
            sb |= _ellipse(yy, xx, cy + oy * h, cx + ox * w, rad, rad * 1.2)
        sb &= body
    masks["small_bowel"] = sb
    # Stomach: a large bright smooth ellipse, upper part of the abdomen.
    p = presence(0.12, 0.58)
    st = _ellipse(yy, xx, cy - 0.14 * h, cx + 0.16 * w, 0.16 * h * p, 0.12 * w * p) & body if p > 0.2 else np.zeros(shape, bool)
    masks["stomach"] = st

    img[lb] = 2500 + 900 * np.sin(xx[lb] * 0.9) + rng.normal(0, 200, int(lb.sum()))
    speck = rng.normal(10500, 1800, size=shape).astype(np.float32)
    img[sb] = np.where(lb[sb], 0.5 * (img[sb] + speck[sb]), speck[sb])
    img[st] = rng.normal(15000, 250, size=int(st.sum()))
    img = cv2.GaussianBlur(img, (3, 3), 0)
    return np.clip(img, 0, 65535).astype(np.uint16), masks


# Median organ area on the slices where the organ appears, measured on 1,493 annotated slices of the competition
# data (issue #12): the realistic anatomy is drawn to match these fractions of the slice.
REAL_MEDIAN_AREA = {"large_bowel": 0.017, "small_bowel": 0.024, "stomach": 0.015}


# where along the volume (relative depth z in [0, 1]) each organ part appears: (start, end); outside, nothing
LB_PARTS = ((0.22, 0.60), (0.28, 0.74), (0.40, 0.78))  # three cross-sections of the colon
SB_PARTS = ((0.34, 0.62), (0.40, 0.72), (0.46, 0.78), (0.36, 0.56))  # small-bowel loops, coming and going
ST_PART = (0.18, 0.52)


# each part's area at full growth, as a fraction of the slice: calibrated so that the generated demo's median
# areas match REAL_MEDIAN_AREA (tests/test_demo_data.py measures them)
PART_AREA = {"large_bowel": 0.011, "small_bowel": 0.014, "stomach": 0.019}


def _draw_realistic_slice(rng: np.random.Generator, shape: tuple[int, int], z: float,
                          anatomy: dict) -> tuple[np.ndarray, dict]:
    """One 16-bit slice and its organ masks at relative depth z, with organs of the real data's size: each organ
    is a few round parts (the colon's cross-sections, small-bowel loops, the stomach) that appear, grow and vanish
    at their own depths, so a volume's first and last fifth show no organ; one loop overlaps the colon."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = min(h, w)
    cy, cx = h * 0.5 + anatomy["dy"] * s, w * 0.5 + anatomy["dx"] * s
    img = rng.normal(300, 80, size=shape).astype(np.float32)
    body = _ellipse(yy, xx, cy, cx, 0.40 * h, 0.44 * w)
    img[body] = rng.normal(6000, 500, size=int(body.sum()))

    def grown(part: tuple[float, float]) -> float:  # 0 outside the part's depths, up to 1 in their middle
        lo, hi = part
        return float(np.sin(np.pi * (z - lo) / (hi - lo))) if lo < z < hi else 0.0

    def blobs(parts, centres, name: str) -> np.ndarray:
        """Round parts, each of PART_AREA[name] of the slice at full growth (its area grows with sin)."""
        m = np.zeros(shape, bool)
        for part, (oy, ox) in zip(parts, centres):
            g = grown(part)
            if g < 0.15:
                continue
            r = np.sqrt(g * PART_AREA[name] * h * w / np.pi)
            m |= _ellipse(yy, xx, cy + oy * h, cx + ox * w, r * 0.9, r * 1.1)
        return m & body

    lb = blobs(LB_PARTS, anatomy["lb_centres"], "large_bowel")
    sb = blobs(SB_PARTS, anatomy["sb_centres"], "small_bowel")
    st = blobs((ST_PART,), (anatomy["st_centre"],), "stomach")
    img[lb] = 2500 + 900 * np.sin(xx[lb] * 0.9) + rng.normal(0, 200, int(lb.sum()))
    speck = rng.normal(10500, 1800, size=shape).astype(np.float32)
    img[sb] = np.where(lb[sb], 0.5 * (img[sb] + speck[sb]), speck[sb])
    img[st] = rng.normal(15000, 250, size=int(st.sum()))
    img = cv2.GaussianBlur(img, (3, 3), 0)
    return np.clip(img, 0, 65535).astype(np.uint16), {"large_bowel": lb, "small_bowel": sb, "stomach": st}


def competition_layout(seed: int = 0) -> list[tuple[int, int, int, tuple[int, int]]]:
    """(case, day, slices, (W, H)) of every case-day of a dataset of the competition's shape, in a fixed
    shuffled order of sizes (the first N of them are a smaller dataset of the same mix)."""
    rng = np.random.default_rng(seed)
    specs = [(n, size) for size, days, n in COMPETITION_SIZES for _ in range(days)]
    order = rng.permutation(len(specs))
    per_case = np.full(COMPETITION_CASES, len(specs) // COMPETITION_CASES)
    per_case[:len(specs) % COMPETITION_CASES] += 1  # 19 cases of 4 case-days, 66 of 3
    case_ids = np.sort(rng.choice(np.arange(1, 157), COMPETITION_CASES, replace=False))
    out, k = [], 0
    for case, n_days in zip(case_ids, per_case):
        for day in np.sort(rng.choice(np.arange(0, 40), n_days, replace=False)):
            n, size = specs[order[k]]
            out.append((int(case), int(day), n, size))
            k += 1
    return out


def _write_case_day(out: Path, seed: int, case: int, day: int, n_slices: int, size: tuple[int, int],
                    anatomy_kind: str = "large", knobs: HardKnobs | None = None) -> list[str]:
    """Draw one case-day's scans into ``out``; return its train.csv rows."""
    w, h = size
    rng = np.random.default_rng([seed, case, day])
    if anatomy_kind == "hard":  # the case's anatomy is its days' (drawn from the case alone); the day's own state
        knobs = knobs or HardKnobs()
        shared, today = case_anatomy(np.random.default_rng([seed, case])), day_state(rng, knobs)
        return _write_slices(out, case, day, n_slices, (w, h), lambda k, z: draw_hard_slice(
            rng, (h, w), z, k, shared, today, knobs))
    anatomy = {"dy": rng.uniform(-0.04, 0.04), "dx": rng.uniform(-0.04, 0.04), "lb_gap": rng.uniform(-0.6, 0.6),
               "sb_loops": [(0.13 * np.sin(0.5 + k * 2.1) + rng.uniform(-0.03, 0.03),
                             0.15 * np.cos(0.5 + k * 2.1) + rng.uniform(-0.03, 0.03)) for k in range(3)]}
    anatomy["sb_loops"][0] = (0.22, -0.2)  # overlaps the large bowel tube
    draw = _draw_slice
    if anatomy_kind == "real":
        jitter = lambda: rng.uniform(-0.03, 0.03)  # noqa: E731
        anatomy["lb_centres"] = [(0.05 + jitter(), -0.27 + jitter()), (-0.19 + jitter(), jitter()),
                                 (0.06 + jitter(), 0.27 + jitter())]
        anatomy["sb_centres"] = [(0.14 + jitter(), -0.08 + jitter()), (0.16 + jitter(), 0.08 + jitter()),
                                 (0.02 + jitter(), 0.12 + jitter()), (0.11, -0.23)]  # the last on the colon's edge
        anatomy["st_centre"] = (-0.13 + jitter(), 0.17 + jitter())
        draw = _draw_realistic_slice
    return _write_slices(out, case, day, n_slices, (w, h), lambda k, z: draw(rng, (h, w), z, anatomy))


def _write_slices(out: Path, case: int, day: int, n_slices: int, size: tuple[int, int], draw) -> list[str]:
    """Write a case-day's slices, ``draw(k, z)`` -> (16-bit image, masks) for slice k at relative depth z; return
    its train.csv rows."""
    w, h = size
    scans = out / "train" / f"case{case}" / f"case{case}_day{day}" / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    px = PIXEL_SPACING[(w, h)]
    rows = []
    for k in range(1, n_slices + 1):
        img, masks = draw(k, k / (n_slices + 1))
        name = f"slice_{k:04d}_{w}_{h}_{px:.2f}_{px:.2f}.png"
        if not cv2.imwrite(str(scans / name), img):
            raise OSError(f"could not write {scans / name}")
        sid = f"case{case}_day{day}_slice_{k:04d}"
        rows += [f"{sid},{c},{encode_rle(masks[c])}" for c in ORGANS]
    return rows


def make_demo_data(out_dir: str | Path, seed: int = 0, slices_per_day: int = SLICES_PER_DAY, size: str = "demo",
                   workers: int = 1, anatomy: str | None = None, knobs: HardKnobs | None = None) -> Path:
    """Write the demo dataset (``size`` "demo") or one of the competition's shape ("10x", "full"; see the module
    docstring) to ``out_dir``, drawing case-days in ``workers`` processes; skipped when its train.csv already
    exists. ``anatomy``: "real" (organs of the real data's size, organ-free volume ends; the demo's default) or
    "large" (organs 3-5 times larger, on almost every slice: what the tests train on in a few steps, and the
    competition-sized sets, which are for speed and memory) or "hard" (the real data's sizes and what makes its
    scans hard, by ``knobs``: data/demo_hard.py). Returns the path."""
    anatomy = anatomy or ("real" if size == "demo" else "large")
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy must be one of {ANATOMIES}, got {anatomy!r}")
    out = Path(out_dir)
    if (out / "train.csv").exists():
        return out
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    if not SIZES[size]:
        jobs = [(case, day, slices_per_day, wh, anatomy, knobs) for case, days, wh in DEMO_CASES for day in days]
    else:  # the first case-days of the layout that hold at least that many slices
        layout = competition_layout(seed)
        total = np.cumsum([n for _, _, n, _ in layout])
        jobs = [(*job, anatomy, knobs) for job in layout[:int(np.searchsorted(total, SIZES[size])) + 1]]
    rows = ["id,class,segmentation"]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for part in pool.map(_write_case_day, *zip(*[(out, seed, *job) for job in jobs])):
                rows += part
    else:
        for job in jobs:
            rows += _write_case_day(out, seed, *job)
    atomic_write_text(out / "train.csv", "\n".join(rows) + "\n")  # written last: its presence marks a complete set
    return out
