"""Score a submission: `giseg score` (the figures: giseg/evaluation/score.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from giseg.commands.options import ScoringOptions
from giseg.data.hf.options import HFOptions, dataset_options
from giseg.data.registry import DATASETS, datasets_help, get_adapter
from giseg.evaluation import score
from giseg.evaluation.score import format_table, read_submission, score_predictions
from giseg.utils.claims import claim_output_file
from giseg.utils.exits import command
from giseg.utils.files import atomic_write_json
from giseg.utils.options import add_options, check_options


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg score", description=score.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pred", required=True, help="submission CSV: id,class,predicted")
    ap.add_argument("--data_dir", required=True, help="folder with train.csv and the scans (for sizes)")
    ap.add_argument("--json", default=None, help="also write the figures here (stable key names)")
    ap.add_argument("--dataset", default="gi", choices=tuple(DATASETS),
                    help="the data folder's layout (default gi): " + datasets_help())
    ap.add_argument("--time_saved_threshold", type=float, default=0.9,
                    help="Dice a slice must reach to count as 'no redraw needed' (default 0.9)")
    ap.add_argument("--hausdorff_mm", action="store_true",
                    help="also the 3D Hausdorff distance in millimetres per class (volumes where both the prediction "
                         "and the truth show the class), for data with its voxel spacing (--dataset nnunet)")
    add_options(ap, ScoringOptions)
    add_options(ap, HFOptions)
    return ap


def is_score_json(path: Path) -> bool:
    """ours() for --json: the figures an earlier giseg score wrote (a JSON object with its keys)."""
    try:
        figures = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(figures, dict) and {"score", "dice_mean", "per_case", "empty_dice"} <= set(figures)


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_options(args, ScoringOptions)
    if args.json:  # (an earlier score's figures are replaced; another file, or an input, never)
        claim_output_file(args.json, "--json", {"--pred": args.pred, "--data_dir": args.data_dir}, ours=is_score_json)
    adapter = get_adapter(args.dataset).bind(args.data_dir, dataset_options(args))
    index = adapter.build_index(args.data_dir)
    overall, per_case = score_predictions(adapter, index, read_submission(args.pred, adapter.classes), args.empty_dice,
                                          args.time_saved_threshold, source=args.pred, workers=args.workers or None,
                                          in_mm=args.hausdorff_mm)
    print(format_table(overall, per_case, adapter.classes))
    print(f"\nscore {overall['score']:.4f} = 0.4 * dice_mean {overall['dice_mean']:.4f} + 0.6 * (1 - hausdorff "
          f"{overall['hausdorff']:.4f}); per-slice Dice at each scan's original size, empty/empty Dice rule: "
          f"{args.empty_dice}")
    if args.hausdorff_mm:
        print(f"3D Hausdorff in mm over the {overall['hausdorff_mm_pairs']} volume-class pairs that both show: mean "
              f"{overall['hausdorff_mm']:.2f}; " + ", ".join(f"{c} {overall[f'hausdorff_mm_{c}']:.2f}"
                                                          for c in adapter.classes))
    if args.json:
        atomic_write_json(args.json, {**overall, "per_case": per_case.to_dict("records"),
                                      "empty_dice": args.empty_dice, "time_saved_threshold": args.time_saved_threshold})
    return 0
