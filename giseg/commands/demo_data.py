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

import argparse
import os

from giseg.data.demo import ANATOMIES, SIZES, SLICES_PER_DAY, make_demo_data
from giseg.data.lgg import make_lgg_demo
from giseg.utils import command


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="giseg demo-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="gi", choices=("gi", "lgg"),
                    help="gi: the Kaggle GI-tract layout (default); lgg: the LGG kaggle_3m layout (5 patients)")
    ap.add_argument("--out", default=None, help="folder to write (default: demo/data; demo/lgg for --dataset lgg)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    ap.add_argument("--size", default="demo", choices=tuple(SIZES),
                    help="demo (360 slices, default), 10x (2,256 slices of the competition's mix) or full (the "
                         "competition's shape: 38,496 slices of 274 case-days, 85 cases)")
    ap.add_argument("--workers", type=int, default=0, help="processes drawing case-days (default: one per core)")
    ap.add_argument("--anatomy", default=None, choices=ANATOMIES,
                    help="real: organs of the real data's size, organ-free volume ends (default for the demo); large: "
                         "organs 3-5x larger on almost every slice (default for 10x and full)")
    ap.add_argument("--slices_per_day", type=int, default=SLICES_PER_DAY,
                    help=f"slices per case-day of the demo (default {SLICES_PER_DAY})")
    return ap


@command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.dataset == "lgg":
        print(make_lgg_demo(args.out or "demo/lgg"))
        return
    print(make_demo_data(args.out or "demo/data", args.seed, args.slices_per_day, size=args.size,
                         workers=args.workers or os.cpu_count() or 1, anatomy=args.anatomy))
