"""Dataset adapters: everything that differs between the datasets the toolkit reads, one object per dataset.

    DATASETS["gi"]    UW-Madison GI tract, Kaggle layout (data.py): 3 organs from run-length codes
    DATASETS["lgg"]   LGG brain MRI, kaggle_3m layout (lgg.py): one class, tumor, from mask files
    DATASETS["hf"]    any image-segmentation dataset in Hugging Face ``datasets`` form (hf_data.py); its classes
                      come with the data, so ``adapter.bind(data_dir, options)`` gives the adapter of one dataset

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
from masks import IGNORE_BIT, MAX_CLASSES, pack_masks, unpack_masks
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
    options: dict = {}  # the --image_column, --label_column, --reduce_labels, --hf_split values it was bound with

    def bind(self, data_dir: str | Path | None, options: dict | None = None,
             classes: tuple[str, ...] | None = None) -> "DatasetAdapter":
        """The adapter for the data in ``data_dir`` read with ``options`` (dataset_options): the same object for
        a dataset whose classes are fixed; a new one for a generic format whose classes come with the data (or
        ``classes``, a model's, when there is no data, as in the app)."""
        return self

    def read_packed(self, row) -> np.ndarray:
        """One labelled row's (H, W) uint8 packed masks (masks.pack_masks; bit 7 set where unlabelled)."""
        return pack_masks(self.read_masks(row))

    def ignored(self, row) -> np.ndarray | None:
        """(H, W) bool: pixels of a labelled row that the ground truth leaves unlabelled (None: none are)."""
        return None

    @property
    def may_have_unlabelled(self) -> bool:
        """Whether ``read_packed`` may set the ignore bit (then the loss leaves those pixels out)."""
        return False

    def has_labels(self, index: pd.DataFrame) -> bool:
        """Whether ``index`` carries ground truth (a test layout does not)."""
        return True

    def without_labels(self, index: pd.DataFrame) -> pd.DataFrame:
        """``index`` without the ground-truth columns that the decode-once cache has made redundant (a training
        process keeps only what it reads again; nothing for most layouts)."""
        return index

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

    def without_labels(self, index):  # the run-length codes: 1.6 kB a slice, 63 MB at the competition's size
        return index.drop(columns=[f"rle_{c}" for c in self.classes if f"rle_{c}" in index])

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


class HFAdapter(DatasetAdapter):
    """Any image-segmentation dataset in Hugging Face ``datasets`` form (hf_data.py says which columns). Its
    classes come with the data, so ``bind`` returns an adapter for one dataset and one set of options."""
    name = "hf"
    description = ("any image-segmentation dataset in Hugging Face `datasets` form: a save_to_disk folder, a "
                   "parquet folder or a hub id (hf_data.py; --image_column, --label_column, --reduce_labels, "
                   "--hf_split, --case_column)")
    classes = ()
    priority = ()
    colours = {}
    volume_columns = ("case",)
    PALETTE = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange")

    def __init__(self, source=None, options=None, layout=None, ds=None):
        import hf_data

        self.source, self.options = source, {**hf_data.DEFAULT_OPTIONS, **(options or {})}
        self.layout, self._ds, self._reader = layout, ds, None
        if layout is not None:
            self.classes = self.priority = layout.classes
            self.colours = dict(zip(layout.classes, self.PALETTE))

    def bind(self, data_dir, options=None, classes=None):
        import hf_data

        options = {**hf_data.DEFAULT_OPTIONS, **(options or {})}
        if data_dir is None:
            return HFAdapter(None, options, hf_data.Layout(options["image_column"] or "image", tuple(classes or ())))
        ds = hf_data.load_split(data_dir, options["hf_split"])
        layout = hf_data.make_layout(ds.column_names, data_dir, options, classes, hf_data.read_id2label(data_dir))
        bound = HFAdapter(str(data_dir), options, layout, ds)
        if "day" in ds.column_names:
            bound.volume_columns = ("case", "day")
        return bound

    def _dataset(self, data_dir=None, split=None):
        """The bound dataset; reading other data (or another split) needs ``bind`` first."""
        if self._ds is None:
            raise UserError("--dataset hf: no dataset to read; the adapter is bound to one with "
                            "adapter.bind(data_dir, options)")
        if (data_dir is not None and str(data_dir) != self.source) or split not in (None, self.options["hf_split"]):
            raise ValueError(f"this hf adapter reads {self.source} split {self.options['hf_split']}, not {data_dir} "
                             f"split {split}: bind it to that data first")
        return self._ds

    def build_index(self, data_dir, split=None, require_labels=True):
        import hf_data

        ds = self._dataset(data_dir, split)
        if require_labels and not self.layout.labelled:
            raise UserError(f"--data_dir {data_dir}: split {self.options['hf_split']} has no ground truth column")
        return hf_data.build_hf_index(ds, self.layout, data_dir, self.options)

    def reader(self):
        import hf_data

        if self._reader is None:
            self._reader = hf_data.Reader(self._dataset(), self.layout)
        return self._reader

    def read_image(self, row):
        return self.reader().image(row)

    def read_packed(self, row):
        return self.reader().packed(row)

    def read_masks(self, row):
        return unpack_masks(self.read_packed(row), len(self.classes))

    @property
    def may_have_unlabelled(self):
        return self.layout is not None and self.layout.label is not None

    def ignored(self, row):
        if self.layout.label is None:
            return None
        return ((self.read_packed(row) >> IGNORE_BIT) & 1).astype(bool)

    def has_labels(self, index):
        return self.layout is not None and self.layout.labelled

    def fingerprint(self, index):
        import hf_data

        return hf_data.fingerprint(self._dataset(), index, self.layout, self.options)

    def make_demo(self, out_dir):
        import hf_data

        out = Path(out_dir)
        if not (out / hf_data.ID2LABEL).is_file():
            gi = GIAdapter()
            hf_data.export_dataset(gi, gi.make_demo(out.with_name(out.name + "-kaggle")), out)
        return out

    def pixel_spacing(self, row):
        x, y = getattr(row, "spacing_x", None), getattr(row, "spacing_y", None)
        return None if x is None or y is None else (float(x), float(y))


DATASETS: dict[str, DatasetAdapter] = {"gi": GIAdapter(), "lgg": LGGAdapter(), "hf": HFAdapter()}


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
