"""giseg demo-data --dataset nnunet: a dataset adapter's data written as an nnU-Net raw dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from giseg.data.base import DatasetAdapter
from giseg.data.masks import pack_masks
from giseg.data.nnunet.dataset_json import DATASET_JSON, ENDING
from giseg.data.nifti import import_nibabel
from giseg.utils.errors import UserError
from giseg.utils.files import atomic_dir
from giseg.utils.log import logger


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
