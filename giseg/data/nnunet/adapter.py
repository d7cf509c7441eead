"""--dataset nnunet: the dataset adapter of an nnU-Net raw dataset (NIfTI volumes, classes from dataset.json)."""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from giseg.data.base import DatasetAdapter, hash_files
from giseg.data.gi import GIAdapter
from giseg.data.masks import IGNORE_BIT, MAX_CLASSES, unpack_masks
from giseg.data.nnunet.dataset_json import (
    DATASET_JSON,
    PALETTE,
    SPLITS,
    channel_names,
    ignore_value,
    label_table,
    overlap_priority,
    parse_labels,
    read_dataset_json,
)
from giseg.data.nnunet.export import export_nnunet
from giseg.data.nnunet.index import build_nnunet_index, channel_path
from giseg.data.nifti import cut, load_nifti
from giseg.utils.errors import UserError


class VolumeMemo:
    """The last few volumes read, decoded once each: the cache builder reads a volume's slices one after another
    (from several threads), and a NIfTI file is decompressed whole."""

    def __init__(self, size: int = 3):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, path: str) -> np.ndarray:
        with self.lock:  # one decoder per volume: the threads waiting on it use its result
            if path in self.items:
                self.items.move_to_end(path)
                return self.items[path]
            arr, _ = load_nifti(path)
            self.items[path] = arr
            while len(self.items) > self.size:
                self.items.popitem(last=False)
            return arr


class NnUNetAdapter(DatasetAdapter):
    """An nnU-Net raw dataset; its classes come from dataset.json, so ``bind`` gives the adapter of one folder."""
    name = "nnunet"
    description = ("an nnU-Net raw dataset: dataset.json, imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz "
                   "(NIfTI, one or more channels; classes and regions from dataset.json; data/nnunet/)")
    classes = ()
    priority = ()
    colours = {}
    volume_columns = ("case", "day")

    def __init__(self, root: Path | None = None, meta: dict | None = None, classes=None, values=None, priority=None,
                 channels: int = 1, ignore: int | None = None):
        self.root, self.meta, self.channels, self.ignore = root, meta or {}, channels, ignore
        self.values = values or ()
        if classes:
            self.classes = tuple(classes)
            self.priority = tuple(priority or classes)
            self.colours = dict(zip(self.classes, PALETTE * (1 + len(self.classes) // len(PALETTE))))
            self.title = self.meta.get("name", "") or ""
        self._lut = label_table(self.values, ignore) if self.values else None
        self._images, self._labels = VolumeMemo(3 * channels), VolumeMemo()

    def bind(self, data_dir, options=None, classes=None):
        if data_dir is None:  # a model's classes, no data (predicting on NIfTI / DICOM files, the app)
            return NnUNetAdapter(None, {}, classes or ())
        root = Path(data_dir)
        meta = read_dataset_json(root)
        names, values = parse_labels(meta["labels"], str(root / DATASET_JSON))
        if len(names) > MAX_CLASSES:
            raise UserError(f"{root / DATASET_JSON}: {len(names)} classes; this toolkit takes 1 to {MAX_CLASSES}")
        if classes is not None and tuple(classes) != names:
            raise UserError(f"{root / DATASET_JSON}: its classes {list(names)} are not the model's {list(classes)}")
        return NnUNetAdapter(root, meta, names, values, overlap_priority(names, values),
                             len(channel_names(meta)), ignore_value(meta["labels"], str(root / DATASET_JSON)))

    def _bound(self, data_dir=None) -> Path:
        if self.root is None:
            raise UserError("--dataset nnunet: no dataset to read; bind the adapter to a folder first")
        if data_dir is not None and Path(data_dir) != self.root:
            raise ValueError(f"this nnunet adapter reads {self.root}, not {data_dir}: bind it to that folder first")
        return self.root

    def build_index(self, data_dir, split=None, require_labels=True):
        return build_nnunet_index(self._bound(data_dir), self.meta, split or "train", require_labels)

    def read_image(self, row):
        if self.channels == 1:
            return cut(self._images.get(row.path), int(row.axis), int(row.slice) - 1)
        return np.stack([cut(self._images.get(str(channel_path(row.path, m))), int(row.axis), int(row.slice) - 1)
                         for m in range(self.channels)])

    def read_packed(self, row):
        lab = cut(self._labels.get(row.label_path), int(row.axis), int(row.slice) - 1)
        if lab.dtype.kind == "f":
            if not (np.isfinite(lab).all() and (lab == np.round(lab)).all()):
                raise UserError(f"{row.label_path}: fractional label values such as "
                                f"{float(lab[lab != np.round(lab)].flat[0])!r}; a label map holds integers (resampled "
                                "with linear interpolation? use nearest neighbour)")
        lab = lab.astype(np.int64)
        lut = self._lut
        outside = (lab < 0) | (lab >= len(lut))
        packed = lut[np.where(outside, 0, lab)]
        unknown = outside | (packed == 0xFF)
        if unknown.any():
            raise UserError(f"{row.label_path}: label value(s) {sorted(np.unique(lab[unknown]).tolist())[:5]} are "
                            f"not in dataset.json's labels {self.meta.get('labels')} (slice {int(row.slice)})")
        return packed

    def read_masks(self, row):
        return unpack_masks(self.read_packed(row), len(self.classes))

    @property
    def may_have_unlabelled(self):
        return self.ignore is not None  # dataset.json's "ignore" label (nnU-Net v2)

    def ignored(self, row):
        if self.ignore is None:
            return None
        return ((self.read_packed(row) >> IGNORE_BIT) & 1).astype(bool)

    def has_labels(self, index):
        return "label_path" in index

    def fingerprint(self, index):
        h = hashlib.sha256(super().fingerprint(index).encode())
        h.update(json.dumps(self.meta, sort_keys=True).encode())
        files = [channel_path(p, m) for p in sorted(set(index["path"])) for m in range(1, self.channels)]
        files += sorted(set(index["label_path"])) if "label_path" in index else []
        return hash_files(h, files)

    def inference_split(self, data_dir):
        return "test" if (Path(data_dir) / SPLITS["test"]).is_dir() else "train"

    def pixel_spacing(self, row):
        return float(row.spacing_x), float(row.spacing_y)

    def make_demo(self, out_dir):
        out = Path(out_dir)
        if not (out / DATASET_JSON).is_file():
            gi = GIAdapter()
            export_nnunet(gi, gi.make_demo(out.with_name(out.name + "-kaggle")), out)
        return out
