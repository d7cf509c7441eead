"""giseg export-hf: a dataset adapter's data written as a ``datasets.Dataset`` folder in the multi-label form
--dataset hf reads back, the scans as stored (16-bit)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from giseg.data.hf.layout import ID2LABEL, MASK_PREFIX
from giseg.data.hf.reading import import_datasets
from giseg.utils.claims import write_output_mark
from giseg.utils.errors import storage_guard
from giseg.utils.files import atomic_dir, recover_replaced
from giseg.utils.log import logger


def export_dataset(adapter, data_dir: str | Path, out_dir: str | Path, split: str | None = None):
    """Write ``adapter``'s data in ``data_dir`` as a datasets folder (save_to_disk) at ``out_dir``: one row per
    slice with the scan as stored, a ``mask_<class>`` image per class, the index's metadata; id2label.json
    beside it (written to a temporary folder, then renamed). Returns the number of rows."""
    datasets = import_datasets()
    from PIL import Image

    index = adapter.build_index(data_dir, split)
    meta = [c for c in ("id", "case", "day", "slice", "width", "height", "spacing_x", "spacing_y") if c in index]
    features = {c: datasets.Value("string" if c == "id" else "float64" if c.startswith("spacing") else "int64")
                for c in meta}
    features.update({"image": datasets.Image(), **{MASK_PREFIX + c: datasets.Image() for c in adapter.classes}})

    def rows():
        for row in index.itertuples():
            masks = adapter.read_masks(row)
            yield {**{c: getattr(row, c) for c in meta}, "image": Image.fromarray(adapter.read_image(row)),
                   **{MASK_PREFIX + c: Image.fromarray(masks[k].astype(np.uint8) * 255)
                      for k, c in enumerate(adapter.classes)}}

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    for done in recover_replaced(out.parent, out.name):  # what a killed export left (temporary folders)
        logger.info("export: %s", done)
    # datasets' own cache while the rows are built: a temporary folder of ours, removed at the end (and by the
    # next export's recover_replaced if a SIGKILL left it)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".work.tmp", dir=out.parent))
    try:
        # a full disk is one line, whichever library meets it (datasets wraps the OS's error in its own)
        with storage_guard(out, "the export", then="run the export again"):
            ds = datasets.Dataset.from_generator(rows, features=datasets.Features(features), cache_dir=str(work))
            n = len(ds)
            with atomic_dir(out_dir) as tmp:
                write_output_mark(tmp, "export-hf")
                ds.save_to_disk(str(tmp))
                (tmp / ID2LABEL).write_text(json.dumps({str(i): c for i, c in enumerate(adapter.classes)}, indent=1)
                                            + "\n")
            del ds
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("exported %d slices of %s (%s) to %s", n, data_dir, adapter.name, out_dir)
    return n
