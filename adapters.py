"""Dataset adapters: everything that differs between the datasets the toolkit reads, one object per dataset.

    DATASETS["gi"]    UW-Madison GI tract, Kaggle layout (data.py): 3 organs from run-length codes
    DATASETS["lgg"]   LGG brain MRI, kaggle_3m layout (lgg.py): one class, tumor, from mask files

An adapter owns its name, classes, the multiclass overlap priority, display colours, how to build the slice
index from a folder, how to read one image and one slice's masks, which rows form a 3D volume, and its demo
generator. Nothing outside an adapter looks at index columns to decide what the data is. To add a dataset,
subclass ``DatasetAdapter`` and put an instance in ``DATASETS``: the trainer, predict.py, score.py,
visualise.py and the app take it from there (``--dataset`` choices come from this dict).

An index is a DataFrame with one row per slice and at least the columns ``id`` (unique), ``case`` (the unit
of the case-level folds), the ``volume_columns`` (rows sharing them form one volume, ordered by ``slice``),
``slice``, ``width``, ``height`` and ``path``; an adapter adds what its readers need.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

import data
import lgg
from demo_data import make_demo_data
from masks import MAX_CLASSES
from utils import UserError


def hash_files(h, paths) -> str:
    """Add each file's path, size and modification time to the hash ``h``; return its hex digest."""
    for path in paths:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class DatasetAdapter:
    """Base of the adapters; subclasses set the attributes and implement the four readers/writers."""
    name: str
    description: str  # one line for --help
    classes: tuple[str, ...]
    priority: tuple[str, ...]  # --task multiclass: where classes overlap, the first of these wins
    colours: dict[str, str]  # class -> colour name (matplotlib / CSS), used by figures and the app
    volume_columns: tuple[str, ...] = ("case", "day")

    def build_index(self, data_dir: str | Path, split: str | None = None,
                    require_labels: bool = True) -> pd.DataFrame:
        """The slice index of ``data_dir`` (``split``: a sub-folder, where the layout has several)."""
        raise NotImplementedError

    def read_image(self, row) -> np.ndarray:
        """One index row's raw (H, W) image."""
        raise NotImplementedError

    def read_masks(self, row) -> np.ndarray:
        """One labelled index row's (C, H, W) uint8 0/1 masks, at the image's size."""
        raise NotImplementedError

    def make_demo(self, out_dir: str | Path) -> Path:
        """Write a small deterministic dataset in this layout; return its folder."""
        raise NotImplementedError

    # ---- with defaults that suit most datasets
    def has_labels(self, index: pd.DataFrame) -> bool:
        """Whether ``index`` carries ground truth (a test layout does not)."""
        return True

    def presence(self, index: pd.DataFrame) -> pd.DataFrame:
        """(slices x classes) booleans: does the ground truth show the class?"""
        shown = [self.read_masks(r).reshape(len(self.classes), -1).any(1) for r in index.itertuples()]
        return pd.DataFrame(shown, columns=list(self.classes), index=index.index, dtype=bool)

    def fingerprint(self, index: pd.DataFrame) -> str:
        """What the decode-once cache depends on: the index's contents and each image file's size and time."""
        h = hashlib.sha256(pd.util.hash_pandas_object(index, index=False).to_numpy().tobytes())
        return hash_files(h, index["path"])

    def inference_split(self, data_dir: str | Path) -> str | None:
        """The split predict.py reads when the user names none."""
        return None

    def read_upload(self, path: str | Path) -> tuple[np.ndarray, tuple[float, float] | None]:
        """An image file a user hands the app: (H, W) raw image and pixel spacing in mm (None: unknown)."""
        return data.read_scan(path), None

    def pixel_spacing(self, row) -> tuple[float, float] | None:
        """(x, y) pixel spacing of an index row in mm, or None."""
        return None


class GIAdapter(DatasetAdapter):
    name = "gi"
    description = "UW-Madison GI tract (3 organs; Kaggle layout with train.csv + train/)"
    classes = data.GI_CLASSES
    priority = data.GI_PRIORITY
    colours = {"large_bowel": "red", "small_bowel": "green", "stomach": "blue"}

    def build_index(self, data_dir, split=None, require_labels=True):
        split = split or "train"
        labels = require_labels or (split == "train" and (Path(data_dir) / "train.csv").is_file())
        return data.build_index(data_dir, split, labels=labels)

    def read_image(self, row):
        return data.read_scan(row.path, row.width, row.height)

    def read_masks(self, row):
        return data.read_gi_masks(row)

    def make_demo(self, out_dir):
        return make_demo_data(out_dir)

    def has_labels(self, index):
        return f"rle_{self.classes[0]}" in index

    def presence(self, index):
        return pd.DataFrame({c: index[f"rle_{c}"].astype(str).str.len() > 0 for c in self.classes})

    def inference_split(self, data_dir):
        return "test" if (Path(data_dir) / "test").is_dir() else "train"

    def read_upload(self, path):
        m = data.SCAN_RE.match(Path(path).name)
        return data.read_scan(path), ((float(m.group(4)), float(m.group(5))) if m else None)

    def pixel_spacing(self, row):
        return float(row.spacing_x), float(row.spacing_y)


class LGGAdapter(DatasetAdapter):
    name = "lgg"
    description = "LGG brain MRI (one class, tumor; the kaggle_3m folder; see lgg.py)"
    classes = lgg.LGG_CLASSES
    priority = lgg.LGG_CLASSES
    colours = {"tumor": "yellow"}
    volume_columns = ("case",)

    def build_index(self, data_dir, split=None, require_labels=True):
        return lgg.build_lgg_index(data_dir)

    def read_image(self, row):
        return lgg.read_lgg_scan(row.path, row.width, row.height)

    def read_masks(self, row):
        return lgg.read_lgg_mask(row.mask_path)

    def make_demo(self, out_dir):
        return lgg.make_lgg_demo(out_dir)

    def fingerprint(self, index):
        return hash_files(hashlib.sha256(super().fingerprint(index).encode()), index["mask_path"])

    def read_upload(self, path):
        return lgg.read_lgg_scan(path), None


DATASETS: dict[str, DatasetAdapter] = {"gi": GIAdapter(), "lgg": LGGAdapter()}


def get_adapter(name: str, where: str = "--dataset") -> DatasetAdapter:
    """The registered adapter ``name``; an unknown name is a UserError naming the choices."""
    if name not in DATASETS:
        raise UserError(f"{where}: unknown dataset {name!r}; registered: {', '.join(DATASETS)}")
    adapter = DATASETS[name]
    if len(adapter.classes) > MAX_CLASSES or sorted(adapter.priority) != sorted(adapter.classes):
        raise UserError(f"dataset {name!r}: at most {MAX_CLASSES} classes (one bit each in the packed masks), and its "
                        "priority must list each class once")
    return adapter


def datasets_help() -> str:
    return "; ".join(f"{a.name}: {a.description}" for a in DATASETS.values())
