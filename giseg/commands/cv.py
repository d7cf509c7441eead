"""Cross-validation: `giseg cv` (the folds, the CV table and the out-of-fold figures: giseg/training/cv.py)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from giseg.commands.options import RunOptions, check_run_options, parse_weights
from giseg.data.folds import data_record
from giseg.data.hf.options import dataset_options
from giseg.training import cv
from giseg.training.cv import FoldRunner, check_cv_reuse, cv_identity, fold_command, gpu_groups, parse_folds, run_in_slots
from giseg.training.launch import physical_gpus
from giseg.utils.claims import claim_output_dir
from giseg.utils.errors import UserError
from giseg.utils.exits import command, stop_on_signals
from giseg.utils.files import atomic_write_json, atomic_write_text
from giseg.utils.log import logger, setup_logging
from giseg.utils.options import add_options


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg cv", description=cv.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", required=True, help="the CV's folder: fold_<k>/, cv_table.md, cv_scores.json")
    ap.add_argument("--folds", default="all", help="'all' or comma-separated folds (default all)")
    ap.add_argument("--parallel", type=int, default=1, help="folds trained at the same time (default 1: one by one)")
    ap.add_argument("--gpus", default=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                    help="GPU ids shared out among the --parallel folds, e.g. 0,1,2,3 (default: CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--launcher", default="",
                    help="command that starts `-m giseg train ...` for a fold (default: python, or accelerate launch "
                         "--multi_gpu with one process per GPU of the fold's group)")
    ap.add_argument("--final_model", action="store_true",
                    help="after the folds, train output_dir/final on every case (no validation set)")
    ap.add_argument("--ensemble", nargs="+", default=None,
                    help="no training: score the out-of-fold ensemble of these finished CV folders")
    ap.add_argument("--data_dir", default=None, help="--ensemble: the data the CVs were trained on")
    ap.add_argument("--preset", default=None, choices=sorted(CV_PRESETS), metavar="{" + ",".join(CV_PRESETS) + "}",
                    help="a recipe around the folds, chosen on the hard demo's ablation (docs/hard-demo.md): "
                    + "; ".join(f"{name} = {p.note}" for name, p in CV_PRESETS.items())
                    + ". The folds go to output_dir/first (and output_dir/second), the tuned decisions to "
                    "output_dir/tuned.json, and the log ends with the giseg predict command that uses them")
    ap.add_argument("--second_model", default=None,
                    help="--preset: the second family's --base_model (hub id or folder, e.g. "
                         "openmmlab/upernet-convnext-small), trained with the same flags")
    add_options(ap.add_argument_group("--ensemble: how the CVs' models run"), RunOptions)
    return ap


@dataclass(frozen=True)
class CvPreset:
    """What giseg cv --preset runs around the folds of --base_model."""
    second_family: bool  # the folds of --second_model too, with the same flags, ensembled fold by fold
    tune: str  # giseg tune --cv's --search over the CV(s), out of fold (empty: none)
    note: str


# each choice justified by its row of the hard demo's ablation (benchmarks/hard_ablation.py, docs/hard-demo.md)
CV_PRESETS = {"competition": CvPreset(
    True, "thresholds,gates,postprocess",
    "the trainer's own defaults (no trained technique beat the baseline beyond one sd there), the folds of a second "
    "family, and the two families' ensemble with its thresholds, gates and post-processing tuned out of fold")}


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def score_cv_ensemble(args) -> None:
    """--ensemble: the out-of-fold score of finished CVs' models together, with no training."""
    from giseg.evaluation.cv_scores import score_ensemble  # torch (2 s): not for --help

    if not args.data_dir:
        raise UserError("--ensemble needs --data_dir (the data the CVs were trained on)")
    setup_logging(True)
    check_run_options(args)
    claim_output_dir(args.output_dir, "--output_dir", "cv", {"--data_dir": args.data_dir,
                                                              **{f"--ensemble {d}": d for d in args.ensemble}},
                     ours=lambda p: (p / "ensemble_scores.json").is_file())
    score_ensemble([Path(d) for d in args.ensemble], args.data_dir, Path(args.output_dir),
                   parse_weights(args.weights, len(args.ensemble)), args.cache_dir, args.num_workers,
                   args.batch_size, args.mixed_precision, args.allow_bin)


def report(cv_dir: Path, folds: list[int], cfg, adapter, index) -> None:
    """The CV table (cv_table.md, cv_scores.json) and its lines in the log."""
    from giseg.evaluation.cv_scores import cv_table, fold_figures, presence_out_of_fold, score_out_of_fold  # torch
    from giseg.models.tasks import get_task  # (beside it: torch)

    rows = fold_figures(cv_dir, folds)
    every = folds == list(range(cfg.n_folds))
    presence = not get_task(cfg.task).segments
    if presence:  # slice classifiers: AUC / F1 / empty slices, out of fold from val_presence.csv
        oof = presence_out_of_fold(cv_dir, folds, adapter.classes) if every else None
    else:
        oof = score_out_of_fold(cv_dir, folds, index, adapter, cfg.empty_dice) if every else None
    summary, table = cv_table(rows, adapter.classes, oof, cfg.task)
    atomic_write_json(cv_dir / "cv_scores.json", {**summary, "empty_dice": cfg.empty_dice})
    atomic_write_text(cv_dir / "cv_table.md", table + "\n")
    for line in table.splitlines():
        logger.info("cv %s", line)  # (a Markdown row: "cv | fold | ...")
    mean, sd = summary["mean"], summary["sd"]
    folds = f"{len(rows)} fold{'' if len(rows) == 1 else 's'}"  # ("over 1 folds" was the log's)
    if presence:
        logger.info("cv: mean AUC %.4f ± %.4f, empty slices called empty %.4f ± %.4f over %s -> %s",
                    mean["auc_mean"], sd["auc_mean"], mean["empty_correct"], sd["empty_correct"], folds,
                    cv_dir / "cv_table.md")
    else:
        logger.info("cv: score %.4f ± %.4f, mean Dice %.4f ± %.4f over %s -> %s", mean["score"], sd["score"],
                    mean["dice_mean"], sd["dice_mean"], folds, cv_dir / "cv_table.md")


def parse_trainer_args(trainer_args: list[str]):
    """giseg train's settings for every fold, validated as giseg train validates them."""
    from giseg.training.config import parse_config, validate_config  # torch (2 s): not for --help

    forbidden = [a for a in trainer_args if a.split("=")[0] in ("--fold", "--output_dir")]
    if forbidden:
        raise UserError(f"{forbidden[0]}: giseg cv sets each fold's --fold and --output_dir itself; pass --folds and "
                        "--output_dir before the --")
    cfg = parse_config(trainer_args)
    validate_config(cfg)
    return cfg


@command
def main(argv: list[str] | None = None) -> int:
    own, trainer_args = split_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    if args.ensemble and args.preset:
        raise UserError("--ensemble scores finished CVs and --preset trains them: pass one of the two")
    if args.ensemble:
        score_cv_ensemble(args)
        return 0
    if args.preset:
        return run_preset(args, trainer_args)
    if args.second_model:
        raise UserError("--second_model goes with --preset (the second family of its recipe)")
    train_cv(args, trainer_args)
    return 0


def run_preset(args, trainer_args: list[str]) -> int:
    """--preset: the folds of --base_model (and of --second_model) under output_dir/first and /second, then giseg
    tune --cv over them out of fold into output_dir/tuned.json; a rerun resumes (finished folds are kept)."""
    from giseg.commands import tune  # (torch, 2 s: not for --help)

    preset = CV_PRESETS[args.preset]
    if preset.second_family and not args.second_model:
        raise UserError(f"--preset {args.preset} needs --second_model: the second family's --base_model (hub id or "
                        "folder, e.g. openmmlab/upernet-convnext-small)")
    cfg = parse_trainer_args(trainer_args)
    out = claim_output_dir(args.output_dir, "--output_dir", "cv --preset", {"--data_dir": cfg.data_dir},
                           ours=lambda p: (p / "preset.json").is_file())
    atomic_write_json(out / "preset.json", {"preset": args.preset, "second_model": args.second_model,
                                            "trainer_args": trainer_args})
    cvs = [out / "first"] + ([out / "second"] if preset.second_family else [])
    for folder, extra in zip(cvs, ([], ["--base_model", str(args.second_model)])):
        args.output_dir = str(folder)
        train_cv(args, trainer_args + extra)  # (a later --base_model wins)
    tuned = []
    if preset.tune:
        tuned = ["--tuned", str(out / "tuned.json")]
        status = tune.main(["--cv", *map(str, cvs), "--data_dir", cfg.data_dir, "--search", preset.tune,
                            "--out", tuned[1], "--cache_dir", cfg.cache_dir, "--num_workers", str(cfg.num_workers)])
        if status:
            return status
    models = " ".join(str(c / "fold_*" / "best") for c in cvs)
    setup_logging(True, out / "preset.log")
    logger.info("--preset %s: done; predict with: giseg predict --model %s %s--data_dir <test data> --out <file>",
                args.preset, models, " ".join(tuned) + " " if tuned else "")
    return 0


def train_cv(args, trainer_args: list[str]) -> None:
    """The folds of one model into args.output_dir, then the CV table (and --final_model)."""
    cfg = parse_trainer_args(trainer_args)
    folds = parse_folds(args.folds, cfg.n_folds)
    if args.parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {args.parallel}")
    groups = gpu_groups(args.gpus, args.parallel, physical_gpus() if args.gpus else None)
    cv_dir = claim_output_dir(args.output_dir, "--output_dir", "cv",
                              {"--data_dir": cfg.data_dir, "--base_model": cfg.base_model},
                              ours=lambda p: (p / "cv_config.json").is_file())
    from giseg.data.registry import get_adapter  # the adapters import torch (1 s): not for --help

    adapter = get_adapter(cfg.dataset).bind(cfg.data_dir, dataset_options(cfg))
    index = adapter.build_index(cfg.data_dir)  # (also what the out-of-fold row is scored against)
    identity, data = cv_identity(cfg), data_record(index)
    check_cv_reuse(cv_dir, identity, data, cfg)  # another CV's folds are never reported as this one's
    setup_logging(True, cv_dir / "cv.log")
    logger.info("cross-validation of %s on %s: folds %s of %d (split seed %d) in %s", cfg.base_model, cfg.data_dir,
                ",".join(map(str, folds)), cfg.n_folds, cfg.split_seed, cv_dir)
    atomic_write_json(cv_dir / "cv_config.json", {"folds": folds, "n_folds": cfg.n_folds, "trainer_args": trainer_args,
                                                  "parallel": args.parallel, "final_model": args.final_model,
                                                  "identity": identity, "data": data})
    todo = [k for k in folds if not (cv_dir / f"fold_{k}" / "val_scores.json").is_file()]
    for k in sorted(set(folds) - set(todo)):
        logger.info("fold %d: finished before (val_scores.json, same settings and data), kept", k)
    runner = FoldRunner()

    def train_fold(k: int, gpus: list[str]) -> None:
        out = cv_dir / f"fold_{k}"
        runner.run(fold_command(trainer_args, k, out, gpus, args.launcher), out, gpus, f"fold {k}")

    with stop_on_signals(runner.stop):  # SIGTERM / SIGINT: passed on to the trainers, which save and end
        run_in_slots(todo, groups, train_fold)
    report(cv_dir, folds, cfg, adapter, index)
    if args.final_model:
        out = cv_dir / "final"  # (a finished one is resumed at its last step: nothing to do)
        with stop_on_signals(runner.stop):
            runner.run(fold_command(trainer_args, None, out, groups[0], args.launcher), out, groups[0], "final model")
