"""Predict organ masks for every slice of a data folder and write a competition submission.

    python predict.py --model runs/<name>/best --data_dir <kaggle folder> --out submission.csv

Writes `id,class,predicted` (three rows per slice, run-length codes at each scan's ORIGINAL size). Works on the
train layout (masks optional) and the test layout (no train.csv): --split picks the scans folder, by default
`test/` when the folder has one, else `train/`. --fold / --n_folds restrict to one validation fold.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rle import encode_rle
from utils import CLASSES, UserError, atomic_write_text, logger, quiet_third_party, setup_logging


@dataclass
class InferenceSpec:
    """What a saved model needs to see its inputs as in training."""
    task: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    context_slices: int
    context_stride: int
    dataset: str = "gi"
    classes: tuple[str, ...] = CLASSES


def spec_from_folder(model_dir: Path, config) -> InferenceSpec:
    proc_file = model_dir / "preprocessor_config.json"
    proc = json.loads(proc_file.read_text()) if proc_file.is_file() else {}
    size = proc.get("size", {}).get("height", 288)
    task = getattr(config, "gi_task", "multilabel")
    labels = tuple(config.id2label[i] for i in sorted(config.id2label))
    return InferenceSpec(task=task, image_size=int(size),
                         mean=tuple(proc.get("image_mean", (0.485, 0.456, 0.406))),
                         std=tuple(proc.get("image_std", (0.229, 0.224, 0.225))),
                         context_slices=int(getattr(config, "gi_context_slices", 1)),
                         context_stride=int(getattr(config, "gi_context_stride", 2)),
                         dataset=getattr(config, "gi_dataset", "gi"),
                         classes=labels[1:] if task == "multiclass" else labels)


def load_for_inference(model_dir: str | Path, device: torch.device) -> tuple[torch.nn.Module, InferenceSpec]:
    from transformers import AutoModelForSemanticSegmentation

    import baselines  # noqa: F401  (registers the CNN baselines with the Auto classes)

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir}: no config.json; pass a folder written by the trainer (e.g. runs/<name>/best)")
    try:
        model = AutoModelForSemanticSegmentation.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model_dir}: not a segmentation model folder ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), spec_from_folder(model_dir, model.config)


@torch.no_grad()
def predict_probs(model: torch.nn.Module, pixel_values: torch.Tensor, task: str, tta: bool) -> torch.Tensor:
    """(B, 3, h, w) organ probabilities at the model's output size (sigmoid, or softmax organ channels);
    with ``tta`` averaged with the horizontally flipped input's."""
    def once(x: torch.Tensor) -> torch.Tensor:
        logits = model(pixel_values=x).logits.float()
        return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, 1)

    probs = once(pixel_values)
    if tta:
        probs = 0.5 * (probs + once(pixel_values.flip(-1)).flip(-1))
    return probs


def probs_to_masks(probs: torch.Tensor, size: tuple[int, int], task: str, thresholds: torch.Tensor) -> np.ndarray:
    """One slice's (K, h, w) probabilities -> (3, H, W) bool masks at its original size."""
    up = torch.nn.functional.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
    if task == "multilabel":
        return (up > thresholds.view(-1, 1, 1)).cpu().numpy()
    labels = up.argmax(0)
    return (labels[None] == torch.arange(1, up.shape[0], device=up.device).view(-1, 1, 1)).cpu().numpy()


def iter_masks(model, spec: InferenceSpec, index: pd.DataFrame, rows: np.ndarray, cache, neighbours: np.ndarray,
               batch_size: int = 16, device: torch.device | None = None, mixed_precision: str = "no",
               tta: bool = False, thresholds: tuple[float, ...] = (0.5, 0.5, 0.5), num_workers: int = 0):
    """Yield (row, (3, H, W) bool organ masks at the scan's original size) for ``rows`` of ``index``, in order."""
    from augment import eval_transform
    from dataset import SliceDataset

    device = device or next(model.parameters()).device
    ds = SliceDataset(cache, rows, neighbours, eval_transform(spec.image_size), spec.mean, spec.std)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                     pin_memory=device.type == "cuda")
    thr = torch.tensor(thresholds[:len(spec.classes)], dtype=torch.float32, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    heights, widths = index["height"].to_numpy(), index["width"].to_numpy()
    model.eval()
    for batch in dl:
        x = batch["pixel_values"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda"):
            probs = predict_probs(model, x, spec.task, tta)
        for k, r in enumerate(batch["index"].tolist()):
            yield r, probs_to_masks(probs[k], (int(heights[r]), int(widths[r])), spec.task, thr)


def predict_rows(model, spec: InferenceSpec, index: pd.DataFrame, rows: np.ndarray, cache, neighbours: np.ndarray,
                 batch_size: int = 16, device: torch.device | None = None, mixed_precision: str = "no",
                 tta: bool = False, thresholds: tuple[float, ...] = (0.5, 0.5, 0.5), num_workers: int = 0) -> pd.DataFrame:
    """Submission rows (id, class, predicted) for ``rows`` of ``index``, in index order."""
    ids = index["id"].to_numpy()
    out = [(ids[r], name, encode_rle(masks[c]))
           for r, masks in iter_masks(model, spec, index, rows, cache, neighbours, batch_size, device,
                                      mixed_precision, tta, thresholds, num_workers)
           for c, name in enumerate(spec.classes)]
    return pd.DataFrame(out, columns=["id", "class", "predicted"])


def write_submission(df: pd.DataFrame, path: str | Path) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="saved model folder (runs/<name>/best)")
    ap.add_argument("--data_dir", required=True, help="folder in the Kaggle layout (or kaggle_3m for an LGG model)")
    ap.add_argument("--out", default="submission.csv", help="submission CSV to write (default submission.csv)")
    ap.add_argument("--split", default=None, help="scans folder inside data_dir (default: test/ if present, else train/)")
    ap.add_argument("--fold", type=int, default=None, help="only this validation fold (with --n_folds, --split_seed)")
    ap.add_argument("--n_folds", type=int, default=5, help="folds of the training run (default 5)")
    ap.add_argument("--split_seed", type=int, default=42, help="split seed of the training run (default 42)")
    ap.add_argument("--batch_size", type=int, default=16, help="slices per forward pass (default 16)")
    ap.add_argument("--mixed_precision", default="bf16", choices=("no", "fp16", "bf16"),
                    help="autocast on GPU (default bf16; ignored on CPU)")
    ap.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    ap.add_argument("--thresholds", default=None,
                    help="per-class sigmoid thresholds, e.g. 0.5,0.4,0.5 for large_bowel,small_bowel,stomach "
                         "(default 0.5 each)")
    ap.add_argument("--cache_dir", default="cache", help="decode-once cache folder (default cache)")
    ap.add_argument("--num_workers", type=int, default=2, help="data-loader workers (default 2)")
    args = ap.parse_args(argv)
    setup_logging(True)
    quiet_third_party()
    try:
        return _run(args)
    except UserError as e:
        logger.error("error: %s", e)
        return 2


def _run(args: argparse.Namespace) -> int:
    from cache import build_cache
    from data import DATASETS, build_index, neighbour_table, split_by_case

    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, spec = load_for_inference(args.model, device)  # a wrong --model fails before any data work
    n = len(spec.classes)
    try:
        thresholds = tuple(float(t) for t in args.thresholds.split(",")) if args.thresholds else (0.5,) * n
    except ValueError:
        raise UserError(f"--thresholds must be {n} comma-separated numbers, got {args.thresholds!r}") from None
    if len(thresholds) != n or not all(0 < t < 1 for t in thresholds):
        raise UserError(f"--thresholds needs {n} values in (0, 1) ({', '.join(spec.classes)}), got {args.thresholds!r}")
    data_dir = Path(args.data_dir)
    split = args.split or ("test" if (data_dir / "test").is_dir() else "train")
    if spec.dataset == "gi":
        labels = (data_dir / "train.csv").is_file() and split == "train"
        index = build_index(data_dir, split, labels=labels)
    else:
        index = DATASETS[spec.dataset].build_index(data_dir)
    rows = np.arange(len(index))
    if args.fold is not None:
        _, rows = split_by_case(index, args.fold, args.n_folds, args.split_seed)
    cache = build_cache(index, spec.image_size, args.cache_dir, num_threads=max(1, args.num_workers))
    neighbours = neighbour_table(index, spec.context_slices, spec.context_stride)
    logger.info("predicting %d slices of %s/%s with %s (%s, %dpx, tta %s) on %s", len(rows), data_dir, split,
                args.model, spec.task, spec.image_size, args.tta, device)
    sub = predict_rows(model, spec, index, rows, cache, neighbours, args.batch_size, device, args.mixed_precision,
                       args.tta, thresholds, args.num_workers)
    write_submission(sub, args.out)
    logger.info("wrote %s: %d rows, %d slices with an organ", args.out, len(sub), sub.groupby("id")["predicted"]
                .apply(lambda s: (s != "").any()).sum())
    return 0


if __name__ == "__main__":
    sys.exit(main())
