"""nnU-Net raw datasets (``--dataset nnunet``): NIfTI volumes sliced for the 2D / 2.5D models; and the writer of one.

    <data_dir>/dataset.json                   labels, channel_names, file_ending (nnU-Net v2; v1's "modality" too)
    <data_dir>/imagesTr/<case>_0000.nii.gz    the scan, one file per channel
    <data_dir>/labelsTr/<case>.nii.gz         its integer label map: the scan's shape and affine
    <data_dir>/imagesTs/<case>_0000.nii.gz    optional, unlabelled: what giseg predict reads when it is there

The format of the Medical Segmentation Decathlon, AMOS, KiTS and TotalSegmentator's exports. Read with nibabel,
imported when an nnU-Net folder is read (pip install -e ".[medical]").

- **Classes** are the non-background entries of ``labels``, in their order. A plain entry (``"liver": 1``) is the
  voxels of that value; a region (``"tumor core": [2, 3]``, nnU-Net's region-based training) the voxels of any of
  its values, so regions overlap and the classes are multi-label. ``--task multiclass`` resolves overlaps as nnU-Net
  writes a label map from regions: the later region wins.
  A label value in a file that no entry names is an error, as is a label map of fractional values.
- **Slices** are cut across the through-plane axis: the one with the largest voxel spacing (nnU-Net's 2D
  configuration; the last axis when they tie); ``"slice_axis": 0|1|2`` in dataset.json overrides it. A slice is the
  voxel array with its two in-plane axes as (H, W) = (second, first), as viewers show an axial slice; numbered from
  1 along the axis. Its ``id`` is ``<case>_slice_<SSSS>``; the spacing (x, y, through-plane) is in the index.
- **Cases**: each file is a volume and, by default, its own case of the case-level folds. Scans of one patient on
  several days would then be split across folds; ``"case_pattern"`` in dataset.json, a regular expression over the
  file's case name with a group ``case`` (the patient) and optionally ``day``, groups them
  (``"^case(?P<case>\\d+)_day(?P<day>\\d+)$"`` is what ``export_nnunet`` writes for the GI data).
- **Channels**: one channel (``channel_names`` with one entry) is the single-channel path of every dataset: the
  slice repeated to the model's channels, or ``--context_slices`` neighbours (2.5D). Several (``<case>_0000``,
  ``<case>_0001``, ... on one grid: T1 and T2, multi-parametric MRI) are the model's input channels, each slice's
  channels in turn (times ``--context_slices`` neighbours), through the input widening of the 2.5D context
  (models/widen.py); each channel is normalised on its own.
- **Intensities** are normalised per slice (0.5th to 99.5th percentile), as for the GI scans.

    giseg demo-data --dataset nnunet --out demo/nnunet     # the GI demo written in this format
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from giseg.data.base import DatasetAdapter, hash_files
from giseg.data.masks import MAX_CLASSES, class_name_problems, pack_masks, unpack_masks
from giseg.utils.errors import UserError
from giseg.utils.files import atomic_dir
from giseg.utils.log import logger

DATASET_JSON = "dataset.json"
ENDING = ".nii.gz"
SPLITS = {"train": "imagesTr", "test": "imagesTs"}  # --split names (and the folder names themselves)
PALETTE = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange")
AFFINE_TOLERANCE = 1e-3  # mm: a label's affine may differ from its image's by rounding, not by a voxel


def import_nibabel():
    try:
        import nibabel
    except ImportError:
        raise UserError("--dataset nnunet reads NIfTI with nibabel: pip install -e \".[medical]\" (or pip install "
                        "nibabel)") from None
    return nibabel


# ---------------------------------------------------------------- dataset.json
def read_dataset_json(root: Path) -> dict:
    """dataset.json of the folder ``root``, checked: labels with a background of 0, channels numbered 0, 1 ..., a NIfTI file ending."""
    path = root / DATASET_JSON
    if not root.is_dir():
        raise UserError(f"--data_dir {root} does not exist; pass an nnU-Net dataset folder (dataset.json, imagesTr/, "
                        "labelsTr/)")
    if not path.is_file():
        raise UserError(f"{path} not found: an nnU-Net dataset folder holds dataset.json (labels, channel_names, "
                        "file_ending) beside imagesTr/ and labelsTr/")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        raise UserError(f'{path}: no "labels" object; expected e.g. "labels": {{"background": 0, "liver": 1}}')
    channels = channel_names(meta)
    if not isinstance(channels, dict) or not channels:
        raise UserError(f'{path}: "channel_names" must be an object like {{"0": "MRI"}}')
    if sorted(channels, key=str) != [str(m) for m in range(len(channels))]:
        raise UserError(f'{path}: "channel_names" keys must be "0", "1", ... (the files\' _0000, _0001 ...), got '
                        f"{list(channels)}")
    ending = meta.get("file_ending", ENDING)
    if ending not in (".nii.gz", ".nii"):
        raise UserError(f'{path}: "file_ending" {ending!r}: this toolkit reads NIfTI (.nii.gz or .nii)')
    axis = meta.get("slice_axis")
    if axis is not None and axis not in (0, 1, 2):
        raise UserError(f'{path}: "slice_axis" must be 0, 1 or 2 (the voxel axis to cut across), got {axis!r}')
    pattern = meta.get("case_pattern")
    if pattern is not None:
        try:
            if "case" not in re.compile(pattern).groupindex:
                raise re.error("no group named 'case'")
        except (re.error, TypeError) as e:
            raise UserError(f'{path}: "case_pattern" {pattern!r} is not a regular expression with a group (?P<case>...) '
                            f"({e})") from None
    return meta


def channel_names(meta: dict):
    """dataset.json's channels: ``channel_names`` (v2), ``modality`` (v1), or one unnamed channel."""
    return meta.get("channel_names", meta.get("modality", {"0": "image"}))


def parse_labels(labels: dict, where: str) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """dataset.json's labels as (class names, the label values of each class), background left out."""
    classes, values = [], []
    for name, value in labels.items():
        vals = value if isinstance(value, list) else [value]
        if not vals or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
            raise UserError(f"{where}: label {name!r} is {value!r}; a label is a non-negative integer or a list of "
                            "them (a region)")
        if name == "background" or vals == [0]:
            if vals != [0]:
                raise UserError(f"{where}: background must be label 0, got {value!r}")
            continue
        if 0 in vals:
            raise UserError(f"{where}: label {name!r} includes 0, the background")
        classes.append(name)
        values.append(tuple(vals))
    if not classes:
        raise UserError(f"{where}: labels name no class besides the background")
    bad = class_name_problems(classes)
    if bad:
        raise UserError(f"{where}: {bad[0]}")
    return tuple(classes), tuple(values)


def overlap_priority(classes: tuple[str, ...], values: tuple[tuple[int, ...], ...]) -> tuple[str, ...]:
    """Where classes overlap, the one that wins in --task multiclass: the later region of dataset.json, as nnU-Net
    writes a label map from regions (plain labels never overlap: their order then)."""
    return tuple(reversed(classes)) if any(len(v) > 1 for v in values) else tuple(classes)


def label_table(values: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """label value -> packed byte (bit c: class c); 0xFF: a value no class names (background 0 -> 0)."""
    lut = np.full(max(max(v) for v in values) + 1, 0xFF, np.uint8)
    lut[0] = 0
    for c, vals in enumerate(values):
        for v in vals:
            lut[v] = (0 if lut[v] == 0xFF else lut[v]) | (1 << c)
    return lut


# ---------------------------------------------------------------- volumes
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


def load_nifti(path: str | Path):
    """(voxel array, nibabel image) of a NIfTI file, a 4D file of one volume as 3D; one line when it cannot be read."""
    nib = import_nibabel()
    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 -- nibabel raises many kinds; each is the file's fault
        raise UserError(f"{path}: cannot read the NIfTI file ({type(e).__name__}: {e}); re-copy it") from None
    return (arr[..., 0] if arr.ndim == 4 and arr.shape[3] == 1 else arr), img


def voxel_spacing(header) -> tuple[float, float, float]:
    """The voxel spacing of a NIfTI header, in mm. NIfTI stores it as float32: its shortest decimal (1.63, not
    1.6299999952316284)."""
    return tuple(float(str(np.float32(z))) for z in header.get_zooms()[:3])


def header_of(path: Path) -> tuple[tuple[int, ...], np.ndarray, tuple[float, ...]]:
    """(shape, affine, voxel spacing) of a NIfTI file from its header (the voxels are not read)."""
    nib = import_nibabel()
    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise UserError(f"{path}: a {len(shape)}D image {shape}; expected a 3D volume (one file per channel)")
    return shape, img.affine, voxel_spacing(img.header)


def through_plane_axis(spacing: tuple[float, ...]) -> int:
    """The axis of the largest voxel spacing (the last of equal ones): nnU-Net's 2D slicing axis."""
    return int(2 - np.argmax(np.asarray(spacing[::-1]) >= max(spacing) - 1e-6))


def in_plane(axis: int) -> tuple[int, int]:
    """The voxel axes of a slice's width and height."""
    p, q = (a for a in range(3) if a != axis)
    return p, q


def cut(volume: np.ndarray, axis: int, k: int) -> np.ndarray:
    """Slice ``k`` (0-based) across ``axis`` as (H, W): height along the second in-plane axis, width the first."""
    return np.ascontiguousarray(np.take(volume, k, axis=axis).T)


# ---------------------------------------------------------------- the index
def channel_path(path: str | Path, m: int) -> Path:
    """Channel ``m``'s file of the case whose channel-0 file is ``path`` (<case>_0000<ending>)."""
    path = Path(path)
    stem, _, ending = path.name.rpartition("_0000.")
    return path.with_name(f"{stem}_{m:04d}.{ending}")


def case_names(folder: Path, ending: str) -> list[str]:
    return sorted(f.name[:-len("_0000" + ending)] for f in folder.glob(f"*_0000{ending}"))


def case_numbers(names: list[str], pattern: str | None, where: str) -> tuple[list[int], list[int]]:
    """(case, day) of each file's case name: by ``pattern`` (groups case and day), else one case per file."""
    if pattern is None:
        return list(range(len(names))), [0] * len(names)
    rx = re.compile(pattern)
    found = [rx.fullmatch(n) for n in names]
    if None in found:
        raise UserError(f'{where}: "case_pattern" {pattern!r} does not match the case {names[found.index(None)]!r}')
    cases = [m.group("case") for m in found]
    days = [int(m.group("day")) if "day" in rx.groupindex and m.group("day") else 0 for m in found]
    if all(c.isdigit() for c in cases):
        return [int(c) for c in cases], days
    order = {c: i for i, c in enumerate(sorted(set(cases)))}
    return [order[c] for c in cases], days


def build_nnunet_index(root: Path, meta: dict, split: str, require_labels: bool) -> pd.DataFrame:
    """One row per slice of every volume under ``root/<split>``: id, case, day, slice, width, height, spacing_x/y/z,
    axis, path and (labelled) label_path. Headers only: shapes and affines are checked before any voxel is read."""
    ending = meta.get("file_ending", ENDING)
    folder = root / SPLITS.get(split, split)
    if not folder.is_dir():
        raise UserError(f"{folder} not found: an nnU-Net dataset keeps its scans in imagesTr/ (and imagesTs/)")
    names = case_names(folder, ending)
    if not names:
        raise UserError(f"no <case>_0000{ending} files in {folder} (dataset.json's file_ending is {ending!r})")
    labels_dir = root / ("labelsTr" if folder.name == "imagesTr" else folder.name.replace("images", "labels"))
    # labels are read when training asks for them, or when every case has its own (scoring, tuning)
    labelled = require_labels or all((labels_dir / f"{n}{ending}").is_file() for n in names)
    cases, days = case_numbers(names, meta.get("case_pattern"), str(root / DATASET_JSON))
    rows = []
    n_channels = len(channel_names(meta))
    for name, case, day in zip(names, cases, days):
        image = folder / f"{name}_0000{ending}"
        shape, affine, spacing = header_of(image)
        for m in range(1, n_channels):
            other = channel_path(image, m)
            if not other.is_file():
                raise UserError(f"{image}: its channel {m} file {other.name} is missing (dataset.json names "
                                f"{n_channels} channels)")
            oshape, oaffine, _ = header_of(other)
            if oshape != shape or not np.allclose(oaffine, affine, atol=AFFINE_TOLERANCE):
                raise UserError(f"{other}: channel {m} is not on the grid of {image.name} (shape {oshape} vs {shape}, "
                                "or another affine); the channels of a case must match voxel for voxel")
        label = labels_dir / f"{name}{ending}"
        if labelled:
            if not label.is_file():
                raise UserError(f"{image}: no label map {label}; a training case needs its labels (predicting on "
                                "unlabelled scans needs none: giseg predict)")
            lshape, laffine, _ = header_of(label)
            if lshape != shape:
                raise UserError(f"{label}: label map of shape {lshape}, its image {image.name} {shape}; they must "
                                "match voxel for voxel")
            if not np.allclose(laffine, affine, atol=AFFINE_TOLERANCE):
                raise UserError(f"{label}: its affine differs from its image's ({image.name}) by up to "
                                f"{np.abs(laffine - affine).max():.4g} mm; the label map must lie on the image's grid "
                                "(resample it onto the image)")
        axis = meta.get("slice_axis", through_plane_axis(spacing))
        p, q = in_plane(axis)
        for k in range(shape[axis]):
            rows.append({"id": f"{name}_slice_{k + 1:04d}", "case": case, "day": day, "slice": k + 1,
                         "width": shape[p], "height": shape[q], "spacing_x": spacing[p], "spacing_y": spacing[q],
                         "spacing_z": spacing[axis], "axis": axis, "case_name": name, "path": str(image),
                         **({"label_path": str(label)} if labelled else {})})
    index = pd.DataFrame(rows)
    dup = index.duplicated(["case", "day", "slice"])
    if dup.any():
        first = index.loc[dup, "case_name"].iloc[0]
        raise UserError(f'{root / DATASET_JSON}: "case_pattern" gives {first!r} the same case and day as another file; '
                        "add a day group, or drop the pattern")
    return index.sort_values(["case", "day", "slice"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------- the adapter
class NnUNetAdapter(DatasetAdapter):
    """An nnU-Net raw dataset; its classes come from dataset.json, so ``bind`` gives the adapter of one folder."""
    name = "nnunet"
    description = ("an nnU-Net raw dataset: dataset.json, imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz "
                   "(NIfTI, one or more channels; classes and regions from dataset.json; data/nnunet.py)")
    classes = ()
    priority = ()
    colours = {}
    volume_columns = ("case", "day")

    def __init__(self, root: Path | None = None, meta: dict | None = None, classes=None, values=None, priority=None,
                 channels: int = 1):
        self.root, self.meta, self.channels = root, meta or {}, channels
        self.values = values or ()
        if classes:
            self.classes = tuple(classes)
            self.priority = tuple(priority or classes)
            self.colours = dict(zip(self.classes, PALETTE * (1 + len(self.classes) // len(PALETTE))))
            self.title = self.meta.get("name", "") or ""
        self._lut = label_table(self.values) if self.values else None
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
                             len(channel_names(meta)))

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
        from giseg.data.gi import GIAdapter

        out = Path(out_dir)
        if not (out / DATASET_JSON).is_file():
            gi = GIAdapter()
            export_nnunet(gi, gi.make_demo(out.with_name(out.name + "-kaggle")), out)
        return out


# ---------------------------------------------------------------- out: any adapter's data as an nnU-Net dataset
def export_nnunet(adapter: DatasetAdapter, data_dir: str | Path, out_dir: str | Path, split: str | None = None,
                  slice_thickness: float = 3.0) -> int:
    """Write ``adapter``'s data in ``data_dir`` as an nnU-Net raw dataset at ``out_dir`` (atomically): one NIfTI
    volume per volume of the index (its slices stacked along the last axis, which must number 1..n without a gap),
    the masks as a label map whose value is the packed class bits, so overlapping classes survive as nnU-Net regions
    (``"large_bowel": [1, 3, 5, 7]``, ...; where they overlap, nnU-Net and --task multiclass on the export let the
    later class win, which may differ from ``adapter.priority``). The spacing is the index's (``slice_thickness`` across slices);
    ``case_pattern`` keeps the adapter's cases and days. Returns the number of volumes."""
    nib = import_nibabel()
    index = adapter.build_index(data_dir, split)
    n = len(adapter.classes)
    regions = {c: [v for v in range(1, 1 << n) if v & (1 << k)] for k, c in enumerate(adapter.classes)}
    meta = {"name": adapter.title or adapter.name, "description": f"giseg export of {data_dir} ({adapter.name})",
            "channel_names": {"0": "MRI"}, "labels": {"background": 0, **regions},
            "regions_class_order": [1 << k for k in range(n)],
            "file_ending": ENDING, "case_pattern": r"^case(?P<case>\d+)_day(?P<day>\d+)$"}
    count = 0
    with atomic_dir(out_dir) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for key, vol in index.groupby(["case", *(["day"] if "day" in index else [])], sort=True):
            case, day = (key[0], key[1]) if len(key) == 2 else (key[0], 0)
            vol = vol.sort_values("slice")
            if list(vol["slice"]) != list(range(1, len(vol) + 1)):
                raise UserError(f"{data_dir}: volume case {case} day {day} has slices {list(vol['slice'])[:6]}...; a "
                                "NIfTI volume needs them numbered 1..n without a gap")
            rows = list(vol.itertuples())
            image = np.stack([adapter.read_image(r).T for r in rows], axis=-1)  # (W, H, Z): x, y, slice
            label = np.stack([pack_masks(adapter.read_masks(r)).T for r in rows], axis=-1)
            spacing = adapter.pixel_spacing(rows[0]) or (1.0, 1.0)
            affine = np.diag([spacing[0], spacing[1], slice_thickness, 1.0])
            name = f"case{int(case)}_day{int(day)}"
            for arr, path in ((image, tmp / "imagesTr" / f"{name}_0000{ENDING}"),
                              (label, tmp / "labelsTr" / f"{name}{ENDING}")):
                img = nib.Nifti1Image(arr, affine)
                img.header.set_xyzt_units("mm")
                nib.save(img, str(path))
            count += 1
        meta["numTraining"] = count
        (tmp / DATASET_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    logger.info("wrote %d volumes of %s (%s) as an nnU-Net dataset in %s", count, data_dir, adapter.name, out_dir)
    return count
