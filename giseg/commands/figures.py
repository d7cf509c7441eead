"""Figures of the data, the training and the predictions of a run (used by visualisation.ipynb).

    giseg figures --run_dir runs/<name> --out figures/        # every figure as a PNG, headless

Colours come from the dataset adapter (GI, as the reference report: large bowel red, small bowel green, stomach
blue). Every function takes the adapter of the data it draws, or reads it from the run.
"""
from __future__ import annotations

import argparse

from giseg.evaluation.figures import save_all
from giseg.utils.claims import claim_output_dir, hold_output
from giseg.utils.exits import command
from giseg.utils.log import quiet_third_party


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg figures", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_dir", required=True, help="a run folder (with run_config.json, metrics.jsonl, best/)")
    ap.add_argument("--out", default="figures", help="folder for the PNGs (default figures/)")
    ap.add_argument("--data_dir", default=None, help="data folder (default: the run's)")
    ap.add_argument("--max_slices", type=int, default=None, help="predict at most this many validation slices")
    return ap


@command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    claim_output_dir(args.out, "--out", "figures", {"--data_dir": args.data_dir},
                     ours=lambda p: all(f.suffix == ".png" for f in p.iterdir()))
    quiet_third_party()
    with hold_output(args.out, "--out"):  # (a second figures into the same --out is refused while this one draws)
        for path in save_all(args.run_dir, args.out, args.data_dir, args.max_slices):
            print(path)
