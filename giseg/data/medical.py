"""Scans that come as volumes, for giseg predict --input: NIfTI files and DICOM series, each one ``Volume``.

    giseg predict --model runs/<name>/best --input scan.nii.gz --out predictions/
    giseg predict --model runs/<name>/best --input <folder of .nii.gz files> --out predictions/
    giseg predict --model runs/<name>/best --input <one DICOM series folder> --out predictions/

A volume is its voxel array (I, J, K) with NIfTI's convention (i along a row of the image, j down its columns, k the
slice), the affine from voxel to RAS millimetres, and, for DICOM, each slice's identity (the UIDs an RT-Struct
refers to). ``VolumeAdapter`` serves one volume to the prediction path as an index of its slices across the
through-plane axis (data/nifti.py's rule; a DICOM series' own slices), so ensembles, TTA, tuned thresholds, gates
and post-processing apply as on a dataset folder. nibabel and pydicom are imported only here, when used.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from giseg.data.base import DatasetAdapter, hash_files
from giseg.data.nifti import cut, in_plane, load_nifti, through_plane_axis, voxel_spacing
from giseg.utils.errors import UserError

NIFTI_ENDINGS = (".nii.gz", ".nii")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def import_pydicom():
    try:
        import pydicom
    except ImportError:
        raise UserError("DICOM input needs pydicom: pip install -e \".[medical]\" (or pip install pydicom)") from None
    return pydicom


@dataclass
class DicomSlice:
    """What an RT-Struct needs of one image of the series."""
    sop_class_uid: str
    sop_instance_uid: str
    position: np.ndarray  # ImagePositionPatient (LPS mm): the centre of its first pixel


@dataclass
class DicomSeries:
    """The series' identity and geometry, for an RT-Struct that refers to it."""
    slices: list[DicomSlice]  # in volume order (k)
    row_dir: np.ndarray  # LPS direction of increasing column index (i)
    col_dir: np.ndarray  # LPS direction of increasing row index (j)
    spacing: tuple[float, float]  # (between columns, between rows) in mm
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient: dict = field(default_factory=dict)  # PatientName, PatientID, ... copied into the RT-Struct


@dataclass
class Volume:
    name: str  # the output's file stem
    array: np.ndarray  # (I, J, K) voxels
    affine: np.ndarray  # 4 x 4, voxel -> RAS mm
    spacing: tuple[float, float, float]  # mm along i, j, k
    axis: int  # the axis slices are cut across
    sources: list[Path]  # the files it was read from
    header: object | None = None  # the NIfTI header (the output keeps its geometry), None for DICOM
    dicom: DicomSeries | None = None
    more: tuple[np.ndarray, ...] = ()  # the image's other channels (<case>_0001 ...), on the same grid


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_ENDINGS)


def nifti_stem(path: Path) -> str:
    """The case name of a NIfTI file: without its ending and without nnU-Net's first-channel suffix _0000, so the
    prediction of imagesTs/la_003_0000.nii.gz is la_003.nii.gz, as nnU-Net names it. Only _0000 goes (a case's
    other channels are read with it): scan_2023.nii.gz stays scan_2023, so no two inputs share a name by it."""
    name = path.name
    stem = name[:-len(next(e for e in NIFTI_ENDINGS if name.endswith(e)))]
    return stem.removesuffix("_0000")


def volume_name(paths: list[Path]) -> str:
    """The name of an input's outputs (<out>/<name>.nii.gz, <name>_rtstruct.dcm): a DICOM series' folder name, or
    a NIfTI case name (nifti_stem); a name that would be empty or hidden is refused with one line."""
    path = paths[0]
    name = path.resolve().name if path.is_dir() else nifti_stem(path)
    if not name or name.startswith("."):
        raise UserError(f"--input {path}: its name gives the outputs no visible name ({name or 'empty'!r}); rename "
                        "it (e.g. <case>_0000.nii.gz, or a series folder named after the patient)")
    return name


def read_nifti(path: Path) -> Volume:
    arr, img = load_nifti(path)
    if arr.ndim != 3:
        raise UserError(f"{path}: a {arr.ndim}D image {arr.shape}; expected one 3D scan")
    spacing = voxel_spacing(img.affine)
    return Volume(volume_name([path]), arr, img.affine, spacing, through_plane_axis(spacing), [path], img.header)


def is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


NOT_IMAGES = ("RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "SEG", "REG")  # objects written beside a series
PLACEMENT = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
             "SeriesInstanceUID", "SOPInstanceUID")


def dicom_headers(folder: Path) -> list:
    """(file, header) of every image of the one series in ``folder``; what cannot be one plane of it refused."""
    pydicom = import_pydicom()
    files = sorted(f for f in folder.iterdir() if f.is_file() and is_dicom(f))
    if not files:
        raise UserError(f"--input {folder}: no DICOM files (with the DICM preamble) in this folder")
    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{f}: not a readable DICOM file ({type(e).__name__}: {e})") from None
        if getattr(ds, "Modality", "") in NOT_IMAGES:
            continue  # not an image of the series (an RT-Struct written beside it, ...)
        missing = [k for k in PLACEMENT if k not in ds]
        if missing:
            raise UserError(f"{f}: an image without {', '.join(missing)}; cannot place it in a volume")
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise UserError(f"{f}: an enhanced (multi-frame) image of {ds.NumberOfFrames} frames; export the series as "
                            "one file per slice (classic DICOM) and pass that folder")
        if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
            raise UserError(f"{f}: {ds.SamplesPerPixel} samples per pixel ({getattr(ds, 'PhotometricInterpretation', '')}"
                            "); a scan for segmentation has one (greyscale)")
        headers.append((f, ds))
    if not headers:
        raise UserError(f"--input {folder}: its DICOM files hold no images (only {ds.Modality} objects)")
    series = sorted({ds.SeriesInstanceUID for _, ds in headers})
    if len(series) > 1:
        counts = {s: sum(ds.SeriesInstanceUID == s for _, ds in headers) for s in series}
        raise UserError(f"--input {folder}: {len(series)} series ({', '.join(f'{s}: {n} files' for s, n in counts.items())}); "
                        "put each series in its own folder and pass one")
    return headers


def check_one_grid(headers: list) -> None:
    """Every slice has the first one's orientation, size and pixel spacing: a volume has one grid."""
    (name, first) = headers[0][0].name, headers[0][1]
    iop, spacing = np.asarray(first.ImageOrientationPatient, float), np.asarray(first.PixelSpacing, float)
    for f, ds in headers:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), iop, atol=1e-4):
            raise UserError(f"{f}: its orientation differs from {name}'s; a volume has one orientation")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise UserError(f"{f}: {ds.Columns}x{ds.Rows} pixels, {name} {first.Columns}x{first.Rows}")
        if not np.allclose(np.asarray(ds.PixelSpacing, float), spacing, rtol=1e-4, atol=1e-6):
            raise UserError(f"{f}: pixel spacing {list(ds.PixelSpacing)} mm, {name} {list(first.PixelSpacing)} mm; "
                            "a volume has one pixel spacing")


def slice_steps(folder: Path, headers: list, normal: np.ndarray) -> np.ndarray:
    """Sort ``headers`` along the slice normal (in place); their positions, checked to be evenly spaced."""
    headers.sort(key=lambda h: float(np.dot(np.asarray(h[1].ImagePositionPatient, float), normal)))
    positions = np.array([np.asarray(ds.ImagePositionPatient, float) for _, ds in headers])
    steps = np.diff(positions @ normal)
    if len(headers) > 1 and (steps.min() <= 1e-3):
        dup = headers[int(np.argmin(steps)) + 1][0]
        raise UserError(f"{dup}: at the same position as another slice of the series; one image per position")
    if len(headers) > 1 and steps.max() - steps.min() > 0.01 * steps.mean() + 1e-3:
        raise UserError(f"--input {folder}: slice spacing varies from {steps.min():.3f} to {steps.max():.3f} mm (a "
                        "missing slice?); a volume needs evenly spaced slices")
    return positions


def read_planes(headers: list) -> np.ndarray:
    """The slices' pixels, rescaled (RescaleSlope/Intercept), as (columns, rows, slices)."""
    pydicom = import_pydicom()
    planes = []
    for f, _ in headers:
        ds = pydicom.dcmread(f)
        try:
            pixels = ds.pixel_array
        except Exception as e:  # noqa: BLE001 -- a compressed transfer syntax without its decoder, ...
            raise UserError(f"{f}: cannot decode its pixels ({type(e).__name__}: {e})") from None
        slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
        planes.append(pixels if (slope, intercept) == (1.0, 0.0) else pixels * slope + intercept)
    return np.stack([p.T for p in planes], axis=-1)  # i along a row, j down a column


def read_dicom_series(folder: Path) -> Volume:
    """The one image series in ``folder`` (files in any order and with any names), slices sorted by their position
    along the slice normal; spacing, orientation and size checked to be one volume."""
    headers = dicom_headers(folder)
    check_one_grid(headers)
    first = headers[0][1]
    iop = np.asarray(first.ImageOrientationPatient, float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = slice_steps(folder, headers, normal)
    steps = np.diff(positions @ normal)
    thickness = float(steps.mean()) if len(headers) > 1 else float(getattr(first, "SliceThickness", 1.0) or 1.0)
    dy, dx = (float(v) for v in first.PixelSpacing)  # (between rows, between columns)
    array = read_planes(headers)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_dir * dx, col_dir * dy
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(headers) - 1) if len(headers) > 1 else normal * thickness
    lps[:3, 3] = positions[0]
    series_info = DicomSeries(
        [DicomSlice(str(ds.SOPClassUID), str(ds.SOPInstanceUID), np.asarray(ds.ImagePositionPatient, float))
         for _, ds in headers], row_dir, col_dir, (dx, dy), str(getattr(first, "StudyInstanceUID", "")),
        str(first.SeriesInstanceUID), str(getattr(first, "FrameOfReferenceUID", "")),
        {k: first.get(k) for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                                   "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")
         if first.get(k) is not None})
    return Volume(volume_name([folder]), array, LPS_TO_RAS @ lps, (dx, dy, thickness), 2, [f for f, _ in headers],
                  dicom=series_info)


def find_inputs(path: str | Path, channels: int = 1) -> list[list[Path]]:
    """What --input names, as the files of each volume: a NIfTI file, a folder of NIfTI files (each a volume; for a
    model of several image channels, each case's <case>_0000, <case>_0001 ... files) or a DICOM series folder."""
    p = Path(path)
    if channels > 1:
        return channel_groups(p, channels)
    if p.is_file():
        if not is_nifti(p):
            raise UserError(f"--input {p}: not a NIfTI file (.nii or .nii.gz); for DICOM pass the series' folder")
        return [[p]]
    if not p.is_dir():
        raise UserError(f"--input {p} does not exist")
    niftis = sorted(f for f in p.iterdir() if f.is_file() and is_nifti(f))
    if niftis:
        stems = [nifti_stem(f) for f in niftis]
        dup = next((s for s in stems if stems.count(s) > 1), None)
        if dup is not None:
            raise UserError(f"--input {p}: two files would both be predicted as {dup}.nii.gz "
                            f"({', '.join(f.name for f, s in zip(niftis, stems) if s == dup)}); keep one")
        return [[f] for f in niftis]
    if any(is_dicom(f) for f in p.iterdir() if f.is_file()):
        return [[p]]
    raise UserError(f"--input {p}: neither NIfTI files (.nii, .nii.gz) nor DICOM files in this folder")


def channel_groups(p: Path, channels: int) -> list[list[Path]]:
    """The <case>_0000 ... <case>_<channels - 1> NIfTI files of each case in folder ``p`` (or of the case whose
    _0000 file ``p`` is)."""
    if p.is_dir() and not any(is_nifti(f) for f in p.iterdir()) and any(is_dicom(f) for f in p.iterdir()):
        raise UserError(f"--input {p}: a DICOM series is one image channel; this model takes {channels} "
                        "(<case>_0000, <case>_0001 ... NIfTI files)")
    files = sorted(f for f in p.iterdir() if f.is_file() and is_nifti(f)) if p.is_dir() else [p]
    if p.is_file() and not re.search(r"_0000\.nii(\.gz)?$", p.name):
        raise UserError(f"--input {p}: this model takes {channels} image channels; pass a case's _0000 file (its "
                        "_0001 ... beside it) or their folder")
    groups = []
    for first in (f for f in files if re.search(r"_0000\.nii(\.gz)?$", f.name)):
        group = [first.with_name(first.name.replace("_0000.", f"_{m:04d}.", 1)) for m in range(channels)]
        missing = [g.name for g in group if not g.is_file()]
        if missing:
            raise UserError(f"--input {first}: this model takes {channels} image channels; {', '.join(missing)} "
                            "missing beside it")
        groups.append(group)
    if not groups:
        raise UserError(f"--input {p}: no <case>_0000.nii(.gz) files (a model of {channels} image channels reads "
                        "<case>_0000, <case>_0001 ... per case)")
    return groups


def read_volume(paths: list[Path]) -> Volume:
    """The volume of one input: a DICOM series folder, or a case's NIfTI files (one per image channel)."""
    if paths[0].is_dir():
        return read_dicom_series(paths[0])
    volumes = [read_nifti(p) for p in paths]
    first = volumes[0]
    for p, v in zip(paths[1:], volumes[1:]):
        if v.array.shape != first.array.shape or not np.allclose(v.affine, first.affine, atol=1e-3):
            raise UserError(f"{p}: not on the grid of {paths[0].name} (shape {v.array.shape} vs {first.array.shape}, "
                            "or another affine); a case's channels must match voxel for voxel")
    first.more, first.sources = tuple(v.array for v in volumes[1:]), list(paths)
    return first


class VolumeAdapter(DatasetAdapter):
    """One volume as a dataset of its slices, for the prediction path (no labels)."""
    name = "volume"
    description = "one NIfTI volume or DICOM series (giseg predict --input)"
    volume_columns = ("case", "day")

    def __init__(self, volume: Volume, classes: tuple[str, ...], channels: int = 1):
        self.volume, self.classes, self.priority = volume, tuple(classes), tuple(classes)
        self.colours, self.channels = {}, channels

    def build_index(self, data_dir=None, split=None, require_labels=False):
        v = self.volume
        p, q = in_plane(v.axis)
        n = v.array.shape[v.axis]
        return pd.DataFrame({"id": [f"{v.name}_slice_{k + 1:04d}" for k in range(n)], "case": 0, "day": 0,
                             "slice": np.arange(1, n + 1), "width": v.array.shape[p], "height": v.array.shape[q],
                             "spacing_x": v.spacing[p], "spacing_y": v.spacing[q], "path": str(v.sources[0])})

    def read_image(self, row):
        v, k = self.volume, int(row.slice) - 1
        if not v.more:
            return cut(v.array, v.axis, k)
        return np.stack([cut(a, v.axis, k) for a in (v.array, *v.more)])

    def has_labels(self, index):
        return False

    def fingerprint(self, index):  # the base's (the index, its first file), and every file the volume was read from
        return hash_files(hashlib.sha256(super().fingerprint(index).encode()), self.volume.sources)

    def pixel_spacing(self, row):
        return float(row.spacing_x), float(row.spacing_y)
