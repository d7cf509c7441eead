"""Ensembles: several models (or folds) averaged at original size, each with its own cache, size and 2.5D."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import numpy as np
import pandas as pd
import torch

from giseg.inference.gate import gate_slice
from giseg.inference.postprocess import class_probabilities, gate, masks_from_probabilities, postprocess_volume
from giseg.inference.segmenter import Segmenter, member_inputs
from giseg.utils.errors import UserError

T = TypeVar("T")


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
    first member's spec: thresholds, gates, and per-volume post-processing (inference/postprocess.py). One model with an
    untuned spec gives exactly the masks of ``Segmenter.iter_masks``."""

    def __init__(self, members: list[Segmenter], weights: list[float] | None = None, names: list[str] | None = None):
        names = names or [f"model {i + 1}" for i in range(len(members))]
        first = members[0].spec
        for name, m in zip(names[1:], members[1:]):
            if (m.spec.task, m.spec.classes, m.spec.dataset) != (first.task, first.classes, first.dataset):
                raise UserError(f"--model {name}: {m.spec.task} {list(m.spec.classes)} on {m.spec.dataset} cannot be "
                                f"averaged with {names[0]}'s {first.task} {list(first.classes)} on {first.dataset}")
            if (m.spec.dataset_options or {}) != (first.dataset_options or {}):
                raise UserError(f"--model {name}: trained on data read with other options ({m.spec.dataset_options}) "
                                f"than {names[0]} ({first.dataset_options}): their labels may mean different "
                                "things (e.g. --reduce_labels); the models read its data with other options")
        weights = [1.0] * len(members) if weights is None else list(weights)
        if len(weights) != len(members) or not all(math.isfinite(w) and w > 0 for w in weights):
            raise UserError(f"--weights needs {len(members)} positive values (one per --model), got {weights}")
        self.members, self.names = members, names
        self.weights = [w / sum(weights) for w in weights]
        self.spec = first
        self.thresholds = tuple(first.thresholds)
        self.gate = None  # a SliceGate (inference/gate.py): with_gate

    def with_gate(self, gate) -> "Ensemble":
        """The same members, their masks gated per slice and class by ``gate`` (a SliceGate; None: no gate)."""
        if gate is not None:
            gate.check_fits(self.spec, self.names[0])
        out = self.with_decisions()
        out.gate = gate
        return out

    def gate_values(self) -> tuple[tuple, tuple]:
        """The gate's (threshold, minimum pixel count) per class: tune's (the spec's), else the classifiers' own
        thresholds and no pixel count."""
        n = len(self.spec.classes)
        return (self.spec.gate_threshold or tuple(self.gate.spec.thresholds),
                self.spec.gate_min_pixels or (0,) * n)

    @classmethod
    def load(cls, folders: list[str | Path], device: torch.device | str = "cpu",
             weights: list[float] | None = None, allow_bin: bool = False, backend: str = "eager") -> "Ensemble":
        return cls([Segmenter.load(f, device, allow_bin, backend) for f in folders], weights, [str(f) for f in folders])

    def with_decisions(self, thresholds=None, min_area=None, min_prob=None, postprocess=None, gate_threshold=None,
                       gate_min_pixels=None) -> "Ensemble":
        """The same members with other thresholds, gates or post-processing (None: keep the current)."""
        spec = dataclasses.replace(self.spec, **{k: tuple(v) for k, v in dict(
            thresholds=thresholds, min_area=min_area, min_prob=min_prob, postprocess=postprocess,
            gate_threshold=gate_threshold, gate_min_pixels=gate_min_pixels).items() if v is not None})
        bad = spec.problems()
        if bad:
            raise UserError(bad[0])
        out = Ensemble.__new__(Ensemble)
        out.members, out.names, out.weights, out.spec, out.thresholds = (self.members, self.names, self.weights, spec,
                                                                         spec.thresholds)
        out.gate = getattr(self, "gate", None)
        return out

    def inputs(self, adapter, index: pd.DataFrame, cache_dir: str | Path, num_threads: int = 1) -> list[tuple]:
        """Each member's (decode-once cache at its image size, neighbour table of its 2.5D setting)."""
        for name, m in zip(self.names, self.members):
            if m.spec.channels != adapter.channels:
                raise UserError(f"--model {name}: takes images of {m.spec.channels} channel(s); this data has "
                                f"{adapter.channels}")
        caches: dict = {}
        out = member_inputs([m.spec for m in self.members], adapter, index, cache_dir, num_threads, caches)
        if self.gate is not None:  # the gate's classifiers' inputs follow the members'
            out += self.gate.inputs(adapter, index, cache_dir, num_threads, caches)
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
        masks = ((r, self._masks(p)) for r, p in probs)
        if self.gate is not None:  # per slice and class, before the volume's post-processing
            if len(inputs) != len(self.members) + len(self.gate.members):
                raise ValueError("the inputs were made before the gate was set: call inputs() on the gated ensemble")
            presence = self.gate.iter_presence(rows, inputs[len(self.members):], batch_size, mixed_precision,
                                               num_workers)
            thresholds, min_pixels = self.gate_values()
            masks = ((r, gate_slice(m, p, thresholds, min_pixels)) for (r, m), (_, p) in zip(masks, presence))
        rules = self.spec.postprocess
        if not rules or all(r == "none" for r in rules):
            yield from masks
            return
        for volume in group_by_volume(masks, index[list(volume_columns)].to_numpy()):
            yield from self._flush(volume, rules)

    @staticmethod
    def _flush(volume: list[tuple[int, np.ndarray]], rules) -> Iterator[tuple[int, np.ndarray]]:
        done = postprocess_volume(np.stack([m for _, m in volume]), rules)
        for (r, _), m in zip(volume, done):
            yield r, m
