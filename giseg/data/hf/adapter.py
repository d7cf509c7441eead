"""--dataset hf: the dataset adapter of any image-segmentation dataset in Hugging Face ``datasets`` form."""
from __future__ import annotations

from pathlib import Path

from giseg.data.base import DatasetAdapter
from giseg.data.gi import GIAdapter
from giseg.data.hf.export import export_dataset
from giseg.data.hf.layout import ID2LABEL, Layout, make_layout
from giseg.data.hf.options import DEFAULT_OPTIONS
from giseg.data.hf.reading import Reader, build_hf_index, fingerprint, load_split, read_id2label
from giseg.data.masks import IGNORE_BIT, unpack_masks
from giseg.utils.errors import UserError


class HFAdapter(DatasetAdapter):
    """Any image-segmentation dataset in Hugging Face ``datasets`` form (giseg/data/hf/__init__.py says which columns). Its
    classes come with the data, so ``bind`` returns an adapter for one dataset and one set of options."""
    name = "hf"
    description = ("any image-segmentation dataset in Hugging Face `datasets` form: a save_to_disk folder, a "
                   "parquet folder or a hub id (giseg/data/hf/; --image_column, --label_column, --reduce_labels, "
                   "--hf_split, --case_column)")
    classes = ()
    priority = ()
    colours = {}
    volume_columns = ("case",)
    PALETTE = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange")

    def __init__(self, source=None, options=None, layout=None, ds=None):
        self.source, self.options = source, {**DEFAULT_OPTIONS, **(options or {})}
        self.layout, self._ds, self._reader = layout, ds, None
        if layout is not None:
            self.classes = self.priority = layout.classes
            self.colours = dict(zip(layout.classes, self.PALETTE))

    def bind(self, data_dir, options=None, classes=None):
        options = {**DEFAULT_OPTIONS, **(options or {})}
        if data_dir is None:
            return HFAdapter(None, options, Layout(options["image_column"] or "image", tuple(classes or ())))
        ds = load_split(data_dir, options["hf_split"])
        layout = make_layout(ds.column_names, data_dir, options, classes, read_id2label(data_dir))
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
        ds = self._dataset(data_dir, split)
        if require_labels and not self.layout.labelled:
            raise UserError(f"--data_dir {data_dir}: split {self.options['hf_split']} has no ground truth column")
        return build_hf_index(ds, self.layout, data_dir, self.options)

    def reader(self):
        if self._reader is None:
            self._reader = Reader(self._dataset(), self.layout)
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
        return fingerprint(self._dataset(), index, self.layout, self.options)

    def make_demo(self, out_dir):
        out = Path(out_dir)
        if not (out / ID2LABEL).is_file():
            gi = GIAdapter()
            export_dataset(gi, gi.make_demo(out.with_name(out.name + "-kaggle")), out)
        return out

    def pixel_spacing(self, row):
        x, y = getattr(row, "spacing_x", None), getattr(row, "spacing_y", None)
        return None if x is None or y is None else (float(x), float(y))
