"""Submission rows (id, class, run-length code at original size) from a model or an ensemble."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from giseg.data.rle import encode_rle
from giseg.inference.ensemble import Ensemble
from giseg.utils.files import atomic_write_text


def predict_rows(model: Ensemble, index: pd.DataFrame, rows: np.ndarray, inputs: list[tuple],
                 volume_columns: tuple[str, ...], batch_size: int = 16, mixed_precision: str = "no", tta: bool = False,
                 num_workers: int = 0) -> pd.DataFrame:
    """Submission rows (id, class, predicted) for ``rows`` of ``index``, in index order; ``inputs`` are the
    members' (cache, neighbours) (Ensemble.inputs)."""
    ids = index["id"].to_numpy()
    classes = model.spec.classes
    out = [(ids[r], name, encode_rle(masks[c]))
           for r, masks in model.iter_masks(index, rows, inputs, volume_columns, batch_size, mixed_precision, tta,
                                            num_workers)
           for c, name in enumerate(classes)]
    return pd.DataFrame(out, columns=["id", "class", "predicted"])


SUBMISSION_HEADER = "id,class,predicted"


def write_submission(df: pd.DataFrame, path: str | Path) -> None:
    atomic_write_text(path, df.to_csv(index=False))
