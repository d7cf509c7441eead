"""Figures of the data, the training and the predictions of a run (used by visualisation.ipynb).

    giseg figures --run_dir runs/<name> --out figures/        # every figure as a PNG, headless

Colours come from the dataset adapter (GI, as the reference report: large bowel red, small bowel green, stomach
blue). Every function takes the adapter of the data it draws, or reads it from the run.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from giseg.data.base import DatasetAdapter
from giseg.data.cache import build_cache
from giseg.data.dataset import seed_pipeline
from giseg.data.folds import split_by_case
from giseg.data.hf.options import DEFAULT_OPTIONS
from giseg.data.masks import pack_masks, unpack_masks
from giseg.data.preprocess import normalise_scan, resize_image, resize_mask
from giseg.data.registry import get_adapter
from giseg.data.volumes import neighbour_table
from giseg.evaluation.metrics import dice_from_stats, mask_stats
from giseg.inference.segmenter import Segmenter
from giseg.utils.errors import UserError

RULE_NAMES = {"1": "1", "0": "0", "skip": "left out"}


def rgb(colour: str) -> tuple[float, float, float]:
    """A colour name (matplotlib / CSS) as RGB in [0, 1]."""
    from matplotlib.colors import to_rgb

    return to_rgb(colour)


def run_adapter(run_dir: str | Path) -> tuple[dict, DatasetAdapter]:
    """A run's run_config.json and the adapter of its dataset."""
    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no run_config.json); pass the --output_dir of a trainer.py run")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    options = {k: cfg[k] for k in DEFAULT_OPTIONS if k in cfg}  # how a generic (hf) adapter read the data
    return cfg, get_adapter(cfg["dataset"], f"{run_dir}/run_config.json").bind(cfg["data_dir"], options)


def _plt():
    import matplotlib

    if "MPLBACKEND" not in os.environ and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")  # headless servers; notebooks set their own backend
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- images
def overlay(image: np.ndarray, masks: np.ndarray, colours: list[str], alpha: float = 0.45) -> np.ndarray:
    """(H, W) image in [0, 1] and (C, H, W) masks -> (H, W, 3) RGB with each class tinted in its colour
    (``colours[c]``). Overlapping classes mix their colours."""
    out = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1).astype(np.float32)
    for c, colour in enumerate(colours):
        m = masks[c].astype(bool)
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(rgb(colour), np.float32)
    return out


def class_colours(adapter: DatasetAdapter) -> list[str]:
    return [adapter.colours[c] for c in adapter.classes]


def load_slice(adapter: DatasetAdapter, row) -> tuple[np.ndarray, np.ndarray]:
    """A labelled slice at its original size: the image normalised to [0, 1] and its (C, H, W) masks."""
    return normalise_scan(adapter.read_image(row)), adapter.read_masks(row)


# ---------------------------------------------------------------- the data
def class_frequency(adapter: DatasetAdapter, index: pd.DataFrame) -> pd.DataFrame:
    """Per case: slices, and slices showing each class."""
    has = adapter.presence(index)
    df = pd.concat([index[["case"]], has], axis=1)
    out = df.groupby("case").agg(slices=("case", "size"), **{c: (c, "sum") for c in has.columns})
    return out.astype(int)


def plot_class_frequency(adapter: DatasetAdapter, index: pd.DataFrame):
    plt = _plt()
    freq = class_frequency(adapter, index)
    classes = adapter.classes
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    total = freq[list(classes)].sum()
    axes[0].bar(list(classes), total.to_numpy(), color=class_colours(adapter))
    axes[0].set_title(f"slices showing each organ (of {int(freq['slices'].sum())})")
    share = freq[list(classes)].div(freq["slices"], axis=0)
    x = np.arange(len(share))
    for k, c in enumerate(classes):
        width = 0.8 / len(classes)
        axes[1].bar(x + (k - (len(classes) - 1) / 2) * width, share[c].to_numpy(), width=width,
                    color=adapter.colours[c], label=c)
    axes[1].set_xticks(x, [f"case{c}" for c in share.index], rotation=45)
    axes[1].set_title("share of slices with the organ, per case")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not on them
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


def plot_slice_strip(adapter: DatasetAdapter, index: pd.DataFrame, volume: tuple | None = None, n: int = 8):
    """Consecutive slices of one volume (values of the adapter's volume columns; by default the one with most
    class slices) with ground truth."""
    plt = _plt()
    keys = list(adapter.volume_columns)
    if volume is None:
        busy = index.assign(any_class=adapter.presence(index).sum(axis=1))
        volume = busy.groupby(keys)["any_class"].sum().idxmax()
    volume = volume if isinstance(volume, tuple) else (volume,)
    vol = index[(index[keys] == pd.Series(dict(zip(keys, volume)))).all(axis=1)].sort_values("slice")
    mid = len(vol) // 2
    vol = vol.iloc[max(0, mid - n // 2): max(0, mid - n // 2) + n]
    fig, axes = plt.subplots(1, len(vol), figsize=(2.2 * len(vol), 2.6), squeeze=False)
    for ax, row in zip(axes[0], vol.itertuples()):
        image, masks = load_slice(adapter, row)
        ax.imshow(overlay(image, masks, class_colours(adapter)))
        ax.set_title(f"slice {row.slice}", fontsize=8)
        ax.axis("off")
    legend = ", ".join(f"{c} {adapter.colours[c]}" for c in adapter.classes)
    fig.suptitle(" ".join(f"{k} {v}" for k, v in zip(keys, volume)) + f": ground truth ({legend})")
    fig.tight_layout()
    return fig


def plot_augmentations(adapter: DatasetAdapter, index: pd.DataFrame, image_size: int = 256, n: int = 5,
                       strong: bool = True, seed: int = 0):
    """One sample through the training augmentation ``n`` times (mask overlaid)."""
    from giseg.data.augment import train_transform  # albumentations: 1 s, for this figure only

    plt = _plt()
    shown = adapter.presence(index).sum(axis=1)
    with_classes = index[shown >= min(2, shown.max())]
    row = next((with_classes if len(with_classes) else index).itertuples())
    image, masks = load_slice(adapter, row)
    image = resize_image(image, image_size)
    packed = resize_mask(pack_masks(masks), image_size)
    tf = train_transform(image_size, strong=strong)
    seed_pipeline(tf, seed)
    colours, n_classes = class_colours(adapter), len(adapter.classes)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.4 * (n + 1), 2.7))
    axes[0].imshow(overlay(image, unpack_masks(packed, n_classes), colours))
    axes[0].set_title("original", fontsize=9)
    for ax in axes[1:]:
        out = tf(image=np.repeat(image[..., None], 3, -1), mask=packed)
        ax.imshow(overlay(out["image"][..., 0], unpack_masks(out["mask"], n_classes), colours))
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
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl (not a run folder, or no evaluation yet)")
    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def best_epoch(metrics: pd.DataFrame) -> int:
    return int(metrics.loc[metrics["dice_mean"].idxmax(), "epoch"])


def plot_training(run_dir: str | Path):
    """Loss curves, per-class Dice curves and the learning rate, best epoch marked."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    cfg, adapter = run_adapter(run_dir)
    m = load_metrics(run_dir)
    best = best_epoch(m)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(m["epoch"], m["train_loss"], "o-", label="train")
    axes[0].plot(m["epoch"], m["val_loss"], "o-", label="validation")
    axes[0].set_title("loss")
    for c in adapter.classes:
        axes[1].plot(m["epoch"], m[f"dice_{c}"], "o-", color=adapter.colours[c], label=c)
    axes[1].plot(m["epoch"], m["dice_mean"], "k--", label="mean")
    axes[1].set_title(f"validation Dice (per slice, {cfg['image_size']} px, empty/empty: "
                      f"{RULE_NAMES[cfg['empty_dice']]})", fontsize=10)
    axes[1].set_ylim(0, 1.02)
    axes[2].plot(m["epoch"], m["lr"], "o-", color="purple")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.axvline(best, color="orange", lw=1, ls=":", label=f"best epoch {best}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no fractional epochs on short runs
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the predictions
@dataclass
class Predictions:
    """Validation predictions of a run at original sizes, with per-slice scores."""
    index: pd.DataFrame  # the validation slices
    masks: dict  # id -> (C, H, W) bool predicted classes
    scores: pd.DataFrame  # one row per slice: id, case, dice_<class> (NaN where truth and prediction are empty,
    #                       so that rankings only see slices showing the class)
    task: str
    adapter: DatasetAdapter
    stats: np.ndarray | None = None  # (slices, classes, 3) |P∩T|, |P|, |T| at original size, in index order
    empty_dice: str = "1"  # the run's --empty_dice rule, for the per-case table

    @property
    def classes(self) -> tuple[str, ...]:
        return self.adapter.classes


def predict_validation(run_dir: str | Path, data_dir: str | Path | None = None, max_slices: int | None = None,
                       cache_dir: str | None = None, batch_size: int = 16) -> Predictions:
    """Run best/ of ``run_dir`` over its validation fold (from run_config.json), through the Segmenter that
    giseg predict and the trainer's evaluation use."""
    run_dir = Path(run_dir)
    cfg, adapter = run_adapter(run_dir)
    if not (run_dir / "best").is_dir():
        raise UserError(f"{run_dir} has no best/ model yet (it is written at the first evaluation); wait for one, or "
                        "resume the run with --resume_from_checkpoint latest")
    index = adapter.build_index(data_dir or cfg["data_dir"])
    _, rows = split_by_case(index, cfg["fold"], cfg["n_folds"], cfg["split_seed"])
    if max_slices:
        rows = rows[:max_slices]
    segmenter = Segmenter.load(run_dir / "best", "cpu")
    spec = segmenter.spec
    cache = build_cache(adapter, index, spec.image_size, cache_dir or cfg["cache_dir"], crop_margin=spec.crop())
    neighbours = neighbour_table(index, spec.context_slices, spec.context_stride, adapter.volume_columns,
                                 adapter.channels)
    masks, records, stats = {}, [], []
    for r, pred in segmenter.iter_masks(index, rows, cache, neighbours, batch_size=batch_size):
        row = next(index.iloc[[r]].itertuples())
        masks[row.id] = pred
        stats.append(mask_stats(pred, adapter.read_masks(row)))
        dice = dice_from_stats(stats[-1], "skip")
        records.append({"id": row.id, "case": int(row.case), **{f"dice_{c}": dice[k] for k, c in enumerate(spec.classes)}})
    return Predictions(index.iloc[rows].reset_index(drop=True), masks, pd.DataFrame(records), spec.task, adapter,
                       np.array(stats), cfg["empty_dice"])


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
        image, truth = load_slice(pred.adapter, row)
        p = pred.masks[sid]
        colours = class_colours(pred.adapter)
        panels = [(np.repeat(image[..., None], 3, -1), "scan"), (overlay(image, truth, colours), "ground truth"),
                  (overlay(image, p, colours), "prediction"), (overlay(image, p, colours), "prediction + truth contours")]
        for ax, (img, title) in zip(ax_row, panels):
            ax.imshow(img)
            ax.set_title(f"{title}" if title != "scan" else sid, fontsize=8)
            ax.axis("off")
        for c, name in enumerate(pred.classes):
            if truth[c].any():
                ax_row[3].contour(truth[c], levels=[0.5], colors=[pred.adapter.colours[name]], linewidths=0.8)
    fig.tight_layout()
    return fig


def best_and_worst(pred: Predictions, cls: str, k: int = 3) -> tuple[list[str], list[str]]:
    """Slice ids with the highest and lowest Dice for ``cls`` (slices where truth or prediction shows it)."""
    s = pred.scores.dropna(subset=[f"dice_{cls}"]).sort_values(f"dice_{cls}")
    return list(s["id"].iloc[::-1][:k]), list(s["id"].iloc[:k])


def plot_best_worst(pred: Predictions, cls: str, k: int = 2):
    best, worst = best_and_worst(pred, cls, k)
    fig = plot_predictions(pred, best + worst)
    fig.suptitle(f"{cls}: best {len(best)} then worst {len(worst)} slices by Dice (per slice at original size, "
                 "slices showing the class)", y=1.0)
    return fig


def per_case_table(pred: Predictions, empty_dice: str | None = None) -> pd.DataFrame:
    """Mean per-slice Dice per case and class at original size, with the run's --empty_dice rule for slices where
    neither truth nor prediction shows the class (``empty_dice`` overrides it: "skip" leaves them out). The
    column header names the rule."""
    rule = empty_dice or pred.empty_dice
    cols = [f"dice_{c}" for c in pred.classes]
    dice = pd.DataFrame(dice_from_stats(pred.stats, rule), columns=cols).assign(case=pred.scores["case"].to_numpy())
    table = dice.groupby("case")[cols].mean()
    table["dice_mean"] = table[cols].mean(axis=1)
    table["slices"] = dice.groupby("case").size()
    table.columns.name = f"per-slice Dice at original size, empty/empty: {RULE_NAMES[rule]}"
    return table.round(4)


def confusion(pred: Predictions) -> pd.DataFrame:
    """Where each class's true pixels went: rows are true classes, columns the predicted classes or 'none'
    (fractions of the row class's pixels; a pixel predicted as two classes counts for both)."""
    n = len(pred.classes)
    counts = np.zeros((n, n + 1))
    totals = np.zeros(n)
    for row in pred.index.itertuples():
        truth, p = pred.adapter.read_masks(row).astype(bool), pred.masks[row.id]
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
    ax.set_title("where the true pixels of each class were predicted (original size)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- command line
def save_all(run_dir: str | Path, out_dir: str | Path, data_dir: str | Path | None = None,
             max_slices: int | None = None) -> list[Path]:
    """Write every figure of the notebook as a PNG; return the paths."""
    plt = _plt()
    run_dir, out = Path(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, adapter = run_adapter(run_dir)
    index = adapter.build_index(data_dir or cfg["data_dir"])
    pred = predict_validation(run_dir, data_dir, max_slices)
    figures = {"class_frequency": lambda: plot_class_frequency(adapter, index), "size_mix": lambda: plot_size_mix(index),
               "slice_strip": lambda: plot_slice_strip(adapter, index),
               "augmentation": lambda: plot_augmentations(adapter, index),
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
