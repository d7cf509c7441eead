"""The inference spec (``inference_spec.json`` beside the weights): how a model sees its inputs and reads its outputs.

dataset, task, classes, image size, context slices and stride, normalisation, thresholds, the training split and
tune's decisions. It is read back strictly: a missing file, key or a value out of range is refused with one line
naming it. Fields that are also training flags carry ``flag`` metadata: TrainConfig gets them from here."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from giseg.data.masks import class_name_problems
from giseg.inference.postprocess import POSTPROCESS, valid_rule
from giseg.models.tasks import MULTILABEL, TASKS, get_task
from giseg.utils.errors import UserError
from giseg.utils.files import atomic_write_json
from giseg.utils.options import flag_metadata

SPEC_FILE = "inference_spec.json"
SPLIT_KEYS = ("n_folds", "fold", "split_seed")
# sane normalisation: inputs are scans scaled to [0, 1]; a std below MIN_STD (or NaN, inf) would blow them up
MIN_STD, MAX_STAT = 1e-3, 1e3


def is_number(v) -> bool:
    """A finite int or float (not a bool, a string or NaN)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def spec_flag(default, help: str, check, what: str, **meta) -> dict:
    """Metadata of a spec field that is also a training flag: utils.options.flag_metadata's (the one declaration
    of every option) under "flag", with the flag's default, from which TrainConfig (training/config.py) gets
    --<name>; ``check`` (with ``what`` it must be) validates it in the spec and on the CLI alike."""
    meta = flag_metadata(help, group="model and data", identity=True, card=True, check=check, what=what, **meta)
    return {"flag": {**meta, "default": default}, "check": check, "what": what}


def model_input_channels(context_slices: int, channels: int = 1) -> int:
    """The channels a model takes: ``context_slices`` slices of ``channels`` image channels each; a lone one is
    repeated into 3 (the pretrained RGB input), any other count widens the input layer (models/widen.py)."""
    total = context_slices * channels
    return 3 if total == 1 else total


def parse_patch(text: str) -> tuple[int, int, int] | None:
    """ "D,H,W" -> (D, H, W) of positive integers; None when it is not that."""
    parts = text.split(",") if isinstance(text, str) else []
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return None
    return tuple(int(p) for p in parts)


def spec_flags() -> list[dataclasses.Field]:
    """The spec fields that are training flags."""
    return [f for f in dataclasses.fields(InferenceSpec) if "flag" in f.metadata]


@dataclass(frozen=True)
class InferenceSpec:
    """What a trained model needs to see its inputs as in training and to turn its outputs into masks."""
    dataset: str  # the adapter's name (data/registry.py DATASETS)
    # Fields that are also training flags ("flag": TrainConfig gets each as --<name> with this default and help; the
    # trainer saves its value here). A new one goes at the end of the class with a default (older folders lack it).
    task: str = field(metadata=spec_flag(
        MULTILABEL.name, "; ".join(f"{t.name}: {t.about}" for t in TASKS.values()),
        lambda v: v in TASKS, f"one of {tuple(TASKS)}", choices=tuple(TASKS)))
    classes: tuple[str, ...]
    image_size: int = field(metadata=spec_flag(
        288, "square training size in pixels (multiple of 32)",
        lambda v: isinstance(v, int) and v >= 32 and v % 32 == 0, "a positive multiple of 32 (the models "
        "downsample by 32)"))
    context_slices: int = field(metadata=spec_flag(
        1, "1: the slice repeated into 3 channels; 3: 2.5D, slices -stride, 0, +stride of the same case-day; 5, 7 "
        "...: more neighbours, the model's first layer widened to take them (its pretrained weights shared out so "
        "that its output is unchanged for the same image in every channel)",
        lambda v: isinstance(v, int) and v >= 1 and v % 2 == 1, "an odd number >= 1 (1, 3, 5 ...)"))
    context_stride: int = field(metadata=spec_flag(
        2, "slice distance of the 2.5D neighbours", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"))
    mean: tuple[float, ...]  # per input channel
    std: tuple[float, ...]
    thresholds: tuple[float, ...]  # multilabel: one probability threshold per class; multiclass: () (argmax)
    split: dict | None = None  # the training split {"n_folds", "fold", "split_seed"}; None: not known (older folder)
    dataset_options: dict | None = None  # how a generic adapter (hf) read the data (trainer.dataset_options)
    # giseg tune's choices per class (inference/postprocess.py); None: off (a folder that was never tuned)
    min_area: tuple[float, ...] | None = None  # gate: fraction of a slice's pixels below which a class is dropped
    min_prob: tuple[float, ...] | None = None  # gate: a class whose highest probability is below it is dropped
    postprocess: tuple[str, ...] | None = None  # per volume: "none", "largest" or "min:<voxels>" (3D components)
    channels: int = 1  # the dataset's image channels (an nnU-Net dataset's channel_names; 1 for a scan)
    # giseg tune's slice gate (a segmenter's, tuned with --gate_model): a class stays on a slice when the slice
    # classifiers' mean probability is >= gate_threshold and more than gate_min_pixels of its pixels are predicted;
    # None: the classifiers' own thresholds and no pixel count (untuned)
    gate_threshold: tuple[float, ...] | None = None
    gate_min_pixels: tuple[int, ...] | None = None
    body_crop: bool = field(default=False, metadata=spec_flag(
        False, "crop each slice to its body before resizing: the bounding box of the largest bright component "
        "(> 0.1 of the slice's scale; arms and coil rims are smaller ones), the union over the slices of its volume, "
        "grown by --crop_margin and squared; predictions are pasted back at original size (data/preprocess.py)",
        lambda v: isinstance(v, bool), "true or false"))
    crop_margin: int = field(default=8, metadata=spec_flag(
        8, "--body_crop: pixels of the original slice kept around the body's box",
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"))
    # giseg export-onnx: the sha256 of the model.onnx exported beside this spec (None: never exported); the ONNX
    # backend runs no other file under this spec (a deploy folder has no weights to check it against)
    onnx_sha256: str | None = None
    # a 3D model (models/volume.py): the patch it trains on, and how inference covers a volume with such patches
    patch_size: str = field(default="", metadata=spec_flag(
        "", "3D models only (--base_model segresnet3d, swinunetr3d): the training patch as D,H,W (slices, rows, "
        "columns of the --image_size grid), each a multiple of the network's (SegResNet 8, SwinUNETR 32); slices "
        "keep their spacing (the slice axis is not resampled: masks are per slice), only rows and columns are "
        "resized to --image_size. Empty: 16 (SwinUNETR: 32) slices by the whole --image_size slice",
        lambda v: v == "" or parse_patch(v) is not None, "empty, or three positive integers D,H,W"))
    sw_overlap: float = field(default=0.5, metadata=spec_flag(
        0.5, "3D models only: how much neighbouring windows of the sliding-window inference overlap (MONAI's "
        "sliding_window_inference, Gaussian-weighted blending), in [0, 1)",
        lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"))

    def patch(self) -> tuple[int, int, int] | None:
        """A 3D model's patch (D, H, W); None for a 2D model."""
        return parse_patch(self.patch_size) if self.patch_size else None

    def crop(self) -> int | None:
        """The cache's crop margin (data/cache.py build_cache): None without --body_crop."""
        return self.crop_margin if self.body_crop else None

    def input_channels(self) -> int:
        if self.patch_size:  # a 3D network takes the image's own channels
            return self.channels
        return model_input_channels(self.context_slices, self.channels)

    def __post_init__(self) -> None:
        for name in ("classes", "mean", "std", "thresholds", "min_area", "min_prob", "postprocess", "gate_threshold",
                     "gate_min_pixels"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def problems(self) -> list[str]:
        """What is out of range, as 'field: why' strings (empty when the spec is valid)."""
        out = []
        if not isinstance(self.dataset, str) or not self.dataset:
            out.append(f"dataset: a registered dataset name, got {self.dataset!r}")
        out += [f"{f.name}: {f.metadata['what']}, got {getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                if "check" in f.metadata and not f.metadata["check"](getattr(self, f.name))]
        bad_names = class_name_problems(self.classes) if isinstance(self.classes, tuple) else ["not a list"]
        if bad_names:
            out.append(f"classes: {bad_names[0]}")
        if not (isinstance(self.channels, int) and not isinstance(self.channels, bool) and self.channels >= 1):
            out.append(f"channels: an integer >= 1 (the image's channels), got {self.channels!r}")
        channels = self.input_channels() if not out else max(3, self.context_slices if isinstance(
            self.context_slices, int) else 3)
        for name, low, high in (("mean", -MAX_STAT, MAX_STAT), ("std", MIN_STD, MAX_STAT)):
            values = getattr(self, name)
            if len(values) != channels or not all(is_number(v) and low <= v <= high for v in values):
                out.append(f"{name}: {channels} numbers (one per input channel) in [{low:g}, {high:g}], got "
                           f"{list(values)}")
        if self.split is not None and (not isinstance(self.split, dict) or set(self.split) != set(SPLIT_KEYS)
                                       or not all(isinstance(v, int) for v in self.split.values())):
            out.append(f"split: null or integers {list(SPLIT_KEYS)}, got {self.split!r}")
        if self.dataset_options is not None and not isinstance(self.dataset_options, dict):
            out.append(f"dataset_options: null or an object, got {self.dataset_options!r}")
        fraction = lambda v: is_number(v) and 0 <= v < 1  # noqa: E731
        count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
        for name, ok, what in (("min_area", fraction, "fractions in [0, 1)"), ("min_prob", fraction, "values in [0, 1)"),
                               ("postprocess", valid_rule, f"one of {POSTPROCESS}"),
                               ("gate_threshold", fraction, "values in [0, 1)"),
                               ("gate_min_pixels", count, "integers >= 0")):
            value = getattr(self, name)
            if value is not None and (len(value) != len(self.classes) or not all(map(ok, value))):
                out.append(f"{name}: null or one per class, {what}, got {list(value)}")
        patch = self.patch() if isinstance(self.patch_size, str) else None
        if patch and isinstance(self.image_size, int) and max(patch[1:]) > self.image_size:
            out.append(f"patch_size: rows and columns at most --image_size {self.image_size}, got {self.patch_size}")
        if patch and self.context_slices != 1:
            out.append(f"context_slices: 1 for a 3D model (it sees the neighbouring slices itself), got "
                       f"{self.context_slices}")
        want = TASKS[self.task].n_thresholds(self.classes) if self.task in TASKS else len(self.classes)
        if len(self.thresholds) != want or not all(is_number(t) and 0 < t < 1 for t in self.thresholds):
            out.append(f"thresholds: {want} value(s) in (0, 1) for task {self.task}, got {list(self.thresholds)}")
        return out

    def labels(self) -> dict[int, str]:
        return get_task(self.task).labels(self.classes)

    def save(self, folder: str | Path) -> None:
        atomic_write_json(Path(folder) / SPEC_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> "InferenceSpec":
        """The spec of a model folder, checked; one UserError line naming what is missing or wrong."""
        folder = Path(folder)
        path = folder / SPEC_FILE
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: not valid JSON ({e})") from None
        else:
            raw = _legacy_spec(folder)
        fields = {f.name for f in dataclasses.fields(cls)}
        got = set(raw) if isinstance(raw, dict) else set()
        if not isinstance(raw, dict) or not fields - OPTIONAL_KEYS <= got <= fields:
            raise UserError(f"{path}: keys must be {sorted(fields)} ({sorted(OPTIONAL_KEYS)} optional); missing "
                            f"{sorted(fields - OPTIONAL_KEYS - got)}, unknown {sorted(got - fields)}")
        for key in ("classes", "mean", "std", "thresholds", "min_area", "min_prob", "postprocess", "gate_threshold",
                    "gate_min_pixels"):
            if raw.get(key) is not None and not isinstance(raw[key], (list, tuple)):
                raise UserError(f"{path}: {key}: a list, got {raw[key]!r}")
        spec = cls(**raw)
        bad = spec.problems()
        if bad:
            raise UserError(f"{path}: {bad[0]}")
        return spec


# added after the first version of the spec (they have defaults); older files lack them
OPTIONAL_KEYS = {f.name for f in dataclasses.fields(InferenceSpec) if f.default is not dataclasses.MISSING}


def _legacy_spec(folder: Path) -> dict:
    """The spec of a folder written before inference_spec.json, from its gi_* config attributes and image
    processor; refused unless every fact is there (no silent defaults)."""
    config, proc = folder / "config.json", folder / "preprocessor_config.json"
    cfg = json.loads(config.read_text()) if config.is_file() else {}
    pre = json.loads(proc.read_text()) if proc.is_file() else {}
    needed = {"gi_task": cfg, "gi_dataset": cfg, "gi_context_slices": cfg, "gi_context_stride": cfg,
              "id2label": cfg, "size": pre, "image_mean": pre, "image_std": pre}
    missing = [k for k, src in needed.items() if k not in src]
    if missing:
        raise UserError(f"{folder}: no {SPEC_FILE} (and no complete settings of an earlier version: {missing[0]} "
                        "missing); pass a model folder written by trainer.py, e.g. runs/<name>/best")
    labels = tuple(cfg["id2label"][k] for k in sorted(cfg["id2label"], key=int))
    background = get_task(cfg["gi_task"]).background
    classes = labels[1:] if background else labels
    return {"dataset": cfg["gi_dataset"], "task": cfg["gi_task"], "classes": classes,
            "image_size": pre["size"].get("height"), "context_slices": cfg["gi_context_slices"],
            "context_stride": cfg["gi_context_stride"], "mean": pre["image_mean"], "std": pre["image_std"],
            "thresholds": () if background else (0.5,) * len(classes)}  # giseg predict's threshold then
