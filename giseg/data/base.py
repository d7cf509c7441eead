"""The base of the dataset adapters (``DatasetAdapter``) and the image reader they share.

An adapter owns its name, classes, the multiclass overlap priority, display colours, how to build the slice index
from a folder, how to read one image and one slice's masks, which rows form a 3D volume, and its demo generator.
Nothing outside an adapter looks at index columns to decide what the data is. registry.py lists the adapters."""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np
import pandas as pd

from giseg.data.masks import pack_masks
from giseg.utils.errors import UserError

class ScanFormatWarning(UserWarning):
    """A scan in a format other than the competition's 16-bit grayscale PNG, read anyway. Its text is the same for
    every file, so that Python's warning filter shows it once per process, not once per slice."""


def read_scan(path: str | Path, width: int | None = None, height: int | None = None) -> np.ndarray:
    """Read a scan as a (H, W) array of its raw intensities (uint16 for the competition's 16-bit PNGs).

    8-bit and RGB scans are accepted with a ScanFormatWarning (RGB is converted to gray); a file that does not
    decode, or whose size disagrees with its file name, raises UserError.
    """
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"{path}: cannot decode the image (corrupt or truncated PNG?); re-copy the file")
    if img.ndim == 3:
        warnings.warn("colour scans converted to gray (expected 16-bit grayscale)", ScanFormatWarning, stacklevel=2)
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
    if img.dtype == np.uint8:
        warnings.warn("8-bit scans (expected 16-bit): intensities are normalised per slice, so they still work",
                      ScanFormatWarning, stacklevel=2)
    if (width is not None and img.shape[1] != width) or (height is not None and img.shape[0] != height):
        raise UserError(f"{path}: image is {img.shape[1]} wide x {img.shape[0]} high but its name says "
                        f"{width} x {height}")
    return img


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
    channels: int = 1  # image channels per slice (an nnU-Net dataset's channel_names); read_image's first axis if > 1
    title: str = ""  # the dataset's full name, for model cards ("": the data folder's)
    limits: str = ""  # where a model trained on it stops being valid, for model cards ("": its name and classes)

    def build_index(self, data_dir: str | Path, split: str | None = None,
                    require_labels: bool = True) -> pd.DataFrame:
        """The slice index of ``data_dir`` (``split``: a sub-folder, where the layout has several)."""
        raise NotImplementedError

    def read_image(self, row) -> np.ndarray:
        """One index row's raw (H, W) image; (channels, H, W) for an adapter of several image channels."""
        raise NotImplementedError

    def read_masks(self, row) -> np.ndarray:
        """One labelled index row's (C, H, W) uint8 0/1 masks, at the image's size."""
        raise NotImplementedError

    def make_demo(self, out_dir: str | Path) -> Path:
        """Write a small deterministic dataset in this layout; return its folder."""
        raise NotImplementedError

    # ---- with defaults that suit most datasets
    # the HFOptions values it was bound with (data/hf/); read-only and empty for a dataset without options, so no
    # adapter can change another's through a shared default
    options: Mapping[str, object] = MappingProxyType({})

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
        """The split giseg predict reads when the user names none."""
        return None

    def read_upload(self, path: str | Path) -> tuple[np.ndarray, tuple[float, float] | None]:
        """An image file a user hands the app: (H, W) raw image and pixel spacing in mm (None: unknown)."""
        return read_scan(path), None

    def pixel_spacing(self, row) -> tuple[float, float] | None:
        """(x, y) pixel spacing of an index row in mm, or None."""
        return None
