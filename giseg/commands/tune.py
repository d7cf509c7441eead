"""Tune thresholds, gates and post-processing: `giseg tune` (the search: giseg/evaluation/tuning.py)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from giseg.commands.options import RunOptions, ScoringOptions, check_run_options, parse_weights
from giseg.data.folds import split_by_case
from giseg.data.registry import get_adapter
from giseg.data.volumes import check_volume_sizes
from giseg.evaluation import tuning
from giseg.evaluation.tuning import (
    SEARCH,
    Tuner,
    as_spec_values,
    blend_volumes,
    choose_blend,
    collect_volumes,
    cv_folds,
    report_markdown,
    start_decisions,
)
from giseg.inference.ensemble import Ensemble
from giseg.inference.gate import SliceGate
from giseg.inference.spec import SPEC_FILE, InferenceSpec
from giseg.utils.claims import claim_output_file, starts_with
from giseg.utils.errors import UserError
from giseg.utils.exits import command
from giseg.utils.files import atomic_write_json, atomic_write_text, json_text, write_beside
from giseg.utils.log import logger, quiet_third_party, setup_logging
from giseg.utils.options import add_options, check_options


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg tune", description=tuning.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", nargs="+", help="a model folder (runs/<name>/best), or several: an ensemble")
    who.add_argument("--cv", nargs="+", help="a giseg cv run folder: every fold's best/ on its own validation cases (out "
                                             "of fold); several: their fold-by-fold ensemble (needs --out)")
    ap.add_argument("--data_dir", required=True, help="the data the models were trained on (their folds are inside)")
    ap.add_argument("--gate_model", nargs="+", default=None,
                    help="slice classifiers (trainer.py --task presence) to gate with: with --model, classifier folders "
                         "trained on the segmenter's split; with --cv, classifier CV folders (fold k gates fold k). The "
                         "gate's per-class threshold and minimum pixel count are searched (step slice_gate) and kept "
                         "only where the score rises")
    ap.add_argument("--out", default=None,
                    help="write the tuned values here (JSON for giseg predict --tuned) instead of into the model specs; "
                         "needed for an ensemble")
    ap.add_argument("--search", default=",".join(SEARCH),
                    help=f"which steps to search, comma-separated (default {','.join(SEARCH)}); the others stay "
                         "untuned (e.g. thresholds,gates: no post-processing)")
    add_options(ap, RunOptions)
    add_options(ap, ScoringOptions)
    return ap


def save_tuned_specs(folders: list[Path], values: dict) -> None:
    """The tuned values into every model's spec, all or none: each new spec is written to a temporary file beside
    its folder's first (where a full disk or a permission fails, with nothing replaced yet), then all are renamed
    into place (renames need no space). A failure removes the temporary files and leaves every spec as it was."""
    staged = []
    try:
        for folder in folders:
            tuned = dataclasses.replace(InferenceSpec.load(folder), **values)
            final = Path(folder) / SPEC_FILE
            staged.append((write_beside(final, json_text(dataclasses.asdict(tuned))), final))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)


def is_tune_report(path: Path) -> bool:
    try:
        return "decisions" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_tune_outputs(args) -> None:
    """--out (and its .md) may replace an earlier tune's report, never another file or an input."""
    if args.out:
        inputs = {"--data_dir": args.data_dir, **{f"--model {m}": m for m in args.model or args.cv}}
        for path in (Path(args.out), Path(args.out).with_suffix(".md")):
            claim_output_file(path, "--out", inputs, ours=is_tune_report if path.suffix == ".json"
                              else starts_with("# Tuning on "))


def gate_groups(args, n_groups: int, device) -> list:
    """The SliceGate of each group of models (None each without --gate_model): with --model the classifiers given;
    with --cv, fold k's classifiers of every classifier CV, for fold k's segmenters."""
    if not args.gate_model:
        return [None] * n_groups
    if not args.cv:
        return [SliceGate.load(args.gate_model, device, args.allow_bin)]
    per_cv = [cv_folds(Path(c)) for c in args.gate_model]
    seg_folds = [f.parent.name for f in cv_folds(Path(args.cv[0]))]
    for c, folds in zip(args.gate_model, per_cv):
        if [f.parent.name for f in folds] != seg_folds:
            raise UserError(f"--gate_model {c}: holds folds {[f.parent.name for f in folds]}, --cv {args.cv[0]} holds "
                            f"{seg_folds}; with --cv, pass classifier CV folders with the same folds")
    return [SliceGate.load(list(g), device, args.allow_bin) for g in zip(*per_cv)]


def parse_search(args) -> tuple[str, ...]:
    """--search as its steps, checked before any model predicts (slice_gate left out without --gate_model)."""
    search = tuple(s for s in args.search.split(",") if s)
    if not search or set(search) - set(SEARCH):
        raise UserError(f"--search takes steps of {SEARCH}, comma-separated; got {args.search!r}")
    if not args.gate_model:  # (the slice gate needs classifiers)
        search = tuple(s for s in search if s != "slice_gate")
    return search


def model_groups(args) -> tuple[list[Path], list[list[Path]]]:
    """(every model folder, the groups that predict together): fold k's models of every --cv, or the --model(s)."""
    if not args.cv:
        folders = [Path(m) for m in args.model]
        if len(folders) > 1 and not args.out:
            raise UserError("tuning an ensemble needs --out <file.json> (its members' own specs stay as they are); "
                            "giseg predict --tuned <file.json> then uses it")
        return folders, [folders]
    per_cv = [cv_folds(Path(c)) for c in args.cv]
    folds = [[f.parent.name for f in fs] for fs in per_cv]
    if any(f != folds[0] for f in folds):
        raise UserError(f"--cv: the folders hold different folds ({folds}); an ensemble needs the same ones")
    groups = [list(g) for g in zip(*per_cv)]  # fold k's model(s) predict fold k's validation cases
    if len(per_cv) > 1 and not args.out:
        raise UserError("tuning an ensemble of several CVs needs --out <file.json>; giseg predict --tuned uses it")
    return [f for g in groups for f in g], groups


def check_gate_split(gate, model, folder: Path) -> None:
    """A gate's classifiers must not have trained on the cases the segmenter is tuned on."""
    for name, m in zip(gate.names, gate.members):
        if m.spec.split != model.spec.split:
            raise UserError(f"--gate_model {name}: trained on split {m.spec.split}, but {folder} is tuned on the "
                            f"validation cases of {model.spec.split}; a classifier that trained on them would gate "
                            "too well. Train it with the segmenter's --fold, --n_folds and --split_seed (giseg cv "
                            "--task presence for a CV)")


def validation_volumes(args, groups, gates, weights, device) -> tuple[list, object]:
    """(each group's predictions of its validation cases, as volumes; the spec of the first group)."""
    volumes, spec, adapter, index = [], None, None, None
    for group, gate in zip(groups, gates):
        model = Ensemble.load(group, device, weights, args.allow_bin)
        if spec is None:
            spec = model.spec
            adapter = get_adapter(spec.dataset, f"--model {group[0]}").bind(args.data_dir, spec.dataset_options or {},
                                                                            spec.classes)
            index = adapter.build_index(args.data_dir)
            if "postprocess" in args.search.split(","):  # 3D components: a volume's slices must stack
                check_volume_sizes(index, adapter.volume_columns,
                                   f"{args.data_dir} (post-processing is tuned on whole volumes; --search "
                                   "thresholds,gates leaves it out)")
        splits = {json.dumps(m.spec.split, sort_keys=True) for m in model.members}
        if len(splits) > 1 or model.spec.split is None:
            raise UserError(f"--model {group[0]}: the members must share a known training split to be tuned on its "
                            f"validation cases, got {sorted(splits)}")
        s = model.spec.split
        _, rows = split_by_case(index, s["fold"], s["n_folds"], s["split_seed"])
        logger.info("predicting %d validation slices (fold %d/%d) with %s", len(rows), s["fold"], s["n_folds"],
                    ", ".join(map(str, group)))
        if gate is not None:  # (collect_volumes checks that it fits the segmenter)
            check_gate_split(gate, model, group[0])
        volumes += collect_volumes(model, adapter, index, rows, args.cache_dir, args.batch_size, args.mixed_precision,
                                   args.num_workers, gate)
    return volumes, spec


def blended_volumes(args, groups, gates, deep: list[bool], device) -> tuple[list, object, list[float], dict]:
    """An ensemble of 2D and 3D members: each kind's predictions of the validation cases, blended with the 2D share
    that scores best out of fold (evaluation/tuning.py BLEND, from the UW-Madison winner's 0.6). Returns (volumes,
    spec, the members' weights, the blend's record)."""
    pick = lambda want: [[f for f, d in zip(g, deep) if d == want] for g in groups]  # noqa: E731
    flat, spec = validation_volumes(args, pick(False), gates, None, device)
    volumes3d, _ = validation_volumes(args, pick(True), gates, None, device)
    share, scores = choose_blend(flat, volumes3d, spec, args.empty_dice, args.workers or os.cpu_count() or 1)
    logger.info("blend of the 2D and the 3D members (untuned decisions, out of fold): 2D share %g (%s)", share,
                ", ".join(f"{k:g}: score {v:.4f}" for k, v in scores.items()))
    n3d = sum(deep)
    weights = [(1 - share) / n3d if d else share / (len(deep) - n3d) for d in deep]
    return blend_volumes(flat, volumes3d, share, spec.task), spec, weights, {
        "share_2d": share, "scores": {f"{k:g}": v for k, v in scores.items()}}


def tune(args) -> dict:
    check_run_options(args)
    check_options(args, ScoringOptions)
    check_tune_outputs(args)
    search = parse_search(args)
    folders, groups = model_groups(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gates = gate_groups(args, len(groups), device)
    weights = parse_weights(args.weights, len(groups[0])) if args.weights else None
    deep = [bool(InferenceSpec.load(f).patch_size) for f in groups[0]]  # 3D members (per position in a group)
    blend = None
    if "blend" in search and weights is None and any(deep) and not all(deep):
        volumes, spec, weights, blend = blended_volumes(args, groups, gates, deep, device)
    else:
        volumes, spec = validation_volumes(args, groups, gates, weights, device)
    tuner = Tuner(volumes, spec.task, spec.classes, args.empty_dice, args.workers or os.cpu_count() or 1, search)
    chosen, before, after = tuner.search(start_decisions(spec))
    values = as_spec_values(chosen, spec.task, gated=bool(args.gate_model))
    source = (f"out-of-fold validation of {', '.join(args.cv)}" if args.cv else
              f"validation of {', '.join(map(str, folders))}")
    report = {"source": source, "models": [str(f) for f in folders], "weights": weights, "blend": blend,
              "decisions": values,
              "gate_models": args.gate_model, "search": list(search), "before": before, "after": after,
              "candidates_scored": tuner.evaluated, "empty_dice": args.empty_dice}
    if args.out:
        out = Path(args.out)
        atomic_write_json(out, report)
        atomic_write_text(out.with_suffix(".md"), report_markdown(spec.classes, chosen, before, after, spec.task, source))
    else:
        save_tuned_specs(folders, values)
        where = Path(args.cv[0]) if args.cv else folders[0].parent
        atomic_write_json(where / "tuning.json", report)
        atomic_write_text(where / "tuning.md", report_markdown(spec.classes, chosen, before, after, spec.task, source))
    logger.info("tuned on %d slices in %d volumes (%d candidates scored): score %.4f -> %.4f, mean Dice %.4f -> %.4f, "
                "Hausdorff %.4f -> %.4f; saved in %s", before["n_slices"], before["n_volumes"], tuner.evaluated,
                before["score"], after["score"], before["dice_mean"], after["dice_mean"], before["hausdorff"],
                after["hausdorff"], args.out or ", ".join(f"{f}/inference_spec.json" for f in folders))
    return report


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(True)
    quiet_third_party()
    tune(args)
    return 0
