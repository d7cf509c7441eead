"""An nnU-Net raw dataset's dataset.json: read and checked, its labels (classes and regions) as ours, the
channels of its images."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from giseg.data.masks import IGNORE_BIT, class_name_problems
from giseg.utils.errors import UserError


DATASET_JSON = "dataset.json"


ENDING = ".nii.gz"


SPLITS = {"train": "imagesTr", "test": "imagesTs"}  # --split names (and the folder names themselves)


PALETTE = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange")


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
        meta = json.loads(path.read_text(), object_pairs_hook=lambda pairs: unique_keys(pairs, path))
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
    if axis is not None and (type(axis) is not int or axis not in (0, 1, 2)):
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


def unique_keys(pairs: list, path: Path) -> dict:
    """A JSON object whose keys are each given once (json keeps the last of a repeated key, silently)."""
    keys = [k for k, _ in pairs]
    repeated = next((k for k in keys if keys.count(k) > 1), None)
    if repeated is not None:
        raise UserError(f"{path}: the key {repeated!r} is given {keys.count(repeated)} times in one object; give it once")
    return dict(pairs)


def channel_names(meta: dict):
    """dataset.json's channels: ``channel_names`` (v2), ``modality`` (v1), or one unnamed channel."""
    return meta.get("channel_names", meta.get("modality", {"0": "image"}))


MAX_LABEL = 65535  # a label map's values fit 16 bits (nnU-Net writes uint8 or uint16 segmentations)
IGNORE = "ignore"  # nnU-Net v2's ignore label: its pixels are unlabelled (not trained on, not scored)


def ignore_value(labels: dict, where: str) -> int | None:
    """The value of dataset.json's "ignore" label (None without one); nnU-Net v2 requires it to be the highest."""
    if IGNORE not in labels:
        return None
    value = labels[IGNORE]
    if type(value) is not int or not 0 < value <= MAX_LABEL:
        raise UserError(f"{where}: the {IGNORE!r} label is {value!r}; it is one integer in [1, {MAX_LABEL}]")
    others = [v for k, vals in labels.items() if k != IGNORE for v in (vals if isinstance(vals, list) else [vals])]
    if any(type(v) is int and v >= value for v in others):
        raise UserError(f"{where}: the {IGNORE!r} label ({value}) must be the highest label value, as nnU-Net v2 "
                        "requires")
    return value


def parse_labels(labels: dict, where: str) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """dataset.json's labels as (class names, the label values of each class), background and the ignore label
    (ignore_value) left out."""
    classes, values = [], []
    for name, value in labels.items():
        if name == IGNORE:
            continue
        vals = value if isinstance(value, list) else [value]
        if not vals or not all(type(v) is int and 0 <= v <= MAX_LABEL for v in vals):
            raise UserError(f"{where}: label {name!r} is {value!r}; a label is an integer in [0, {MAX_LABEL}] or a "
                            "list of them (a region)")
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
    for i, a in enumerate(values):
        twin = next((classes[j] for j, b in enumerate(values[:i]) if sorted(a) == sorted(b)), None)
        if twin is not None:
            raise UserError(f"{where}: labels {twin!r} and {classes[i]!r} are both {list(a)}: one class under two "
                            "names; give each class its own value")
    bad = class_name_problems(classes)
    if bad:
        raise UserError(f"{where}: {bad[0]}")
    return tuple(classes), tuple(values)


def overlap_priority(classes: tuple[str, ...], values: tuple[tuple[int, ...], ...]) -> tuple[str, ...]:
    """Where classes overlap, the one that wins in --task multiclass: the later region of dataset.json, as nnU-Net
    writes a label map from regions (plain labels never overlap: their order then)."""
    return tuple(reversed(classes)) if any(len(v) > 1 for v in values) else tuple(classes)


def label_table(values: tuple[tuple[int, ...], ...], ignore: int | None = None) -> np.ndarray:
    """label value -> packed byte (bit c: class c; the ignore label: the ignore bit alone); 0xFF: a value no class
    names (background 0 -> 0)."""
    lut = np.full(max(max(v) for v in (*values, (ignore or 0,))) + 1, 0xFF, np.uint8)
    lut[0] = 0
    if ignore is not None:
        lut[ignore] = 1 << IGNORE_BIT
    for c, vals in enumerate(values):
        for v in vals:
            lut[v] = (0 if lut[v] == 0xFF else lut[v]) | (1 << c)
    return lut
