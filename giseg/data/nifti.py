"""NIfTI volumes in (nibabel): loading, voxel spacing, the through-plane axis and in-plane slices of a volume."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from giseg.utils.errors import UserError


def import_nibabel():
    try:
        import nibabel
    except ImportError:
        raise UserError("--dataset nnunet reads NIfTI with nibabel: pip install -e \".[medical]\" (or pip install "
                        "nibabel)") from None
    return nibabel


def load_nifti(path: str | Path):
    """(voxel array, nibabel image) of a NIfTI file, a 4D file of one volume as 3D; one line when it cannot be read."""
    nib = import_nibabel()
    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 -- nibabel raises many kinds; each is the file's fault
        raise UserError(f"{path}: cannot read the NIfTI file ({type(e).__name__}: {e}); re-copy it") from None
    return (arr[..., 0] if arr.ndim == 4 and arr.shape[3] == 1 else arr), img


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel spacing of a NIfTI image in mm, as viewers place its voxels: the lengths of its affine's columns,
    the affine being the one nibabel resolves (the sform when its code is set, else the qform, else pixdim), not the
    header's pixdim, which a file may leave disagreeing with the sform. NIfTI stores both as float32: its shortest
    decimal (1.63, not 1.6299999952316284)."""
    zooms = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(0))
    return tuple(float(str(np.float32(z))) for z in zooms)


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
    return shape, img.affine, voxel_spacing(img.affine)


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
