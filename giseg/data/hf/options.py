"""The --dataset hf options (HFOptions, declared once: trainer, score) and their values as an adapter takes them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from giseg.utils.options import flag, options_of


@dataclass
class HFOptions:
    """How ``--dataset hf`` reads a dataset: declared once, for trainer.py (TrainConfig has these fields), giseg
    score, and the inference spec (``dataset_options``) that predict, tune and the app read back."""
    image_column: str = flag(
        "", "--dataset hf: the image column (default: image, else pixel_values)",
        group="--dataset hf", identity=True)
    label_column: str = flag(
        "", "--dataset hf: the label-map column, a class index per pixel (default: label, else annotation; "
        "without one, mask_<class> columns are multi-label masks)",
        group="--dataset hf", identity=True)
    reduce_labels: bool = flag(
        False, "--dataset hf: label 0 becomes 255 (unlabelled: left out of loss and metrics) and every other "
        "label v becomes v - 1, as the HF example's --do_reduce_labels",
        group="--dataset hf", identity=True)
    hf_split: str = flag(
        "train", "--dataset hf: the split to train on or read (folds are made inside it)",
        group="--dataset hf", identity=True)
    case_column: str = flag(
        "case", "--dataset hf: the column that groups images into cases for the case-level folds (without it "
        "each image is its own case)",
        group="--dataset hf", identity=True)


DEFAULT_OPTIONS = dataclasses.asdict(HFOptions())


def dataset_options(args) -> dict:
    """The HFOptions values of ``args`` (an argparse namespace or a TrainConfig)."""
    return options_of(HFOptions, args)
