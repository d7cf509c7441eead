"""One Markdown row per run, to compare models on one table.

    giseg compare runs/*

Columns: run, model, parameters, epochs run, per-class and mean Dice of the best evaluation (per slice, the run's
--empty_dice rule), the competition score when the run has val_scores.json (trainer.py --final_eval or giseg score
--json into the run folder), and the median training images/s from its log.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from giseg.evaluation.compare import NotComparable, markdown, run_folders, summarise_run
from giseg.utils.errors import UserError
from giseg.utils.exits import command


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (output_dir of trainer.py); a giseg cv folder stands for its "
                                            "fold runs (and its final model)")
    return ap


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = []
    for folder in (run for given in args.runs for run in run_folders(Path(given))):
        try:
            rows.append(summarise_run(folder))
        except NotComparable as e:
            print(f"left out {folder}: {e}", file=sys.stderr)
    if not rows:
        raise UserError("none of the given folders is a run with an evaluation (run_config.json + metrics.jsonl + "
                        "best/)")
    print(markdown(rows))
    return 0
