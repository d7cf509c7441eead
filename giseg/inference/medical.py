"""Predicted masks of a volume out as a planning system or a viewer opens them: NIfTI label volumes and DICOM RT-Struct.

NIfTI: ``<out>/<name>.nii.gz`` on the input's grid (its affine, and its header's geometry for NIfTI input):
  --volume_labels map        one label map, class k as value k + 1 (the order of the model's classes); where
                             classes overlap, the dataset's priority decides (GI: stomach, large bowel, small bowel)
  --volume_labels per_class  ``<out>/<name>/<class>.nii.gz``, one 0/1 volume per class: overlaps kept
RT-Struct (DICOM input): ``<out>/<name>_rtstruct.dcm``, written with pydicom (rt-utils needs opencv-python, which
clashes with the opencv-python-headless this toolkit installs): one ROI per class with the dataset's colour, closed
planar contours per slice in patient coordinates, each referring to its image (SOP Instance UID) of the series, the
study and the frame of reference. A region with holes is its outer contour and one contour per hole, to be filled
with the even-odd rule (XOR, as most planning systems read them); ``read_rtstruct`` rasterises them back that way.
"""
from __future__ import annotations

import datetime
import gzip
import io
import json
from pathlib import Path

import cv2
import numpy as np

from giseg.data.medical import Volume, import_pydicom, volume_name
from giseg.data.nifti import import_nibabel
from giseg.utils.errors import UserError
from giseg.utils.files import atomic_write_json, atomic_write_text

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as RT-Structs refer to their study
VOLUME_LABELS = ("map", "per_class")
INPUTS_RECORD = ".giseg-inputs.json"  # in a --out folder of predict --input: each output name -> its input
RGB = {"red": (255, 0, 0), "green": (0, 170, 0), "blue": (0, 90, 255), "yellow": (255, 220, 0),
       "magenta": (255, 0, 255), "cyan": (0, 220, 220), "orange": (255, 140, 0)}


def claim_names(out: Path, inputs: list[list[Path]]) -> dict[str, str]:
    """The outputs' names of ``inputs`` (volume_name: a series folder's name, a NIfTI case name), checked before
    anything is predicted against each other and against what earlier runs wrote into ``out`` (INPUTS_RECORD): a
    name that another input of this run, or an earlier run's other input, already has is refused with one line
    naming both (two patients' series folders of one name replaced each other's outputs without a word). A rerun
    of the same input replaces its own. Returns {name: input} of this run, for record_output."""
    record = read_record(out)
    mine: dict[str, str] = {}
    for paths in inputs:
        name, src = volume_name(paths), str(paths[0].resolve())
        earlier = mine.get(name) or record.get(name)
        if earlier is not None and earlier != src:
            raise UserError(f"--out {out}: {src} and {earlier} both give the outputs named {name} (<name>.nii.gz, "
                            f"<name>_rtstruct.dcm); nothing was written: use another --out for one of them")
        mine[name] = src
    return mine


def read_record(out: Path) -> dict[str, str]:
    path = out / INPUTS_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def record_output(out: Path, name: str, src: str) -> None:
    """That the outputs named ``name`` in ``out`` were predicted from ``src``: once they are written."""
    atomic_write_json(out / INPUTS_RECORD, {**read_record(out), name: src})


def label_map(masks: np.ndarray, classes: tuple[str, ...], priority: tuple[str, ...]) -> np.ndarray:
    """(C, ...) bool masks -> uint8 label map, class k as k + 1; overlaps go to the first of ``priority``."""
    out = np.zeros(masks.shape[1:], np.uint8)
    for name in reversed(priority):  # the first of priority is written last: it wins
        k = classes.index(name)
        out[masks[k]] = k + 1
    return out


def _nifti(volume: Volume, data: np.ndarray):
    nib = import_nibabel()
    header = volume.header if isinstance(volume.header, nib.Nifti1Header) else None
    img = nib.Nifti1Image(data, volume.affine, header=header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    if header is None:
        img.header.set_xyzt_units("mm")
    return img


def _save_nifti(img, path: Path) -> None:
    """The .nii.gz bytes (gzip level 1, nibabel's own) through the atomic writer every output uses."""
    atomic_write_text(path, gzip.compress(img.to_bytes(), compresslevel=1))


def write_nifti(volume: Volume, masks: np.ndarray, classes: tuple[str, ...], priority: tuple[str, ...],
                out_dir: Path, labels: str = "map") -> list[Path]:
    """Write (C, I, J, K) masks of ``volume`` as NIfTI (module docstring); return the files."""
    if labels == "map":
        path = out_dir / f"{volume.name}.nii.gz"
        _save_nifti(_nifti(volume, label_map(masks, classes, priority)), path)
        return [path]
    folder = out_dir / volume.name
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, name in enumerate(classes):
        paths.append(folder / f"{name}.nii.gz")
        _save_nifti(_nifti(volume, masks[k].astype(np.uint8)), paths[-1])
    return paths


# ---------------------------------------------------------------- contours
def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """(H, W) mask -> closed polygons (n, 2) of (column, row) pixel centres whose even-odd fill is ``mask``: each
    8-connected region's outline and the outline of each hole (a 4-connected background region off the border)."""
    m = np.ascontiguousarray(mask, np.uint8)
    polys, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    out = [p[:, 0, :] for p, h in zip(polys, hierarchy[0] if hierarchy is not None else []) if h[3] == -1]
    n, comp = cv2.connectedComponents((m == 0).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))
    for label in range(1, n):
        if label in border:
            continue
        hole, _ = cv2.findContours((comp == label).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        out.extend(p[:, 0, :] for p in hole)
    return out


def fill_contours(polys: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The even-odd fill of (column, row) polygons: (H, W) bool."""
    out = np.zeros(shape, bool)
    for p in polys:
        one = np.zeros(shape, np.uint8)
        cv2.fillPoly(one, [np.round(p).astype(np.int32).reshape(-1, 1, 2)], 1)
        out ^= one.astype(bool)
    return out


def _image_ref(s):
    """A reference to one image of the series (SOP class and instance)."""
    from pydicom.dataset import Dataset  # pydicom: optional ([medical] extra)

    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = s.sop_class_uid, s.sop_instance_uid
    return ref


def _rtstruct_header(series, label: str):
    """The RT-Struct's file meta, patient, study and series modules, and its frame of reference: every image of
    ``series`` referenced."""
    from pydicom.dataset import Dataset, FileMetaDataset  # pydicom: optional ([medical] extra)
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    now = datetime.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    for key, value in series.patient.items():
        setattr(ds, key, value)
    ds.StudyInstanceUID = series.study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.Manufacturer = "giseg"
    ds.StructureSetLabel = label[:16]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SeriesDescription = f"giseg prediction of series {series.series_uid}"[:64]
    rt_series = Dataset()
    rt_series.SeriesInstanceUID = series.series_uid
    rt_series.ContourImageSequence = Sequence([_image_ref(s) for s in series.slices])
    rt_study = Dataset()
    rt_study.ReferencedSOPClassUID, rt_study.ReferencedSOPInstanceUID = STUDY_SOP_CLASS, ds.StudyInstanceUID
    rt_study.RTReferencedSeriesSequence = Sequence([rt_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid or generate_uid()
    frame.RTReferencedStudySequence = Sequence([rt_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    return ds


def _roi_contours(series, mask: np.ndarray) -> list:
    """One CLOSED_PLANAR contour item per polygon of an (I, J, K) mask, in patient coordinates (mm)."""
    from pydicom.dataset import Dataset  # pydicom: optional ([medical] extra)
    from pydicom.sequence import Sequence

    dx, dy = series.spacing
    items = []
    for z, s in enumerate(series.slices):
        for poly in mask_contours(mask[:, :, z].T):
            points = s.position + np.outer(poly[:, 0] * dx, series.row_dir) + np.outer(poly[:, 1] * dy, series.col_dir)
            item = Dataset()
            item.ContourImageSequence = Sequence([_image_ref(s)])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourData = [f"{v:.4f}" for v in points.ravel()]
            items.append(item)
    return items


def write_rtstruct(volume: Volume, masks: np.ndarray, classes: tuple[str, ...], colours: dict[str, str],
                   path: Path, label: str = "giseg") -> Path:
    """(C, I, J, K) masks of a DICOM ``volume`` as an RT-Struct at ``path`` (module docstring)."""
    pydicom = import_pydicom()
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    series = volume.dicom
    if series is None:
        raise UserError(f"{volume.name}: an RT-Struct refers to a DICOM series; this input is NIfTI")
    ds = _rtstruct_header(series, label)
    frame_uid = ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    rois, contours, observations = [], [], []
    for k, name in enumerate(classes):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = k + 1, frame_uid
        roi.ROIName, roi.ROIGenerationAlgorithm = name, "AUTOMATIC"
        rois.append(roi)
        contour = Dataset()
        contour.ROIDisplayColor = list(RGB.get(colours.get(name, ""), (128, 128, 128)))
        contour.ReferencedROINumber = k + 1
        contour.ContourSequence = Sequence(_roi_contours(series, masks[k]))
        contours.append(contour)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = k + 1, k + 1
        obs.RTROIInterpretedType, obs.ROIInterpreter = "ORGAN", ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    atomic_write_text(path, buf.getvalue())
    return path


def read_rtstruct(path: str | Path, volume: Volume) -> dict[str, np.ndarray]:
    """An RT-Struct's ROIs on ``volume``'s grid: ROI name -> (I, J, K) bool, contours filled with the even-odd rule
    on the image each refers to (by SOP Instance UID; by position when it names none)."""
    pydicom = import_pydicom()
    ds = pydicom.dcmread(path)
    series = volume.dicom
    by_uid = {s.sop_instance_uid: z for z, s in enumerate(series.slices)}
    normal = np.cross(series.row_dir, series.col_dir)
    depths = np.array([s.position @ normal for s in series.slices])
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    shape = volume.array.shape
    out = {}
    dx, dy = series.spacing
    for roi in ds.ROIContourSequence:
        planes: dict[int, list[np.ndarray]] = {}
        for item in getattr(roi, "ContourSequence", []):
            points = np.asarray(item.ContourData, float).reshape(-1, 3)
            refs = getattr(item, "ContourImageSequence", [])
            z = by_uid.get(str(refs[0].ReferencedSOPInstanceUID)) if refs else None
            if z is None:
                z = int(np.argmin(np.abs(depths - points[0] @ normal)))
            rel = points - series.slices[z].position
            planes.setdefault(z, []).append(np.stack([rel @ series.row_dir / dx, rel @ series.col_dir / dy], 1))
        mask = np.zeros(shape, bool)
        for z, polys in planes.items():
            mask[:, :, z] = fill_contours(polys, (shape[1], shape[0])).T
        out[names[int(roi.ReferencedROINumber)]] = mask
    return out
