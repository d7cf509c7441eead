"""Predict masks for every slice of a data folder and write a competition submission; or of scans as volumes.

    giseg predict --model runs/<name>/best --data_dir <kaggle folder> --out submission.csv
    giseg predict --model runs/<name>/best --input <scan.nii.gz | folder of them | DICOM series folder> --out preds/

Writes `id,class,predicted` (a row per slice and class, run-length codes at each scan's ORIGINAL size). The
model folder's inference spec says which dataset layout to read, and how the model sees its inputs (size,
normalisation, 2.5D) and turns outputs into masks (task, thresholds). GI folders: the train layout (masks
optional) and the test layout (no train.csv): --split picks the scans folder, by default `test/` when the folder
has one, else `train/`. --fold restricts to the model's validation fold (the split saved with the model; another
fold or split is refused, since its slices were trained on).

--input reads volumes instead (giseg/data/medical.py): each NIfTI file, or the one DICOM series of a folder (slices
sorted by position), is cut into slices across its through-plane axis and predicted as a dataset's slices are
(ensembles, TTA, tuned thresholds, gates, post-processing); then written on the input's grid
(giseg/inference/medical.py): <out>/<name>.nii.gz, and for DICOM input <out>/<name>_rtstruct.dcm, an RT-Struct that a
planning system opens over the series.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from giseg.commands.options import RunOptions, check_run_options, check_split, parse_thresholds, parse_weights
from giseg.data.folds import split_by_case
from giseg.data.medical import VolumeAdapter, find_inputs, read_volume
from giseg.data.registry import get_adapter
from giseg.data.volumes import check_volume_sizes
from giseg.evaluation.tuning import read_tuned, read_tuned_weights
from giseg.inference.ensemble import Ensemble
from giseg.inference.gate import SliceGate
from giseg.inference.medical import VOLUME_LABELS, claim_names, record_output, write_nifti, write_rtstruct
from giseg.inference.segmenter import BACKENDS
from giseg.inference.submission import SUBMISSION_HEADER, predict_rows, write_submission
from giseg.models.tasks import get_task
from giseg.utils.claims import claim_output_dir, claim_output_file, hold_output, starts_with
from giseg.utils.errors import UserError
from giseg.utils.exits import command
from giseg.utils.log import logger, quiet_third_party, setup_logging
from giseg.utils.options import add_options


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, nargs="+",
                    help="saved model folder (runs/<name>/best); several: an ensemble that averages their probabilities "
                         "(folds of a run, or different families; each sees its own image size, normalisation and "
                         "2.5D setting), turned into masks by the first one's thresholds, gates and post-processing")
    what = ap.add_mutually_exclusive_group(required=True)  # (a submission CSV, or volumes: one of them)
    what.add_argument("--data_dir", default=None, help="folder in the model's dataset layout (Kaggle folder, "
                                                       "kaggle_3m, nnU-Net dataset); or --input")
    what.add_argument("--input", default=None, help="instead of --data_dir: a NIfTI file (.nii, .nii.gz), a folder of "
                                                    "them, or a folder holding one DICOM series")
    ap.add_argument("--out", default=None, help="submission CSV to write (default submission.csv); with --input, the "
                                                "folder of the predicted volumes (default predictions)")
    ap.add_argument("--volume_labels", default="map", choices=VOLUME_LABELS,
                    help="with --input: map (default): one NIfTI label map per input, class k as value k + 1, "
                         "overlaps to the dataset's priority; per_class: <name>/<class>.nii.gz, one 0/1 volume per "
                         "class (overlaps kept)")
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
                    help="thresholds, gates and post-processing from a giseg tune --out file (an ensemble's), and "
                         "its weights (a blend of 2D and 3D members) unless --weights; default: the first model's "
                         "spec (tuned by giseg tune, or the training threshold)")
    ap.add_argument("--gate_model", nargs="+", default=None,
                    help="slice classifiers (trainer.py --task presence; several: their probabilities averaged): a "
                         "class is emptied on a slice the gate calls absent (below the gate threshold: giseg tune's, "
                         "saved in the segmenter's spec, else the classifiers' own) or where at most the gate's "
                         "minimum pixel count of it is predicted (inference/gate.py)")
    ap.add_argument("--backend", default="eager", choices=BACKENDS,
                    help="how the forward pass runs: eager PyTorch (default); compile: torch.compile (inductor), "
                         "compiled on the first batches; onnxruntime: each model folder's model.onnx (giseg "
                         "export-onnx) in ONNX Runtime on the CPU. The rest of the path is the same for all three")
    add_options(ap, RunOptions)
    return ap


def claim_out(args) -> None:
    """--out: a folder of volumes for --input (default predictions/), a submission CSV for --data_dir (default
    submission.csv); claimed, so that it never replaces what another command or the user wrote."""
    models = {f"--model {m}": m for m in args.model}
    if args.input is not None:
        for flag, value in (("--fold", args.fold), ("--split", args.split)):
            if value is not None:
                raise UserError(f"{flag} applies to --data_dir; --input predicts every slice of its volumes")
        args.out = args.out or "predictions"
        claim_output_dir(args.out, "--out", "predict", {"--input": args.input, **models})
    else:
        args.out = args.out or "submission.csv"
        claim_output_file(args.out, "--out", {"--data_dir": args.data_dir, **models}, ours=starts_with(SUBMISSION_HEADER))


def load_models(args, device) -> Ensemble:
    """The --model(s) with --weights, --tuned decisions, the --gate_model slice gate and --thresholds."""
    weights = parse_weights(args.weights, len(args.model))
    if weights is None and args.tuned:  # the blend giseg tune chose for 2D and 3D members
        weights = read_tuned_weights(args.tuned)
        if weights is not None and len(weights) != len(args.model):
            raise UserError(f"--tuned {args.tuned} holds weights for {len(weights)} models (its ensemble's), got "
                            f"{len(args.model)} --model; pass them in the tuned ensemble's order, or --weights")
    model = Ensemble.load(args.model, device, weights, args.allow_bin, args.backend)  # a wrong --model fails first
    if args.tuned:
        model = model.with_decisions(**read_tuned(args.tuned))
    spec = model.spec
    if args.gate_model:
        model = model.with_gate(SliceGate.load(args.gate_model, device, args.allow_bin))
        thresholds, min_pixels = model.gate_values()
        logger.info("slice gate: %s; a class stays where its probability is >= %s and more than %s of its pixels are "
                    "predicted (%s)", ", ".join(args.gate_model), list(thresholds), list(min_pixels),
                    "tuned: the segmenter's spec" if spec.gate_threshold else "the classifiers' own thresholds")
    elif any(spec.gate_threshold or ()) or any(spec.gate_min_pixels or ()):
        logger.warning("%s was tuned with a slice gate (gate thresholds %s in its spec), but no --gate_model is given: "
                       "its masks are not gated, and tune's score assumed they were", args.model[0],
                       list(spec.gate_threshold))
    thresholds = parse_thresholds(args.thresholds, spec.classes)
    if thresholds is not None:
        if get_task(spec.task).background:
            raise UserError("--thresholds applies to multilabel models; this one is multiclass (argmax)")
        model = model.with_decisions(thresholds=thresholds)
    return model


def fold_rows(model: Ensemble, index, args) -> np.ndarray:
    """The rows to predict: every slice, or with --fold the validation cases of the models' training split."""
    if args.fold is None:
        return np.arange(len(index))
    splits = {json.dumps(m.spec.split, sort_keys=True) for m in model.members}
    if len(splits) > 1:
        raise UserError(f"--fold: the models were trained on different splits ({', '.join(sorted(splits))}); "
                        "every slice is in some model's training set. Omit --fold")
    trained = check_split(model.spec.split, args.fold, args.n_folds, args.split_seed, args.model[0])
    return split_by_case(index, trained["fold"], trained["n_folds"], trained["split_seed"])[1]


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(True)
    quiet_third_party()
    check_run_options(args)
    claim_out(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.backend != "onnxruntime" else "cpu")
    model = load_models(args, device)
    if args.input is not None:
        return predict_volumes(model, args, device)
    spec = model.spec
    options = {**(spec.dataset_options or {}), **({"hf_split": args.split} if args.split else {})}
    adapter = get_adapter(spec.dataset, f"--model {args.model[0]}").bind(args.data_dir, options, spec.classes)
    split = args.split or adapter.inference_split(args.data_dir)
    index = adapter.build_index(args.data_dir, split, require_labels=False)
    if any(r != "none" for r in spec.postprocess or ()):  # 3D components: a volume's slices must stack
        check_volume_sizes(index, adapter.volume_columns, f"{args.data_dir} (post-processing works on whole volumes)")
    rows = fold_rows(model, index, args)
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


def predict_volumes(model: Ensemble, args, device) -> int:
    """--input: every volume predicted slice by slice, then written as NIfTI (and RT-Struct for DICOM)."""
    spec = model.spec
    data = get_adapter(spec.dataset, f"--model {args.model[0]}").bind(None, spec.dataset_options or {}, spec.classes)
    out = Path(args.out)
    inputs = find_inputs(args.input, spec.channels)
    with hold_output(out, "--out"):  # (a second predict into the same --out is refused while this one writes)
        write_volumes(model, args, device, data, out, inputs)
    return 0


def write_volumes(model: Ensemble, args, device, data, out: Path, inputs: list) -> None:
    """Each input volume predicted and written (NIfTI; RT-Struct for DICOM), its name recorded in --out."""
    spec = model.spec
    names = iter(claim_names(out, inputs).items())
    for paths in inputs:
        path = paths[0]
        volume = read_volume(paths)
        adapter = VolumeAdapter(volume, spec.classes, spec.channels)
        index = adapter.build_index()
        cached = model.inputs(adapter, index, args.cache_dir, num_threads=max(1, args.num_workers))
        logger.info("predicting %s: %d slices of %s across axis %d (spacing %s mm) with %d model(s) on %s (%s)",
                    path, len(index), "x".join(map(str, volume.array.shape)), volume.axis,
                    "x".join(f"{s:g}" for s in volume.spacing), len(model.members), device, args.backend)
        masks = np.zeros((len(spec.classes), *volume.array.shape), bool)
        where = [slice(None)] * 4
        for r, m in model.iter_masks(index, np.arange(len(index)), cached, adapter.volume_columns, args.batch_size,
                                     args.mixed_precision, args.tta, args.num_workers):
            where[1 + volume.axis] = r
            masks[tuple(where)] = m.transpose(0, 2, 1)  # (C, H, W) -> the volume's (C, in-plane axes)
        written = write_nifti(volume, masks, spec.classes, data.priority or spec.classes, out, args.volume_labels)
        if volume.dicom is not None:
            written.append(write_rtstruct(volume, masks, spec.classes, data.colours, out / f"{volume.name}_rtstruct.dcm"))
        record_output(out, *next(names))
        logger.info("wrote %s: %s voxels per class", ", ".join(str(p) for p in written),
                    ", ".join(f"{c} {int(masks[k].sum())}" for k, c in enumerate(spec.classes)))
