"""Where a model's per-slice Dice is lost, per class: organ-free slices given pixels (false alarms), and slices
that show the organ, split by the size of its section. For the stomach at the end of a run (issue #41).

    python benchmarks/slice_errors.py --run runs/<name>                 # its best/ and last/ on its validation fold
    python benchmarks/slice_errors.py --run runs/<name> --models best   # one of them

The trainer's own evaluation (giseg/evaluation/validation.py): the run's decode-once cache at its training size,
the model's masks through the Segmenter, empty/empty = 1. Per class and model: the per-slice Dice; the share of
organ-free slices that get a mask (each scores 0 instead of 1) and their median predicted pixels; on slices that
show the organ, the mean Dice of small sections (under --small pixels at the training size) and of the others; the
mean of the scan (as the model sees it, each slice scaled to [0, 1] by its own percentiles) under the false masks
and under the class's true sections.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def slice_stats(model_dir: Path, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, 3) |P∩T|, |P|, |T| of the run's validation slices at its training size, and (N, C, 2) the sums of
    the scan (as the model sees it: each slice scaled to [0, 1] on its own) under P and under T."""
    from giseg.data.cache import build_cache
    from giseg.data.folds import split_by_case
    from giseg.data.masks import unpack_targets
    from giseg.data.registry import get_adapter
    from giseg.data.volumes import neighbour_table
    from giseg.evaluation.metrics import mask_stats
    from giseg.inference.segmenter import Segmenter

    import torch

    seg = Segmenter.load(model_dir)
    adapter = get_adapter(cfg["dataset"])
    index = adapter.build_index(cfg["data_dir"])
    _, rows = split_by_case(index, cfg["fold"], cfg["n_folds"], cfg["split_seed"])
    cache = build_cache(adapter, index, seg.spec.image_size, cfg["cache_dir"], crop_margin=seg.spec.crop())
    nb = neighbour_table(index, seg.spec.context_slices, seg.spec.context_stride, adapter.volume_columns)
    out, light = [], []
    with torch.no_grad():
        for r, logits in seg._iter_logits(index, rows, cache, nb, 16, "no", False, 0):
            masks = seg.masks(logits, (seg.spec.image_size,) * 2)
            truth = unpack_targets(torch.from_numpy(np.array(cache.masks[r:r + 1])), len(seg.spec.classes)).bool()
            out.append(mask_stats(masks, truth)[0].numpy())
            scan = torch.from_numpy(np.asarray(cache.images[r], dtype=np.float32))
            light.append(torch.stack([(masks[0] * scan).sum((-2, -1)), (truth[0] * scan).sum((-2, -1))], -1).numpy())
    return np.stack(out), np.stack(light)


def describe(stats: np.ndarray, light: np.ndarray, classes: tuple[str, ...], small: int) -> list[str]:
    rows = []
    for c, name in enumerate(classes):
        inter, pred, true = stats[:, c, 0], stats[:, c, 1], stats[:, c, 2]
        dice = np.where(pred + true > 0, 2 * inter / np.maximum(pred + true, 1), 1.0)
        empty, shown = true == 0, true > 0
        alarms = empty & (pred > 0)
        few = shown & (true < small)
        rows.append(f"| {name} | {dice.mean():.4f} | {alarms.sum()}/{empty.sum()} "
                    f"({np.median(pred[alarms]) if alarms.any() else 0:.0f} px) | "
                    f"{dice[few].mean() if few.any() else float('nan'):.4f} ({few.sum()}) | "
                    f"{dice[shown & ~few].mean() if (shown & ~few).any() else float('nan'):.4f} "
                    f"({(shown & ~few).sum()}) | {light[alarms, c, 0].sum() / max(1, pred[alarms].sum()):.2f} | "
                    f"{light[:, c, 1].sum() / max(1, true.sum()):.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a giseg train output folder")
    ap.add_argument("--models", default="best,last", help="its model folders to look at (default best,last)")
    ap.add_argument("--small", type=int, default=200, help="a section under this many pixels is small (default 200)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = Path(args.run)
    cfg = json.loads((run / "run_config.json").read_text())
    print(f"\nPer-slice errors of {run} (validation fold {cfg['fold']}/{cfg['n_folds']}, at the training size)\n")
    print("| model | class | per-slice Dice | organ-free slices given a mask (median pixels) | Dice of small "
          f"sections (< {args.small} px) (slices) | Dice of the other sections (slices) | scan under the false "
          "masks | scan under the class |\n" + "|" + " --- |" * 8)
    from giseg.inference.spec import InferenceSpec

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {"best": max(records, key=lambda r: r["dice_mean"])["step"], "last": records[-1]["step"]}
    for name in args.models.split(","):
        classes = InferenceSpec.load(run / name).classes
        for line in describe(*slice_stats(run / name, cfg), classes, args.small):
            print(f"| {name} (step {steps.get(name, '?')}) " + line)
    command = "python benchmarks/slice_errors.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\ncommand: {command.strip()}\nmachine: {platform.machine()}, {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
