"""Deterministic demo data in exactly the Kaggle UW-Madison GI-tract layout.

    <out>/train.csv                                   id,class,segmentation (3 rows per slice)
    <out>/train/case<N>/case<N>_day<D>/scans/slice_<SSSS>_<W>_<H>_<PX>_<PY>.png   (16-bit grayscale)

Each case-day is a short volume of contiguous slices of a synthetic abdomen: a body ellipse, a bright smooth
stomach, a dark striped C-shaped large bowel and speckled small-bowel loops (one loop overlaps the large
bowel, so some pixels carry two labels). Organs come and go along the slice axis, so the first and last
slices of every volume are empty. Scans come in three sizes, 266x266, 234x234 and 360 wide x 310 high.

    python demo_data.py --out demo/data
"""
from __future__ import annotations

import argparse
import sys
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
PIXEL_SPACING = {(266, 266): 1.50, (234, 234): 1.63, (360, 310): 1.50}


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


def make_demo_data(out_dir: str | Path, seed: int = 0, slices_per_day: int = SLICES_PER_DAY) -> Path:
    """Write the demo dataset to ``out_dir`` (skipped when its train.csv already exists); return the path."""
    out = Path(out_dir)
    if (out / "train.csv").exists():
        return out
    rows = ["id,class,segmentation"]
    for case, days, (w, h) in DEMO_CASES:
        for day in days:
            rng = np.random.default_rng([seed, case, day])
            anatomy = {"dy": rng.uniform(-0.04, 0.04), "dx": rng.uniform(-0.04, 0.04), "lb_gap": rng.uniform(-0.6, 0.6),
                       "sb_loops": [(0.13 * np.sin(0.5 + k * 2.1) + rng.uniform(-0.03, 0.03),
                                     0.15 * np.cos(0.5 + k * 2.1) + rng.uniform(-0.03, 0.03)) for k in range(3)]}
            anatomy["sb_loops"][0] = (0.22, -0.2)  # overlaps the large bowel tube
            scans = out / "train" / f"case{case}" / f"case{case}_day{day}" / "scans"
            scans.mkdir(parents=True, exist_ok=True)
            px = PIXEL_SPACING[(w, h)]
            for k in range(1, slices_per_day + 1):
                img, masks = _draw_slice(rng, (h, w), k / (slices_per_day + 1), anatomy)
                name = f"slice_{k:04d}_{w}_{h}_{px:.2f}_{px:.2f}.png"
                if not cv2.imwrite(str(scans / name), img):
                    raise OSError(f"could not write {scans / name}")
                sid = f"case{case}_day{day}_slice_{k:04d}"
                rows += [f"{sid},{c},{encode_rle(masks[c])}" for c in GI_CLASSES]
    atomic_write_text(out / "train.csv", "\n".join(rows) + "\n")  # written last: its presence marks a complete set
    return out


@command
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo/data", help="folder to write (default: demo/data)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = ap.parse_args(argv)
    print(make_demo_data(args.out, args.seed))


if __name__ == "__main__":
    sys.exit(main())
