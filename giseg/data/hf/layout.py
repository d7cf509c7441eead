"""Which columns of a dataset hold the image, the ground truth (a label map or one mask per class) and the optional
id / case / day / slice / spacing: the Layout a dataset is read with."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from giseg.data.masks import IGNORE_BIT, MAX_CLASSES, class_name_problems
from giseg.utils.errors import UserError


IMAGE_COLUMNS = ("image", "pixel_values")


LABEL_COLUMNS = ("label", "annotation")


MASK_PREFIX = "mask_"


ID2LABEL = "id2label.json"


IGNORE = 255


TABLE_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")


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
