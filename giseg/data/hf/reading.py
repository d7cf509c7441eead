"""Reading a Hugging Face dataset: loading a split, id2label.json, images and masks as arrays, the index of
slices, the reader of one slice, the fingerprint of what was read."""
from __future__ import annotations

import hashlib
import io
import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from giseg.data.hf.layout import ID2LABEL, IGNORE, Layout, TABLE_SUFFIXES
from giseg.data.hf.options import DEFAULT_OPTIONS
from giseg.utils.errors import UserError
from giseg.utils.log import logger


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
