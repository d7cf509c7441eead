"""Hugging Face ``datasets`` both ways: read any image-segmentation dataset (``--dataset hf``), write ours as one.

In:  a ``save_to_disk`` folder, a folder ``datasets.load_dataset`` reads (parquet, ...) or a hub id (where the Hub
     is reachable), split ``--hf_split``. Columns:
       image            ``--image_column`` (default: ``image``, else ``pixel_values``), any PIL mode; RGB is
                        read as luminance (the pipeline is single-channel, as MRI is), 16-bit stays 16-bit;
       ground truth     either a label map ``--label_column`` (default: ``label``, else ``annotation``): one class
                        index per pixel, names from ``id2label.json`` beside the data (as on the Hub); or one mask
                        image per class, columns ``mask_<class>`` (multi-label: classes may overlap), names from
                        the columns (ordered by ``id2label.json`` when there is one);
       optional         ``id`` (unique), ``--case_column`` (default ``case``: the unit of the case-level folds;
                        without one each image is its own case), ``day`` (a case's volumes), ``slice`` (order in
                        a volume), ``spacing_x``/``spacing_y`` (mm).
     Label maps follow the HF example's conventions: ``--reduce_labels`` turns 0 into 255 and every other value
     v into v - 1; then 255 is unlabelled (left out of loss and metrics), a label named ``background`` and a 0
     that id2label does not name are background, and any other value missing from id2label is an error.
Out: ``export_dataset`` (``giseg export-hf``) writes a dataset adapter's data as a ``datasets.Dataset``
     folder in exactly the multi-label form above, with the scans as stored (16-bit).

``datasets`` is imported only here, and only when one of these functions runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from giseg.data.base import DatasetAdapter
from giseg.data.gi import GIAdapter
from giseg.data.masks import IGNORE_BIT, MAX_CLASSES, class_name_problems, unpack_masks
from giseg.utils.claims import write_output_mark
from giseg.utils.errors import UserError, storage_guard
from giseg.utils.files import atomic_dir, recover_replaced
from giseg.utils.log import logger
from giseg.utils.options import options_of

IMAGE_COLUMNS = ("image", "pixel_values")
LABEL_COLUMNS = ("label", "annotation")
MASK_PREFIX = "mask_"
ID2LABEL = "id2label.json"
IGNORE = 255
TABLE_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")


@dataclass
class HFOptions:
    """How ``--dataset hf`` reads a dataset: declared once, for trainer.py (TrainConfig has these fields), giseg
    score, and the inference spec (``dataset_options``) that predict, tune and the app read back."""
    image_column: str = field(default="", metadata={
        "help": "--dataset hf: the image column (default: image, else pixel_values)", "identity": True,
        "group": "--dataset hf"})
    label_column: str = field(default="", metadata={
        "help": "--dataset hf: the label-map column, a class index per pixel (default: label, else annotation; "
                "without one, mask_<class> columns are multi-label masks)", "identity": True, "group": "--dataset hf"})
    reduce_labels: bool = field(default=False, metadata={
        "help": "--dataset hf: label 0 becomes 255 (unlabelled: left out of loss and metrics) and every other "
                "label v becomes v - 1, as the HF example's --do_reduce_labels", "identity": True,
        "group": "--dataset hf"})
    hf_split: str = field(default="train", metadata={
        "help": "--dataset hf: the split to train on or read (folds are made inside it)", "identity": True,
        "group": "--dataset hf"})
    case_column: str = field(default="case", metadata={
        "help": "--dataset hf: the column that groups images into cases for the case-level folds (without it "
                "each image is its own case)", "identity": True, "group": "--dataset hf"})


DEFAULT_OPTIONS = dataclasses.asdict(HFOptions())


def dataset_options(args) -> dict:
    """The HFOptions values of ``args`` (an argparse namespace or a TrainConfig)."""
    return options_of(HFOptions, args)


def import_datasets():
    """``datasets``, with its progress bars off (they would fill a log file with carriage returns)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def load_split(source: str | Path, split: str):
    """The ``split`` of the dataset at ``source``: a save_to_disk folder (a Dataset or a DatasetDict), another
    folder ``load_dataset`` reads, or a hub id."""
    datasets = import_datasets()

    path = Path(source)
    if path.is_dir() and not any((path / m).is_file() for m in ("state.json", "dataset_dict.json")):
        tables = [f for f in path.rglob("*") if f.suffix in TABLE_SUFFIXES and f.is_file()]
        if not tables:
            raise UserError(f"--data_dir {source}: not a Hugging Face dataset folder (no save_to_disk files, no "
                            f"{'/'.join(TABLE_SUFFIXES)} files); a folder of images or of another layout (GI's "
                            "Kaggle folder, LGG) is read by its own --dataset, and a model trained on --dataset hf "
                            "predicts on data in that form (giseg export-hf writes it)")
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
        elif path.is_dir() or "/" in str(source):
            ds = datasets.load_dataset(str(source))
        else:
            raise UserError(f"--data_dir {source}: not a folder and not a hub id")
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"--data_dir {source}: not a dataset that `datasets` can read ({e})") from None
    except IndexError:  # (load_from_disk of a dataset saved with no rows)
        raise UserError(f"--data_dir {source}: split {split} has no rows (the dataset was saved empty)") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"--hf_split {split}: {source} has the splits {', '.join(ds)}")
        ds = ds[split]
    return ds


def read_id2label(source: str | Path) -> dict[int, str] | None:
    """``id2label.json`` beside the data (or in the hub repo), as {id: name}; None when there is none."""
    path = Path(source) / ID2LABEL
    if not path.is_file() and not Path(source).exists() and "/" in str(source):
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(source), ID2LABEL, repo_type="dataset"))
        except Exception:  # noqa: BLE001 -- no such file, or no Hub: the classes must come from elsewhere
            return None
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        id2label = {int(k): v for k, v in raw.items()}
    except (ValueError, AttributeError) as e:
        raise UserError(f"{path}: expected a JSON object {{\"0\": \"name\", ...}} ({e})") from None
    names = list(id2label.values())
    if not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: class names must be strings, got {names}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{path}: the name {dup[0]!r} is given to ids {[i for i, n in id2label.items() if n == dup[0]]}; "
                        "each id needs its own name (two ids of one name would be merged into one class)")
    return id2label


@dataclass
class Layout:
    """Which columns hold what, and how ground-truth values become packed class bits."""
    image: str
    classes: tuple[str, ...]
    label: str | None = None  # a label-map column, or None
    masks: tuple[str, ...] = ()  # the mask_<class> columns, or ()
    lut: np.ndarray | None = None  # label value (after reduction) -> packed byte; 0xFF entries: not allowed
    reduce_labels: bool = False

    @property
    def labelled(self) -> bool:
        return self.label is not None or bool(self.masks)


def make_layout(columns: list[str], source, options: dict, classes: tuple[str, ...] | None = None,
                id2label: dict[int, str] | None = None) -> Layout:
    """The layout of a dataset with ``columns``: image and ground-truth columns, classes and the label table.
    ``classes`` (a trained model's) stand in when the data names none (an unlabelled split)."""
    image = options.get("image_column") or next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image not in columns:
        raise UserError(f"--image_column: {source} has no column {image or ' or '.join(IMAGE_COLUMNS)!r}; its "
                        f"columns are {columns}")
    label = options.get("label_column") or next((c for c in LABEL_COLUMNS if c in columns), None)
    if options.get("label_column") and label not in columns:
        raise UserError(f"--label_column {label}: {source} has no such column; its columns are {columns}")
    mask_cols = [c for c in columns if c.startswith(MASK_PREFIX)]
    if label is not None:
        if id2label is None:
            if classes is None:
                raise UserError(f"{source}: a label map ({label!r}) needs class names: put an {ID2LABEL} "
                                '({"0": "name", ...}) beside the data')
            id2label = dict(enumerate(classes))
        lut = np.full(256, 0xFF, np.uint8)
        lut[IGNORE] = 1 << IGNORE_BIT
        names = [n for _, n in sorted(id2label.items()) if n.lower() != "background"]
        for i, name in id2label.items():
            if not 0 <= i < IGNORE:
                raise UserError(f"{ID2LABEL} of {source}: label id {i} is out of 0..254")
            lut[i] = 0 if name.lower() == "background" else 1 << names.index(name)
        if 0 not in id2label:
            lut[0] = 0
        layout = Layout(image, tuple(names), label=label, lut=lut, reduce_labels=bool(options.get("reduce_labels")))
    elif mask_cols:
        if options.get("reduce_labels"):
            raise UserError(f"--reduce_labels: {source} has no label map but {MASK_PREFIX}<class> columns "
                            f"{mask_cols}; --reduce_labels applies to a label map only, leave it out")
        names = [c[len(MASK_PREFIX):] for c in mask_cols]
        if id2label is not None:
            ordered = [n for _, n in sorted(id2label.items())]
            if sorted(ordered) != sorted(names):
                raise UserError(f"{source}: {ID2LABEL} names {ordered} but the mask columns are {mask_cols}")
            names = ordered
        layout = Layout(image, tuple(names), masks=tuple(MASK_PREFIX + n for n in names))
    else:
        if classes is None:
            raise UserError(f"{source}: no ground truth: neither a label map ({' or '.join(LABEL_COLUMNS)}, or "
                            f"--label_column) nor {MASK_PREFIX}<class> columns among {columns}")
        layout = Layout(image, tuple(classes))
    if not layout.classes or len(layout.classes) > MAX_CLASSES:
        raise UserError(f"{source}: {len(layout.classes)} classes {list(layout.classes)}; this toolkit takes 1 to "
                        f"{MAX_CLASSES} (one bit each in its packed masks)")
    bad = class_name_problems(layout.classes)
    if bad:
        raise UserError(f"{source}: {bad[0]}")
    if classes is not None and tuple(classes) != layout.classes:
        raise UserError(f"{source}: its classes {list(layout.classes)} are not the model's {list(classes)}")
    return layout


def to_array(value, what: str, gray: bool = False) -> np.ndarray:
    """A decoded image cell (PIL image, array or nested lists) as a 2D array; with ``gray``, colour images as
    luminance (scans; a mask or label map in colour is an error)."""
    if value is None:
        raise UserError(f"{what}: empty cell (null); every row needs its image")
    if hasattr(value, "mode"):  # PIL
        if value.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr", "HSV") and gray:
            value = value.convert("L")
        arr = np.array(value)
    else:
        try:
            arr = np.asarray(value)
        except ValueError as e:  # ragged nested lists
            raise UserError(f"{what}: not an image ({e})") from None
    if arr.dtype.kind not in "iufb":
        raise UserError(f"{what}: expected an image or a numeric array, got {arr.dtype} values")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and gray:
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if arr.ndim != 2:
        raise UserError(f"{what}: expected a 2D image, got shape {arr.shape}")
    return arr


def image_size(value) -> tuple[int, int]:
    """(width, height) of an undecoded image cell ({"bytes", "path"}) from its header, or of an array."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        from PIL import Image

        src = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with Image.open(src) as im:
            return im.size
    arr = to_array(value, "image", gray=True)
    return arr.shape[1], arr.shape[0]


def check_paths_inside(ds, columns: list[str], source) -> None:
    """Image cells that are file paths (no bytes) must lie inside the dataset's folder: a row naming
    /etc/... or ../other is refused (the GI reader refuses such symlinks too)."""
    import datasets
    import pyarrow.compute as pc

    root = Path(source).resolve() if Path(source).is_dir() else None
    for col in columns:
        if not isinstance(ds.features.get(col), datasets.Image):
            continue
        cells = ds.select_columns([col]).cast_column(col, datasets.Image(decode=False)).with_format("arrow")
        for start in range(0, len(ds), 4096):
            batch = cells[start:start + 4096][col]
            paths = pc.struct_field(batch, "path").to_pylist()
            has_bytes = pc.is_valid(pc.struct_field(batch, "bytes")).to_pylist()
            for i, (path, inline) in enumerate(zip(paths, has_bytes)):
                if inline or not path:
                    continue
                where = Path(path) if Path(path).is_absolute() or root is None else root / path
                if root is None or not where.resolve().is_relative_to(root):
                    raise UserError(f"{source}: row {start + i} column {col}: its image is the file {path}, outside "
                                    "the dataset's folder; keep the images inside it (or embed them: save_to_disk)")


def build_hf_index(ds, layout: Layout, source, options: dict) -> pd.DataFrame:
    """The slice index of dataset ``ds``: one row per example, columns as the adapters' contract asks."""
    import datasets

    columns = ds.column_names
    if len(ds) == 0:
        raise UserError(f"--data_dir {source}: split {options.get('hf_split', 'train')} has no rows")
    meta = [c for c in ("id", "day", "slice", "width", "height", "spacing_x", "spacing_y") if c in columns]
    case_col = options.get("case_column") or "case"
    if case_col in columns:
        meta.append(case_col)
    elif case_col != DEFAULT_OPTIONS["case_column"]:
        raise UserError(f"--case_column {case_col}: {source} has no such column; its columns are {columns} (without "
                        "a case column each image would be its own case, and a case's images could land in "
                        "several folds)")
    else:
        logger.warning("%s has no %r column: each image is its own case for the folds (pass --case_column if "
                       "images of one patient or volume are in several rows)", source, case_col)
    check_paths_inside(ds, [layout.image, *([layout.label] if layout.label else []), *layout.masks], source)
    table = ds.select_columns(meta).to_pandas() if meta else pd.DataFrame(index=range(len(ds)))
    for c in meta:
        numeric = pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
        if c not in ("id", case_col) and (not numeric or table[c].isna().any()):
            raise UserError(f"{source}: column {c!r} must hold numbers in every row, got {table[c].dtype} values "
                            f"such as {table[c].iloc[0]!r}")
        if c == case_col and table[c].isna().any():
            raise UserError(f"--case_column {c}: {source} has rows without a case (row "
                            f"{int(np.flatnonzero(table[c].isna().to_numpy())[0])})")
    df = pd.DataFrame({"row": np.arange(len(ds))})
    df["id"] = table["id"].astype(str) if "id" in table else df["row"].map(lambda r: f"{r:06d}")
    if df["id"].duplicated().any():
        raise UserError(f"{source}: column 'id' repeats {df['id'][df['id'].duplicated()].iloc[0]!r}; ids must be unique")
    if case_col in table:
        cases = table[case_col]
        df["case"] = cases.astype(int) if pd.api.types.is_integer_dtype(cases) else pd.factorize(cases)[0]
        df["case_name"] = cases.astype(str)
    else:
        df["case"] = df["row"]
    if "day" in table:
        df["day"] = table["day"].astype(int)
    if "width" in table and "height" in table:
        df["width"], df["height"] = table["width"].astype(int), table["height"].astype(int)
    else:
        cell = ds.cast_column(layout.image, datasets.Image(decode=False)) if isinstance(
            ds.features[layout.image], datasets.Image) else ds
        sizes = [image_size(v) for v in cell[layout.image]]
        df["width"], df["height"] = [w for w, _ in sizes], [h for _, h in sizes]
    for c in ("spacing_x", "spacing_y"):
        if c in table:
            df[c] = table[c].astype(float)
    volume = ["case", "day"] if "day" in df else ["case"]
    df["slice"] = table["slice"].astype(int) if "slice" in table else df.groupby(volume).cumcount()
    df["path"] = [f"{source}#{options.get('hf_split', 'train')}/{r}" for r in df["row"]]
    return df.sort_values([*volume, "slice"], kind="stable").reset_index(drop=True)


class Reader:
    """Decoded records of one dataset, the last one per thread remembered (the image and the masks of a row are
    read one after the other by the cache builder)."""

    def __init__(self, ds, layout: Layout):
        self.ds, self.layout, self._local = ds, layout, threading.local()

    def record(self, row: int) -> dict:
        memo = getattr(self._local, "memo", None)
        if memo is None or memo[0] != row:
            memo = self._local.memo = (row, self.ds[int(row)])
        return memo[1]

    def image(self, row) -> np.ndarray:
        img = to_array(self.record(row.row)[self.layout.image], f"row {row.row} column {self.layout.image}", True)
        if img.shape != (int(row.height), int(row.width)):
            raise UserError(f"row {row.row} (id {row.id}) column {self.layout.image}: the image is {img.shape[1]} "
                            f"wide x {img.shape[0]} high but the row's width/height say {int(row.width)} x "
                            f"{int(row.height)}; fix the columns (or drop them: the size is then read from the image)")
        return img

    def packed(self, row) -> np.ndarray:
        """(H, W) uint8: bit c for class c, bit 7 where unlabelled."""
        rec, lay = self.record(row.row), self.layout
        shape = (int(row.height), int(row.width))
        if lay.label is not None:
            raw = to_array(rec[lay.label], f"row {row.row} column {lay.label}")
            if raw.dtype.kind == "f" and not (np.isfinite(raw).all() and (raw == np.round(raw)).all()):
                raise UserError(f"row {row.row} (id {row.id}) column {lay.label}: a label map holds class indices, "
                                f"got fractional values such as {float(raw[raw != np.round(raw)].flat[0])!r} ({raw.dtype}); "
                                "store integers (uint8 PNG or an int array)")
            if raw.dtype.kind not in "iufb":
                raise UserError(f"row {row.row} (id {row.id}) column {lay.label}: a label map holds class indices, "
                                f"got {raw.dtype} values")
            lab = raw.astype(np.int64)
            if lay.reduce_labels:
                lab = np.where(lab == 0, IGNORE, lab - 1)
                lab[lab == IGNORE - 1] = IGNORE
            if lab.min() < 0 or lab.max() > IGNORE:
                raise UserError(f"row {row.row} column {lay.label}: label values must be 0..255, got "
                                f"{lab.min()}..{lab.max()}")
            packed = lay.lut[lab]
            if (packed == 0xFF).any():
                raise UserError(f"row {row.row} (id {row.id}) column {lay.label}: label value(s) "
                                f"{sorted(set(np.unique(lab[packed == 0xFF]).tolist()))} are not in {ID2LABEL} "
                                f"(classes {list(lay.classes)}; --reduce_labels: {lay.reduce_labels})")
        else:
            packed = np.zeros(shape, np.uint8)
            for c, col in enumerate(lay.masks):
                m = to_array(rec[col], f"row {row.row} column {col}")
                if m.shape != shape:
                    raise UserError(f"row {row.row} (id {row.id}) column {col}: mask {m.shape[1]}x{m.shape[0]}, "
                                    f"image {shape[1]}x{shape[0]}")
                packed |= (m > 0).astype(np.uint8) << c
        if packed.shape != shape:
            raise UserError(f"row {row.row} (id {row.id}) column {lay.label}: label map {packed.shape[1]}x"
                            f"{packed.shape[0]}, image {shape[1]}x{shape[0]}")
        return packed.astype(np.uint8)


def fingerprint(ds, index: pd.DataFrame, layout: Layout, options: dict) -> str:
    """What a cache of this data depends on: the index, the dataset's own fingerprint and files, the options."""
    h = hashlib.sha256(pd.util.hash_pandas_object(index, index=False).to_numpy().tobytes())
    h.update(json.dumps({"fp": getattr(ds, "_fingerprint", ""), "options": options, "classes": layout.classes,
                         "files": [f.get("filename") for f in getattr(ds, "cache_files", [])]},
                        sort_keys=True).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- out
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


class HFAdapter(DatasetAdapter):
    """Any image-segmentation dataset in Hugging Face ``datasets`` form (py says which columns). Its
    classes come with the data, so ``bind`` returns an adapter for one dataset and one set of options."""
    name = "hf"
    description = ("any image-segmentation dataset in Hugging Face `datasets` form: a save_to_disk folder, a "
                   "parquet folder or a hub id (py; --image_column, --label_column, --reduce_labels, "
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
