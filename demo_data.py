"""Deterministic demo data in exactly the Kaggle UW-Madison GI-tract layout.

    <out>/train.csv                                   id,class,segmentation (3 rows per slice)
    <out>/train/case<N>/case<N>_day<D>/scans/slice_<SSSS>_<W>_<H>_<PX>_<PY>.png   (16-bit grayscale)

Each case-day is a short volume of contiguous slices of a synthetic abdomen: a body ellipse, a bright smooth
stomach, a dark striped C-shaped large bowel and speckled small-bowel loops (one loop overlaps the large
bowel, so some pixels carry two labels). Organs come and go along the slice axis, so the first and last
slices of every volume are empty. Scans come in three sizes, 266x266, 234x234 and 360 wide x 310 high.

    python demo_data.py --out demo/data                       # the demo: 6 cases, 9 case-days, 216 slices
    python demo_data.py --out /data/gi-full --size full        # the competition's shape (below), in parallel
    python demo_data.py --out /data/gi-10x --size 10x          # its first 17 case-days: 2,256 slices

``--size full`` writes a dataset of the real training set's shape: 85 cases, 274 case-days, 38,496 slices (259
case-days of 144 slices and 15 of 80), 115,488 rows in train.csv, and the scan sizes in the proportions of the
competition data as public EDA notebooks count them (by slices: 266x266 25,920; 360x310 11,232; 276x276 1,200,
the 80-slice case-days; 234x234 144). Case-days are drawn in parallel, one process per core; the organs are the
demo's, so the figures it is for are speed and memory, not Dice.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from rle import encode_rle
from data import GI_CLASSES
from utils import atomic_write_text, command

# (case, days, (W, H)) of the demo cases: three scan sizes, one non-square as in the real data.
DEMO_CASES = ((2, (1, 7), (266, 266)), (7, (3,), (360, 310)), (15, (1, 2), (234, 234)),
              (23, (5,), (360, 310)), (36, (1, 4), (266, 266)), (41, (2,), (360, 310)))
SLICES_PER_DAY = 24
PIXEL_SPACING = {(266, 266): 1.50, (234, 234): 1.63, (360, 310): 1.50, (276, 276): 1.63}
# the competition's training set by scan size: (W, H), case-days, slices per case-day
COMPETITION_SIZES = (((266, 266), 180, 144), ((360, 310), 78, 144), ((276, 276), 15, 80), ((234, 234), 1, 144))
COMPETITION_CASES = 85
SIZES = {"demo": 0, "10x": 2160, "full": 38496}  # --size -> slices of the competition layout (0: DEMO_CASES)


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


def _write_case_day(out: Path, seed: int, case: int, day: int, n_slices: int, size: tuple[int, int]) -> list[str]:
    """Draw one case-day's scans into ``out``; return its train.csv rows."""
    w, h = size
    rng = np.random.default_rng([seed, case, day])
    anatomy = {"dy": rng.uniform(-0.04, 0.04), "dx": rng.uniform(-0.04, 0.04), "lb_gap": rng.uniform(-0.6, 0.6),
               "sb_loops": [(0.13 * np.sin(0.5 + k * 2.1) + rng.uniform(-0.03, 0.03),
                             0.15 * np.cos(0.5 + k * 2.1) + rng.uniform(-0.03, 0.03)) for k in range(3)]}
    anatomy["sb_loops"][0] = (0.22, -0.2)  # overlaps the large bowel tube
    scans = out / "train" / f"case{case}" / f"case{case}_day{day}" / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    px = PIXEL_SPACING[(w, h)]
    rows = []
    for k in range(1, n_slices + 1):
        img, masks = _draw_slice(rng, (h, w), k / (n_slices + 1), anatomy)
        name = f"slice_{k:04d}_{w}_{h}_{px:.2f}_{px:.2f}.png"
        if not cv2.imwrite(str(scans / name), img):
            raise OSError(f"could not write {scans / name}")
        sid = f"case{case}_day{day}_slice_{k:04d}"
        rows += [f"{sid},{c},{encode_rle(masks[c])}" for c in GI_CLASSES]
    return rows


def make_demo_data(out_dir: str | Path, seed: int = 0, slices_per_day: int = SLICES_PER_DAY, size: str = "demo",
                   workers: int = 1) -> Path:
    """Write the demo dataset (``size`` "demo") or one of the competition's shape ("10x", "full"; see the module
    docstring) to ``out_dir``, drawing case-days in ``workers`` processes; skipped when its train.csv already
    exists. Returns the path."""
    out = Path(out_dir)
    if (out / "train.csv").exists():
        return out
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    if not SIZES[size]:
        jobs = [(case, day, slices_per_day, wh) for case, days, wh in DEMO_CASES for day in days]
    else:  # the first case-days of the layout that hold at least that many slices
        layout = competition_layout(seed)
        total = np.cumsum([n for _, _, n, _ in layout])
        jobs = layout[:int(np.searchsorted(total, SIZES[size])) + 1]
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


@command
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo/data", help="folder to write (default: demo/data)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    ap.add_argument("--size", default="demo", choices=tuple(SIZES),
                    help="demo (216 slices, default), 10x (2,256 slices of the competition's mix) or full (the "
                         "competition's shape: 38,496 slices of 274 case-days, 85 cases)")
    ap.add_argument("--workers", type=int, default=0, help="processes drawing case-days (default: one per core)")
    args = ap.parse_args(argv)
    print(make_demo_data(args.out, args.seed, size=args.size, workers=args.workers or os.cpu_count() or 1))


if __name__ == "__main__":
    sys.exit(main())
