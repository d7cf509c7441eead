"""One model path for training and inference: the inference spec saved with every model, and the Segmenter.

    segmenter = Segmenter.load("runs/<name>/best", device)          # model + its spec, checked
    for row, masks in segmenter.iter_masks(index, rows, cache, neighbours): ...   # (C, H, W) at original size

``InferenceSpec`` (``inference_spec.json`` beside the weights) says how the model sees its inputs and reads its
outputs: dataset, task, classes, image size, context slices and stride, normalisation, thresholds. It is read back
strictly: a missing file, key or a value out of range is refused with one line naming it. (Folders written before
the spec existed carried the same facts as ``gi_*`` config attributes; they are converted, and only when every
one of them is there.)

``Segmenter`` is the path from prepared images to masks that the trainer's evaluation, predict.py, visualise.py
and the app share: input preparation (preprocess.py: the decode-once cache's own functions), forward (optionally
averaged with the flipped input's), logits upsampled bilinearly to any size (as the loss sees them), then the
spec's per-class probability thresholds on the sigmoid, or argmax over background + classes.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import numpy as np
import pandas as pd
import torch

from dataset import SliceDataset
from losses import upsample_like
from masks import MAX_CLASSES
from postprocess import (POSTPROCESS, class_probabilities, gate, masks_from_probabilities, postprocess_volume,
                         valid_rule)
from preprocess import prepare_scan, to_pixel_values
from utils import UserError, atomic_write_json

T = TypeVar("T")
SPEC_FILE = "inference_spec.json"
TASKS = ("multilabel", "multiclass")
SPLIT_KEYS = ("n_folds", "fold", "split_seed")
# added after the first version of the spec; older files lack them
OPTIONAL_KEYS = {"split", "dataset_options", "min_area", "min_prob", "postprocess"}


def task_labels(task: str, classes: tuple[str, ...]) -> dict[int, str]:
    """A model's id2label for ``task``: the classes, with background first for multiclass."""
    if task not in TASKS:
        raise UserError(f"--task must be one of {TASKS}, got {task!r}")
    return dict(enumerate(classes if task == "multilabel" else ("background", *classes)))


@dataclass(frozen=True)
class InferenceSpec:
    """What a trained model needs to see its inputs as in training and to turn its outputs into masks."""
    dataset: str  # the adapter's name (adapters.DATASETS)
    task: str  # multilabel (a sigmoid per class) or multiclass (softmax over background + classes)
    classes: tuple[str, ...]
    image_size: int  # square input size in pixels
    context_slices: int  # 1: the slice repeated into 3 channels; 3, 5 ...: 2.5D neighbours, one channel each
    context_stride: int
    mean: tuple[float, ...]  # per input channel
    std: tuple[float, ...]
    thresholds: tuple[float, ...]  # multilabel: one probability threshold per class; multiclass: () (argmax)
    split: dict | None = None  # the training split {"n_folds", "fold", "split_seed"}; None: not known (older folder)
    dataset_options: dict | None = None  # how a generic adapter (hf) read the data (trainer.dataset_options)
    # tune.py's choices per class (postprocess.py); None: off (a folder that was never tuned)
    min_area: tuple[float, ...] | None = None  # gate: fraction of a slice's pixels below which a class is dropped
    min_prob: tuple[float, ...] | None = None  # gate: a class whose highest probability is below it is dropped
    postprocess: tuple[str, ...] | None = None  # per volume: "none", "largest" or "min:<voxels>" (3D components)

    def __post_init__(self) -> None:
        for name in ("classes", "mean", "std", "thresholds", "min_area", "min_prob", "postprocess"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def problems(self) -> list[str]:
        """What is out of range, as 'field: why' strings (empty when the spec is valid)."""
        out = []
        if not isinstance(self.dataset, str) or not self.dataset:
            out.append(f"dataset: a registered dataset name, got {self.dataset!r}")
        if self.task not in TASKS:
            out.append(f"task: one of {TASKS}, got {self.task!r}")
        if not self.classes or not all(isinstance(c, str) and c for c in self.classes) or \
                len(self.classes) > MAX_CLASSES:
            out.append(f"classes: 1 to {MAX_CLASSES} names, got {list(self.classes)}")
        if not isinstance(self.image_size, int) or self.image_size < 32 or self.image_size % 32:
            out.append(f"image_size: a positive multiple of 32, got {self.image_size!r}")
        if not isinstance(self.context_slices, int) or self.context_slices < 1 or self.context_slices % 2 == 0:
            out.append(f"context_slices: an odd number >= 1, got {self.context_slices!r}")
        if not isinstance(self.context_stride, int) or self.context_stride < 1:
            out.append(f"context_stride: an integer >= 1, got {self.context_stride!r}")
        channels = max(3, self.context_slices if isinstance(self.context_slices, int) else 3)
        if len(self.mean) != channels or len(self.std) != channels or not all(s > 0 for s in self.std):
            out.append(f"mean, std: {channels} values each (one per input channel), std > 0, got {list(self.mean)}, "
                       f"{list(self.std)}")
        if self.split is not None and (not isinstance(self.split, dict) or set(self.split) != set(SPLIT_KEYS)
                                       or not all(isinstance(v, int) for v in self.split.values())):
            out.append(f"split: null or integers {list(SPLIT_KEYS)}, got {self.split!r}")
        if self.dataset_options is not None and not isinstance(self.dataset_options, dict):
            out.append(f"dataset_options: null or an object, got {self.dataset_options!r}")
        fraction = lambda v: isinstance(v, (int, float)) and 0 <= v < 1  # noqa: E731
        for name, ok, what in (("min_area", fraction, "fractions in [0, 1)"), ("min_prob", fraction, "values in [0, 1)"),
                               ("postprocess", valid_rule, f"one of {POSTPROCESS}")):
            value = getattr(self, name)
            if value is not None and (len(value) != len(self.classes) or not all(map(ok, value))):
                out.append(f"{name}: null or one per class, {what}, got {list(value)}")
        want = len(self.classes) if self.task == "multilabel" else 0
        if len(self.thresholds) != want or not all(0 < t < 1 for t in self.thresholds):
            out.append(f"thresholds: {want} value(s) in (0, 1) for task {self.task}, got {list(self.thresholds)}")
        return out

    def labels(self) -> dict[int, str]:
        return task_labels(self.task, self.classes)

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
        spec = cls(**raw)
        bad = spec.problems()
        if bad:
            raise UserError(f"{path}: {bad[0]}")
        return spec


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
    multiclass = cfg["gi_task"] == "multiclass"
    classes = labels[1:] if multiclass else labels
    return {"dataset": cfg["gi_dataset"], "task": cfg["gi_task"], "classes": classes,
            "image_size": pre["size"].get("height"), "context_slices": cfg["gi_context_slices"],
            "context_stride": cfg["gi_context_stride"], "mean": pre["image_mean"], "std": pre["image_std"],
            "thresholds": () if multiclass else (0.5,) * len(classes)}  # predict.py's threshold then


def masks_from_logits(logits: torch.Tensor, size: tuple[int, int], task: str,
                      thresholds: torch.Tensor | None) -> torch.Tensor:
    """(B, K, h, w) logits -> (B, C, H, W) bool masks at ``size``: logits upsampled bilinearly (as the loss sees
    them; upsampling probabilities instead scored 0.008 lower mean Dice on the demo), then sigmoid > per-class
    threshold (multilabel) or argmax over background + classes (multiclass; channel c is class c + 1)."""
    logits = upsample_like(logits.float(), tuple(size))
    if task == "multilabel":
        return torch.sigmoid(logits) > thresholds.to(logits.device).view(1, -1, 1, 1)
    labels = logits.argmax(1, keepdim=True)
    return labels == torch.arange(1, logits.shape[1], device=logits.device).view(1, -1, 1, 1)


class Segmenter:
    """A model that returns ``(logits, aux)`` (model.SegmentationModel, or the same under DDP) with its spec."""

    def __init__(self, model: torch.nn.Module, spec: InferenceSpec, device: torch.device | None = None):
        self.model, self.spec = model, spec
        self.device = device or next(model.parameters()).device
        self.thresholds = torch.tensor(spec.thresholds, dtype=torch.float32, device=self.device)

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> "Segmenter":
        """A trained model folder (``save_pretrained`` + spec), in eval mode on ``device``."""
        from model import SegmentationModel, auto_class  # transformers (1.8 s): only commands that load a model pay it

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"--model {folder}: no config.json; pass a folder written by the trainer (e.g. "
                            "runs/<name>/best)")
        spec = InferenceSpec.load(folder)
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
            hf = auto_class(model_type).from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise UserError(f"--model {folder}: not a segmentation model folder ({str(e).splitlines()[0]})") from None
        if hf.config.num_labels != len(spec.labels()):
            raise UserError(f"--model {folder}: the model has {hf.config.num_labels} outputs but its spec names "
                            f"{len(spec.labels())} ({', '.join(spec.labels().values())})")
        device = torch.device(device)
        return cls(SegmentationModel(hf).to(device).eval(), spec, device)

    def logits(self, pixel_values: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Logits at the model's output size; with ``tta`` averaged with those of the horizontally flipped input."""
        logits = self.model(pixel_values)[0]
        if tta:
            logits = 0.5 * (logits.float() + self.model(pixel_values.flip(-1))[0].float().flip(-1))
        return logits

    def masks(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, C, H, W) bool masks at ``size`` with the spec's thresholds (or argmax)."""
        return masks_from_logits(logits, size, self.spec.task, self.thresholds)

    def prepare(self, raw_channels: list[np.ndarray]) -> torch.Tensor:
        """Raw (H, W) scans of one slice (1, or its 2.5D neighbours) -> a (1, 3, S, S) input on the device,
        exactly as the decode-once cache and the data set prepare them."""
        images = np.stack([prepare_scan(raw, self.spec.image_size) for raw in raw_channels]).astype(np.float32)
        image = images[0] if len(images) == 1 else images.transpose(1, 2, 0)
        return torch.from_numpy(to_pixel_values(image, self.spec.mean, self.spec.std))[None].to(self.device)

    @torch.no_grad()
    def _iter_logits(self, index: pd.DataFrame, rows: np.ndarray, cache, neighbours: np.ndarray, batch_size: int,
                     mixed_precision: str, tta: bool, num_workers: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(row, its (1, K, h, w) logits) for ``rows``, in order, batched."""
        ds = SliceDataset(cache, rows, neighbours, None, self.spec.mean, self.spec.std)
        dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=self.device.type == "cuda")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        self.model.eval()
        for batch in dl:
            x = batch["pixel_values"].to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None and self.device.type == "cuda"):
                logits = self.logits(x, tta)
            for k, r in enumerate(batch["index"].tolist()):
                yield r, logits[k:k + 1]

    def iter_masks(self, index: pd.DataFrame, rows: np.ndarray, cache, neighbours: np.ndarray,
                   batch_size: int = 16, mixed_precision: str = "no", tta: bool = False,
                   num_workers: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (row, (C, H, W) bool masks at the slice's original size) for ``rows`` of ``index``, in order."""
        heights, widths = index["height"].to_numpy(), index["width"].to_numpy()
        for r, logits in self._iter_logits(index, rows, cache, neighbours, batch_size, mixed_precision, tta,
                                           num_workers):
            yield r, self.masks(logits, (int(heights[r]), int(widths[r])))[0].cpu().numpy()

    def iter_probabilities(self, index: pd.DataFrame, rows: np.ndarray, cache, neighbours: np.ndarray,
                           batch_size: int = 16, mixed_precision: str = "no", tta: bool = False,
                           num_workers: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (row, (K, H, W) float32 probabilities at the slice's original size): the sigmoid per class
        (multilabel) or the softmax over background + classes (multiclass) of the bilinearly upsampled logits."""
        heights, widths = index["height"].to_numpy(), index["width"].to_numpy()
        for r, logits in self._iter_logits(index, rows, cache, neighbours, batch_size, mixed_precision, tta,
                                           num_workers):
            logits = upsample_like(logits.float(), (int(heights[r]), int(widths[r])))
            probs = torch.sigmoid(logits) if self.spec.task == "multilabel" else torch.softmax(logits, 1)
            yield r, probs[0].cpu().numpy()


def group_by_volume(items: Iterable[tuple[int, T]], keys: np.ndarray) -> Iterator[list[tuple[int, T]]]:
    """Consecutive (row, item) pairs of one volume at a time; ``keys`` are the index's volume columns as an array
    (rows come volume by volume, as the index lists them)."""
    volume: list[tuple[int, T]] = []
    for r, item in items:
        if volume and tuple(keys[r]) != tuple(keys[volume[0][0]]):
            yield volume
            volume = []
        volume.append((r, item))
    if volume:
        yield volume


class Ensemble:
    """One trained model or several (folds of a run, or different families, each with its own image size,
    normalisation and 2.5D setting) whose probabilities are averaged with ``weights``, turned into masks by the
    first member's spec: thresholds, gates, and per-volume post-processing (postprocess.py). One model with an
    untuned spec gives exactly the masks of ``Segmenter.iter_masks``."""

    def __init__(self, members: list[Segmenter], weights: list[float] | None = None, names: list[str] | None = None):
        names = names or [f"model {i + 1}" for i in range(len(members))]
        first = members[0].spec
        for name, m in zip(names[1:], members[1:]):
            if (m.spec.task, m.spec.classes, m.spec.dataset) != (first.task, first.classes, first.dataset):
                raise UserError(f"--model {name}: {m.spec.task} {list(m.spec.classes)} on {m.spec.dataset} cannot be "
                                f"averaged with {names[0]}'s {first.task} {list(first.classes)} on {first.dataset}")
        weights = [1.0] * len(members) if weights is None else list(weights)
        if len(weights) != len(members) or not all(w > 0 for w in weights):
            raise UserError(f"--weights needs {len(members)} positive values (one per --model), got {weights}")
        self.members, self.names = members, names
        self.weights = [w / sum(weights) for w in weights]
        self.spec = first
        self.thresholds = tuple(first.thresholds)

    @classmethod
    def load(cls, folders: list[str | Path], device: torch.device | str = "cpu",
             weights: list[float] | None = None) -> "Ensemble":
        return cls([Segmenter.load(f, device) for f in folders], weights, [str(f) for f in folders])

    def with_decisions(self, thresholds=None, min_area=None, min_prob=None, postprocess=None) -> "Ensemble":
        """The same members with other thresholds, gates or post-processing (None: keep the current)."""
        spec = dataclasses.replace(self.spec, **{k: tuple(v) for k, v in dict(
            thresholds=thresholds, min_area=min_area, min_prob=min_prob, postprocess=postprocess).items()
            if v is not None})
        bad = spec.problems()
        if bad:
            raise UserError(bad[0])
        out = Ensemble.__new__(Ensemble)
        out.members, out.names, out.weights, out.spec, out.thresholds = (self.members, self.names, self.weights, spec,
                                                                         spec.thresholds)
        return out

    def inputs(self, adapter, index: pd.DataFrame, cache_dir: str | Path, num_threads: int = 1) -> list[tuple]:
        """Each member's (decode-once cache at its image size, neighbour table of its 2.5D setting)."""
        from cache import build_cache
        from data import neighbour_table

        caches: dict[int, object] = {}
        out = []
        for m in self.members:
            size = m.spec.image_size
            if size not in caches:
                caches[size] = build_cache(adapter, index, size, cache_dir, num_threads=num_threads)
            out.append((caches[size], neighbour_table(index, m.spec.context_slices, m.spec.context_stride,
                                                      adapter.volume_columns)))
        return out

    def iter_probabilities(self, index: pd.DataFrame, rows: np.ndarray, inputs: list[tuple], batch_size: int = 16,
                           mixed_precision: str = "no", tta: bool = False,
                           num_workers: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(row, (K, H, W) float32 weighted mean of the members' probabilities at original size), in order."""
        streams = [m.iter_probabilities(index, rows, cache, nb, batch_size, mixed_precision, tta, num_workers)
                   for m, (cache, nb) in zip(self.members, inputs)]
        for items in zip(*streams):
            r = items[0][0]
            probs = items[0][1] * self.weights[0]
            for w, (_, p) in zip(self.weights[1:], items[1:]):
                probs += w * p
            yield r, probs

    def _masks(self, probs: np.ndarray) -> np.ndarray:
        """(..., K, H, W) probabilities -> (..., C, H, W) masks after thresholds and gates."""
        masks = masks_from_probabilities(probs, self.spec.task, self.thresholds)
        zeros = (0.0,) * len(self.spec.classes)
        return gate(masks, class_probabilities(probs, self.spec.task), self.spec.min_area or zeros,
                    self.spec.min_prob or zeros)

    def iter_masks(self, index: pd.DataFrame, rows: np.ndarray, inputs: list[tuple],
                   volume_columns: tuple[str, ...], batch_size: int = 16, mixed_precision: str = "no", tta: bool = False,
                   num_workers: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(row, (C, H, W) bool masks at original size), in order. With post-processing, a volume's slices are
        collected first (``rows`` must list each volume's slices together, as the index does)."""
        probs = self.iter_probabilities(index, rows, inputs, batch_size, mixed_precision, tta, num_workers)
        rules = self.spec.postprocess
        if not rules or all(r == "none" for r in rules):
            for r, p in probs:
                yield r, self._masks(p)
            return
        masks = ((r, self._masks(p)) for r, p in probs)
        for volume in group_by_volume(masks, index[list(volume_columns)].to_numpy()):
            yield from self._flush(volume, rules)

    @staticmethod
    def _flush(volume: list[tuple[int, np.ndarray]], rules) -> Iterator[tuple[int, np.ndarray]]:
        done = postprocess_volume(np.stack([m for _, m in volume]), rules)
        for (r, _), m in zip(volume, done):
            yield r, m
