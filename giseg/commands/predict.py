"""Predict masks for every slice of a data folder and write a competition submission.

    giseg predict --model runs/<name>/best --data_dir <kaggle folder> --out submission.csv

Writes `id,class,predicted` (a row per slice and class, run-length codes at each scan's ORIGINAL size). The
model folder's inference spec says which dataset layout to read, and how the model sees its inputs (size,
normalisation, 2.5D) and turns outputs into masks (task, thresholds). GI folders: the train layout (masks
optional) and the test layout (no train.csv): --split picks the scans folder, by default `test/` when the folder
has one, else `train/`. --fold restricts to the model's validation fold (the split saved with the model; another
fold or split is refused, since its slices were trained on).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from giseg.commands.options import RunOptions, check_run_options, check_split, parse_thresholds, parse_weights
from giseg.data.folds import split_by_case
from giseg.data.registry import get_adapter
from giseg.data.volumes import check_volume_sizes
from giseg.evaluation.tuning import read_tuned
from giseg.inference.ensemble import Ensemble
from giseg.inference.segmenter import BACKENDS
from giseg.inference.submission import SUBMISSION_HEADER, predict_rows, write_submission
from giseg.utils import (
    UserError,
    add_options,
    claim_output_file,
    command,
    logger,
    quiet_third_party,
    setup_logging,
    starts_with,
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="giseg predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, nargs="+",
                    help="saved model folder (runs/<name>/best); several: an ensemble that averages their probabilities "
                         "(folds of a run, or different families; each sees its own image size, normalisation and "
                         "2.5D setting), turned into masks by the first one's thresholds, gates and post-processing")
    ap.add_argument("--data_dir", required=True, help="folder in the model's dataset layout (Kaggle folder, kaggle_3m)")
    ap.add_argument("--out", default="submission.csv", help="submission CSV to write (default submission.csv)")
    ap.add_argument("--split", default=None, help="scans folder inside data_dir (GI default: test/ if present, "
                                                  "else train/)")
    ap.add_argument("--fold", type=int, default=None,
                    help="only this validation fold; it must be the model's own (its training split is saved with it)")
    ap.add_argument("--n_folds", type=int, default=None, help="folds of the training run (default: the model's)")
    ap.add_argument("--split_seed", type=int, default=None, help="split seed of the training run (default: the model's)")
    ap.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    ap.add_argument("--thresholds", default=None,
                    help="per-class probability thresholds of a multilabel model, comma-separated in the order of its "
                         "classes, e.g. 0.5,0.4,0.5 (default: the ones saved with the model; overrides --tuned's)")
    ap.add_argument("--tuned", default=None,
                    help="thresholds, gates and post-processing from a giseg tune --out file (an ensemble's); default: "
                         "the first model's spec (tuned by giseg tune, or the training threshold)")
    ap.add_argument("--backend", default="eager", choices=BACKENDS,
                    help="how the forward pass runs: eager PyTorch (default); compile: torch.compile (inductor), "
                         "compiled on the first batches; onnxruntime: each model folder's model.onnx (giseg "
                         "export-onnx) in ONNX Runtime on the CPU. The rest of the path is the same for all three")
    add_options(ap, RunOptions)
    return ap


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(True)
    quiet_third_party()
    check_run_options(args)
    claim_output_file(args.out, "--out", {"--data_dir": args.data_dir, **{f"--model {m}": m for m in args.model}},
                      ours=starts_with(SUBMISSION_HEADER))
    device = torch.device("cuda" if torch.cuda.is_available() and args.backend != "onnxruntime" else "cpu")
    weights = parse_weights(args.weights, len(args.model))
    model = Ensemble.load(args.model, device, weights, args.allow_bin, args.backend)  # a wrong --model fails first
    spec = model.spec
    if args.tuned:
        model = model.with_decisions(**read_tuned(args.tuned))
        spec = model.spec
    thresholds = parse_thresholds(args.thresholds, spec.classes)
    if thresholds is not None:
        if spec.task != "multilabel":
            raise UserError("--thresholds applies to multilabel models; this one is multiclass (argmax)")
        model = model.with_decisions(thresholds=thresholds)
    options = {**(spec.dataset_options or {}), **({"hf_split": args.split} if args.split else {})}
    adapter = get_adapter(spec.dataset, f"--model {args.model[0]}").bind(args.data_dir, options, spec.classes)
    split = args.split or adapter.inference_split(args.data_dir)
    index = adapter.build_index(args.data_dir, split, require_labels=False)
    if any(r != "none" for r in spec.postprocess or ()):  # 3D components: a volume's slices must stack
        check_volume_sizes(index, adapter.volume_columns, f"{args.data_dir} (post-processing works on whole volumes)")
    rows = np.arange(len(index))
    if args.fold is not None:
        splits = {json.dumps(m.spec.split, sort_keys=True) for m in model.members}
        if len(splits) > 1:
            raise UserError(f"--fold: the models were trained on different splits ({', '.join(sorted(splits))}); "
                            "every slice is in some model's training set. Omit --fold")
        split = check_split(spec.split, args.fold, args.n_folds, args.split_seed, args.model[0])
        _, rows = split_by_case(index, split["fold"], split["n_folds"], split["split_seed"])
    inputs = model.inputs(adapter, index, args.cache_dir, num_threads=max(1, args.num_workers))
    for name, m, w in zip(model.names, model.members, model.weights):
        logger.info("model %s: %s, %dpx, context %d, weight %.3f", name, m.spec.task, m.spec.image_size,
                    m.spec.context_slices, w)
    logger.info("predicting %d slices of %s (%s) with %d model(s) (thresholds %s, gates %s / %s, post-processing %s, "
                "tta %s) on %s (%s)", len(rows), args.data_dir, split or adapter.name, len(model.members),
                list(model.thresholds) or "argmax", list(spec.min_area or []) or "off", list(spec.min_prob or []) or
                "off", list(spec.postprocess or []) or "off", args.tta, device, args.backend)
    sub = predict_rows(model, index, rows, inputs, adapter.volume_columns, args.batch_size, args.mixed_precision,
                       args.tta, args.num_workers)
    write_submission(sub, args.out)
    logger.info("wrote %s: %d rows, %d slices with a predicted class", args.out, len(sub),
                sub.groupby("id")["predicted"].apply(lambda s: (s != "").any()).sum())
    return 0
