"""Write the synthetic demo data: `giseg demo-data` (the generator and its layout: giseg/data/demo.py)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from giseg.data import demo
from giseg.data.demo import SIZES, SLICES_PER_DAY, make_demo_data
from giseg.data.demo_hard import HardKnobs, knob_help
from giseg.data.lgg import make_lgg_demo
from giseg.utils.claims import claim_output_dir
from giseg.utils.errors import UserError
from giseg.utils.exits import command


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg demo-data", description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="gi", choices=("gi", "lgg", "nnunet"),
                    help="gi: the Kaggle GI-tract layout (default); lgg: the LGG kaggle_3m layout (5 patients); "
                         "nnunet: the GI demo as an nnU-Net raw dataset (NIfTI volumes and dataset.json; the Kaggle "
                         "layout it is written from stays beside it, in <out>-kaggle)")
    ap.add_argument("--out", default=None, help="folder to write (default: demo/data; demo/lgg for --dataset lgg, "
                    "demo/nnunet for --dataset nnunet)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    ap.add_argument("--size", default="demo", choices=tuple(SIZES),
                    help="demo (360 slices, default), 10x (2,256 slices of the competition's mix) or full (the "
                         "competition's shape: 38,496 slices of 274 case-days, 85 cases)")
    ap.add_argument("--workers", type=int, default=0, help="processes drawing case-days (default: one per core)")
    ap.add_argument("--anatomy", default=None, choices=("real", "large"),
                    help="real: organs of the real data's size, organ-free volume ends (default for the demo); large: "
                         "organs 3-5x larger on almost every slice (default for 10x and full)")
    ap.add_argument("--difficulty", default="default", choices=("default", "hard"),
                    help="default: the demo as it is (every recipe scores 0.95-0.97 there); hard: the real data's "
                         "organ sizes and what makes its scans hard (overlapping intensities, bias field, Rician "
                         "noise, thin small-bowel loops across slices, motion, partial volume, days that differ, "
                         "organ-like tissue), each a knob (--hard_knobs): the demo that ranks techniques "
                         "(docs/hard-demo.md)")
    ap.add_argument("--hard_knobs", default="", metavar="NAME=VALUE,...",
                    help="with --difficulty hard: knobs to change, e.g. noise=0,motion=1 (0 turns one off). "
                         + knob_help())
    ap.add_argument("--slices_per_day", type=int, default=SLICES_PER_DAY,
                    help=f"slices per case-day of the demo (default {SLICES_PER_DAY})")
    return ap


@command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    knobs = None
    if args.difficulty == "hard":
        if args.anatomy not in (None, "hard") or args.dataset == "lgg":
            raise UserError(f"--difficulty hard draws the real data's organ sizes: not with "
                            f"{'--dataset lgg' if args.dataset == 'lgg' else f'--anatomy {args.anatomy}'}")
        try:
            knobs = HardKnobs.parse(args.hard_knobs)
        except ValueError as e:
            raise UserError(f"--hard_knobs: {e}") from None
        args.anatomy = "hard"
    elif args.hard_knobs:
        raise UserError("--hard_knobs is for --difficulty hard")
    out = args.out or {"lgg": "demo/lgg", "nnunet": "demo/nnunet"}.get(args.dataset, "demo/data")
    # a folder of other files is refused (the demo's scans would land among them); an earlier demo is kept as it is
    claim_output_dir(out, "--out", "demo-data", ours=lambda p: (p / "train.csv").is_file() or any(
        p.glob("*/*_mask.tif")) or (p / "dataset.json").is_file())
    if args.dataset == "lgg":
        print(make_lgg_demo(out))
        return
    if args.dataset == "nnunet":
        from giseg.data.gi import GIAdapter  # the data layer imports torch (1 s): not for --help
        from giseg.data.nnunet.dataset_json import DATASET_JSON
        from giseg.data.nnunet.export import export_nnunet

        kaggle = f"{str(out).rstrip('/')}-kaggle"
        claim_output_dir(kaggle, "--out", "demo-data", ours=lambda p: (p / "train.csv").is_file())
        make_demo_data(kaggle, args.seed, args.slices_per_day, size=args.size,
                       workers=args.workers or os.cpu_count() or 1, anatomy=args.anatomy, knobs=knobs)
        if not (Path(out) / DATASET_JSON).is_file():
            export_nnunet(GIAdapter(), kaggle, out)
        print(out)
        return
    print(make_demo_data(out, args.seed, args.slices_per_day, size=args.size,
                         workers=args.workers or os.cpu_count() or 1, anatomy=args.anatomy, knobs=knobs))
