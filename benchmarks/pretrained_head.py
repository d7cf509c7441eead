"""The head's prior init on a pretrained-size model at the pretrained-checkpoint defaults (lr 6e-5, cosine, weight
decay 0.01), several hundred steps: does --head_prior help, or hold back, a model whose encoder already knows
the images?

    python benchmarks/pretrained_head.py             # --head_prior 0.01 (the default) against 0
    python benchmarks/pretrained_head.py --smoke     # a few steps of each stage: checks the script runs

There is no network here, so no hub checkpoint: the script makes its own "pretrained" one. A SegFormer with the
sizes of nvidia/mit-b0 (SegformerConfig's defaults: 3.7 M parameters, 150 labels, random weights) is first trained
on the large-organ demo (multiclass, lr 2e-3, --pretrain_epochs); its best/ folder then stands for a hub
checkpoint: fine-tuned on the demo with the real data's organ sizes as a multilabel model, its 4-label head does
not fit and is re-initialised, as a hub model's 150-label head is, while its encoder starts trained. Each recipe
then runs --epochs with the trainer's defaults (only --image_size, --epochs, --seed and --head_prior given), over
--seeds x fold 0, and the table is learning_efficiency.py's (per-class Dice mean ± sd, runs off the floor, first
step off it).
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import learning_efficiency as le  # noqa: E402

RECIPES = {"head_prior 0.01 (default)": ["--head_prior", "0.01"], "head_prior 0": ["--head_prior", "0"]}
RUNNING = ["--n_folds", "5", "--num_workers", "0", "--log_every", "1000", "--save_total_limit", "1"]


def make_b0(out: Path) -> Path:
    """A random SegFormer of mit-b0's sizes with 150 labels, saved as a hub checkpoint is."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from giseg.models.families import FAMILY_STATS, make_image_processor
    from giseg.models.tiny import ADE_LIKE_LABELS

    if not (out / "config.json").exists():
        torch.manual_seed(0)
        config = SegformerConfig(id2label=ADE_LIKE_LABELS, label2id={v: k for k, v in ADE_LIKE_LABELS.items()})
        SegformerForSemanticSegmentation(config).save_pretrained(out)
        make_image_processor(512, *FAMILY_STATS["segformer"]).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="42,1", help="fine-tuning seeds (default 42,1)")
    ap.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default 10: 360 steps)")
    ap.add_argument("--pretrain_epochs", type=int, default=5, help="epochs of the stand-in pretraining (default 5)")
    ap.add_argument("--image_size", type=int, default=256, help="training size of both stages (default 256)")
    ap.add_argument("--margin", type=float, default=0.01, help="Dice above the floor that counts as off it")
    ap.add_argument("--work", default="bench-work/pretrained", help="data, models, cache and runs")
    ap.add_argument("--smoke", action="store_true", help="one seed, 3 steps per stage at 64 px: checks the script runs")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    epochs, pretrain_epochs = args.epochs, args.pretrain_epochs
    running = list(RUNNING)
    if args.smoke:
        seeds, epochs, pretrain_epochs, args.image_size = seeds[:1], 1, 1, 64
        running += ["--max_train_steps", "3"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    large, _ = le.prepare(work, "large")
    real, _ = le.prepare(work, "real")
    b0 = make_b0(work / "mit-b0-random")
    from giseg.data.gi import GI_CLASSES
    from giseg.utils.log import setup_logging

    start = time.perf_counter()
    size = ["--image_size", str(args.image_size)]
    pretrain = ["--task", "multiclass", "--epochs", str(pretrain_epochs), "--lr", "2e-3"]
    le.run_once(large, b0, work, pretrain, 0, 0, [*running, *size])
    setup_logging()
    pretrained = le.run_dir(work, pretrain, 0, 0) / "best"
    results, floor = {}, le.floors(real, 0, 5)
    for name, flags in RECIPES.items():
        runs = []
        for seed in seeds:
            curve = le.run_once(real, pretrained, work, [*flags, "--epochs", str(epochs)], seed, 0, [*running, *size])
            setup_logging()
            runs.append({"seed": seed, "fold": 0, "floors": floor, "curve": [
                {k: v for k, v in e.items() if k == "step" or k.startswith("dice_")} for e in curve]})
        results[name] = le.summarise(runs, GI_CLASSES, args.margin)
        steps = runs[0]["curve"][-1]["step"]
    wall = time.perf_counter() - start
    command = "python benchmarks/pretrained_head.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"\nPretrained-size head check: SegFormer of mit-b0's sizes, pretrained {pretrain_epochs} epochs on the "
          f"large demo (multiclass), fine-tuned on the real-size demo (multilabel: new head) with the trainer's "
          f"defaults, --image_size {args.image_size} --epochs {epochs} ({steps} steps); seeds {seeds} x fold 0\n")
    print(le.table(results, GI_CLASSES, len(seeds)))
    print(f"\ncommand: {command.strip()}\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{__import__('torch').get_num_threads()}; wall {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
