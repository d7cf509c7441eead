"""Figures of the data, the training and the predictions of a run (used by visualisation.ipynb).

    python visualise.py --run_dir runs/<name> --out figures/        # every figure as a PNG, headless

Colours follow the GI-tract reference report: large bowel red, small bowel green, stomach blue.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lgg import LGG_CLASSES
from utils import CLASSES

COLOURS = {"large_bowel": (1.0, 0.0, 0.0), "small_bowel": (0.0, 1.0, 0.0), "stomach": (0.0, 0.0, 1.0),
           "tumor": (1.0, 1.0, 0.0)}
COLOUR_NAMES = {"large_bowel": "red", "small_bowel": "green", "stomach": "blue", "tumor": "yellow"}


def index_classes(index: pd.DataFrame) -> tuple[str, ...]:
    """The classes of an index: the LGG tumour when it has mask files, else the three GI organs."""
    return LGG_CLASSES if "mask_path" in index else CLASSES


def presence(index: pd.DataFrame) -> pd.DataFrame:
    """(slices x classes) booleans: does the ground truth show the class? (GI: from the codes, LGG: the masks.)"""
    if "mask_path" in index:
        from cache import slice_masks

        return pd.DataFrame([slice_masks(r).reshape(len(LGG_CLASSES), -1).any(1) for r in index.itertuples()],
                            columns=list(LGG_CLASSES), index=index.index)
    return pd.DataFrame({c: index[f"rle_{c}"].astype(str).str.len() > 0 for c in CLASSES})


def _plt():
    import matplotlib

    if "MPLBACKEND" not in os.environ and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")  # headless servers; notebooks set their own backend
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- images
def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.45, classes: tuple[str, ...] | None = None) -> np.ndarray:
    """(H, W) image in [0, 1] and (3, H, W) organ masks -> (H, W, 3) RGB with the organs tinted in their colours.
    Overlapping organs mix their colours."""
    rgb = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1).astype(np.float32)
    classes = classes or (CLASSES if len(masks) == len(CLASSES) else LGG_CLASSES)
    for c, name in enumerate(classes):
        m = masks[c].astype(bool)
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(COLOURS[name], np.float32)
    return rgb


def load_slice(row) -> tuple[np.ndarray, np.ndarray]:
    """A slice at its original size: the image normalised to [0, 1] and its (3, H, W) ground-truth masks."""
    from cache import slice_masks
    from data import normalise_scan, read_scan
    from lgg import read_lgg_scan

    lgg = isinstance(getattr(row, "mask_path", None), str)
    image = normalise_scan((read_lgg_scan if lgg else read_scan)(row.path, row.width, row.height))
    return image, slice_masks(row, with_labels=lgg or hasattr(row, f"rle_{CLASSES[0]}"))


# ---------------------------------------------------------------- the data
def class_frequency(index: pd.DataFrame) -> pd.DataFrame:
    """Per case: slices, and slices showing each organ."""
    has = presence(index)
    df = pd.concat([index[["case"]], has], axis=1)
    out = df.groupby("case").agg(slices=("case", "size"), **{c: (c, "sum") for c in has.columns})
    return out.astype(int)


def plot_class_frequency(index: pd.DataFrame):
    plt = _plt()
    freq = class_frequency(index)
    classes = index_classes(index)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    total = freq[list(classes)].sum()
    axes[0].bar(list(classes), total.to_numpy(), color=[COLOURS[c] for c in classes])
    axes[0].set_title(f"slices showing each organ (of {int(freq['slices'].sum())})")
    share = freq[list(classes)].div(freq["slices"], axis=0)
    x = np.arange(len(share))
    for k, c in enumerate(classes):
        axes[1].bar(x + (k - 1) * 0.27, share[c].to_numpy(), width=0.27, color=COLOURS[c], label=c)
    axes[1].set_xticks(x, [f"case{c}" for c in share.index], rotation=45)
    axes[1].set_title("share of slices with the organ, per case")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_size_mix(index: pd.DataFrame):
    plt = _plt()
    sizes = index.groupby(["width", "height"]).size().sort_values(ascending=False)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([f"{w}x{h}" for w, h in sizes.index], sizes.to_numpy(), color="grey")
    ax.set_title("scan sizes (width x height)")
    ax.set_ylabel("slices")
    fig.tight_layout()
    return fig


def plot_slice_strip(index: pd.DataFrame, case: int | None = None, day: int | None = None, n: int = 8):
    """Consecutive slices of one case-day (the one with most organ slices by default) with ground truth."""
    plt = _plt()
    if case is None:
        busy = index.assign(any_organ=presence(index).sum(axis=1))
        case, day = busy.groupby(["case", "day"])["any_organ"].sum().idxmax()
    vol = index[(index["case"] == case) & (index["day"] == day)].sort_values("slice")
    mid = len(vol) // 2
    vol = vol.iloc[max(0, mid - n // 2): max(0, mid - n // 2) + n]
    fig, axes = plt.subplots(1, len(vol), figsize=(2.2 * len(vol), 2.6), squeeze=False)
    for ax, row in zip(axes[0], vol.itertuples()):
        image, masks = load_slice(row)
        ax.imshow(overlay(image, masks))
        ax.set_title(f"slice {row.slice}", fontsize=8)
        ax.axis("off")
    legend = ", ".join(f"{c} {COLOUR_NAMES[c]}" for c in index_classes(index))
    fig.suptitle(f"case{case} day{day}: ground truth ({legend})")
    fig.tight_layout()
    return fig


def plot_augmentations(index: pd.DataFrame, image_size: int = 256, n: int = 5, strong: bool = True, seed: int = 0):
    """One sample through the training augmentation ``n`` times (mask overlaid)."""
    from augment import train_transform
    from cache import pack_masks, resize_image, resize_mask, unpack_masks

    plt = _plt()
    shown = presence(index).sum(axis=1)
    with_organs = index[shown >= min(2, shown.max())]
    row = (with_organs if len(with_organs) else index).iloc[0]
    image, masks = load_slice(row)
    image = resize_image(image, image_size)
    packed = resize_mask(pack_masks(masks), image_size)
    tf = train_transform(image_size, strong=strong)
    tf.set_random_seed(seed)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.4 * (n + 1), 2.7))
    axes[0].imshow(overlay(image, unpack_masks(packed)))
    axes[0].set_title("original", fontsize=9)
    for ax in axes[1:]:
        out = tf(image=np.repeat(image[..., None], 3, -1), mask=packed)
        ax.imshow(overlay(out["image"][..., 0], unpack_masks(out["mask"])))
        ax.set_title("augmented", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{row.id}: {'strong' if strong else 'default'} augmentation")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the training
def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """metrics.jsonl of a run as a table, one row per evaluation."""
    path = Path(run_dir) / "metrics.jsonl"
    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def best_epoch(metrics: pd.DataFrame) -> int:
    return int(metrics.loc[metrics["dice_mean"].idxmax(), "epoch"])


def plot_training(run_dir: str | Path):
    """Loss curves, per-class Dice curves and the learning rate, best epoch marked."""
    plt = _plt()
    m = load_metrics(run_dir)
    best = best_epoch(m)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(m["epoch"], m["train_loss"], "o-", label="train")
    axes[0].plot(m["epoch"], m["val_loss"], "o-", label="validation")
    axes[0].set_title("loss")
    for c in [k[5:] for k in m.columns if k.startswith("dice_") and k[5:] in COLOURS]:
        axes[1].plot(m["epoch"], m[f"dice_{c}"], "o-", color=COLOURS[c], label=c)
    axes[1].plot(m["epoch"], m["dice_mean"], "k--", label="mean")
    axes[1].set_title("validation Dice (per slice)")
    axes[1].set_ylim(0, 1.02)
    axes[2].plot(m["epoch"], m["lr"], "o-", color="purple")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.axvline(best, color="orange", lw=1, ls=":", label=f"best epoch {best}")
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the predictions
@dataclass
class Predictions:
    """Validation predictions of a run at original sizes, with per-slice scores."""
    index: pd.DataFrame  # the validation slices
    masks: dict  # id -> (3, H, W) bool predicted organs
    scores: pd.DataFrame  # one row per slice: id, case, dice_<class> (NaN where truth and prediction are empty)
    task: str
    classes: tuple[str, ...] = CLASSES


def predict_validation(run_dir: str | Path, data_dir: str | Path | None = None, max_slices: int | None = None,
                       cache_dir: str | None = None) -> Predictions:
    """Run best/ of ``run_dir`` over its validation fold (from run_config.json)."""
    import torch

    from cache import build_cache, slice_masks
    from data import DATASETS, neighbour_table, split_by_case
    from metrics import dice_from_stats
    from predict import iter_masks, load_for_inference

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "run_config.json").read_text())
    index = DATASETS[cfg.get("dataset", "gi")].build_index(data_dir or cfg["data_dir"])
    _, rows = split_by_case(index, cfg["fold"], cfg["n_folds"], cfg["split_seed"])
    if max_slices:
        rows = rows[:max_slices]
    model, spec = load_for_inference(run_dir / "best", torch.device("cpu"))
    cache = build_cache(index, spec.image_size, cache_dir or cfg["cache_dir"])
    neighbours = neighbour_table(index, spec.context_slices, spec.context_stride)
    masks, records = {}, []
    for r, pred in iter_masks(model, spec, index, rows, cache, neighbours, batch_size=8):
        row = index.iloc[r]
        truth = slice_masks(row).astype(bool)
        masks[row.id] = pred
        inter, ps, ts = (pred & truth).sum((1, 2)), pred.sum((1, 2)), truth.sum((1, 2))
        dice = dice_from_stats(np.stack([inter, ps, ts], -1), "skip")
        records.append({"id": row.id, "case": int(row.case),
                        **{f"dice_{c}": dice[k] for k, c in enumerate(spec.classes)}})
    return Predictions(index.iloc[rows].reset_index(drop=True), masks, pd.DataFrame(records), spec.task, spec.classes)


def plot_predictions(pred: Predictions, ids: list[str] | None = None, n: int = 4):
    """Rows of scan / ground truth / prediction / overlay of both (truth contours on the prediction)."""
    plt = _plt()
    if ids is None:
        busy = pred.scores.set_index("id")[[f"dice_{c}" for c in pred.classes]].notna().sum(axis=1).sort_values(ascending=False)
        ids = list(busy.index[:n])
    rows = pred.index.set_index("id", drop=False).loc[ids]
    fig, axes = plt.subplots(len(ids), 4, figsize=(11, 2.8 * len(ids)), squeeze=False)
    for ax_row, row in zip(axes, rows.itertuples(index=False)):
        sid = row.id
        image, truth = load_slice(row)
        p = pred.masks[sid]
        panels = [(np.repeat(image[..., None], 3, -1), "scan"), (overlay(image, truth, classes=pred.classes),
                  "ground truth"), (overlay(image, p, classes=pred.classes), "prediction"),
                  (overlay(image, p, classes=pred.classes), "prediction + truth contours")]
        for ax, (img, title) in zip(ax_row, panels):
            ax.imshow(img)
            ax.set_title(f"{title}" if title != "scan" else sid, fontsize=8)
            ax.axis("off")
        for c, name in enumerate(pred.classes):
            if truth[c].any():
                ax_row[3].contour(truth[c], levels=[0.5], colors=[COLOURS[name]], linewidths=0.8)
    fig.tight_layout()
    return fig


def best_and_worst(pred: Predictions, cls: str, k: int = 3) -> tuple[list[str], list[str]]:
    """Slice ids with the highest and lowest Dice for ``cls`` (slices where truth or prediction shows it)."""
    s = pred.scores.dropna(subset=[f"dice_{cls}"]).sort_values(f"dice_{cls}")
    return list(s["id"].iloc[::-1][:k]), list(s["id"].iloc[:k])


def plot_best_worst(pred: Predictions, cls: str, k: int = 2):
    best, worst = best_and_worst(pred, cls, k)
    fig = plot_predictions(pred, best + worst)
    fig.suptitle(f"{cls}: best {len(best)} then worst {len(worst)} slices by Dice", y=1.0)
    return fig


def per_case_table(pred: Predictions) -> pd.DataFrame:
    """Mean per-slice Dice per case and class (NaN-skipping: slices where neither shows the organ are left out)."""
    cols = [f"dice_{c}" for c in pred.classes]
    table = pred.scores.groupby("case")[cols].mean()
    table["dice_mean"] = table[cols].mean(axis=1)
    table["slices"] = pred.scores.groupby("case").size()
    return table.round(4)


def confusion(pred: Predictions) -> pd.DataFrame:
    """Where each organ's true pixels went: rows are true organs, columns the predicted organs or 'none'
    (fractions of the row organ's pixels; a pixel predicted as two organs counts for both)."""
    from cache import slice_masks

    n = len(pred.classes)
    counts = np.zeros((n, n + 1))
    totals = np.zeros(n)
    for row in pred.index.itertuples():
        truth, p = slice_masks(row).astype(bool), pred.masks[row.id]
        totals += truth.sum((1, 2))
        for t in range(n):
            counts[t, :-1] += (truth[t][None] & p).sum((1, 2))
            counts[t, -1] += (truth[t] & ~p.any(0)).sum()
    return pd.DataFrame(counts / np.maximum(totals, 1)[:, None], index=[f"true {c}" for c in pred.classes],
                        columns=[f"pred {c}" for c in pred.classes] + ["pred none"])


def plot_confusion(pred: Predictions):
    plt = _plt()
    conf = confusion(pred)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    im = ax.imshow(conf.to_numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(conf.shape[1]), conf.columns, rotation=30, ha="right")
    ax.set_yticks(range(conf.shape[0]), conf.index)
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            ax.text(j, i, f"{conf.iat[i, j]:.2f}", ha="center", va="center", color="w" if conf.iat[i, j] < 0.6 else "k")
    ax.set_title("where the true organ pixels were predicted")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- command line
def save_all(run_dir: str | Path, out_dir: str | Path, data_dir: str | Path | None = None,
             max_slices: int | None = None) -> list[Path]:
    """Write every figure of the notebook as a PNG; return the paths."""
    from data import DATASETS

    plt = _plt()
    run_dir, out = Path(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((run_dir / "run_config.json").read_text())
    index = DATASETS[cfg.get("dataset", "gi")].build_index(data_dir or cfg["data_dir"])
    pred = predict_validation(run_dir, data_dir, max_slices)
    figures = {"class_frequency": lambda: plot_class_frequency(index), "size_mix": lambda: plot_size_mix(index),
               "slice_strip": lambda: plot_slice_strip(index), "augmentation": lambda: plot_augmentations(index),
               "training": lambda: plot_training(run_dir), "predictions": lambda: plot_predictions(pred),
               "confusion": lambda: plot_confusion(pred)}
    for c in pred.classes:
        if pred.scores[f"dice_{c}"].notna().any():
            figures[f"best_worst_{c}"] = lambda c=c: plot_best_worst(pred, c)
    paths = []
    for name, make in figures.items():
        fig = make()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    per_case_table(pred).to_csv(out / "per_case.csv")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_dir", required=True, help="a run folder (with run_config.json, metrics.jsonl, best/)")
    ap.add_argument("--out", default="figures", help="folder for the PNGs (default figures/)")
    ap.add_argument("--data_dir", default=None, help="data folder (default: the run's)")
    ap.add_argument("--max_slices", type=int, default=None, help="predict at most this many validation slices")
    args = ap.parse_args()
    from utils import quiet_third_party

    quiet_third_party()
    for path in save_all(args.run_dir, args.out, args.data_dir, args.max_slices):
        print(path)


if __name__ == "__main__":
    main()
