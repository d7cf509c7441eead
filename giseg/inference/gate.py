"""Slice gates: classifiers (--task presence) that say which classes a slice shows, and the rule that applies them.

    giseg predict --model runs/seg/best --gate_model runs/cls-a/best runs/cls-b/best ...

The gate's classifiers (one or several, their probabilities averaged) each see the slice as they were trained to
(own image size, normalisation and 2.5D context, from their own spec). A class stays on a slice when the mean
probability is at least the gate threshold and more than the minimum pixel count of it is predicted (the 1st-place
rule: probability > 0.6 and more than 12 pixels); otherwise the slice's mask of that class is emptied. The
thresholds are the classifiers' own until giseg tune chooses them (and the pixel counts) for a segmenter out of
fold, into its spec (gate_threshold, gate_min_pixels).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from giseg.inference.segmenter import iter_batches, load_trained, member_inputs
from giseg.inference.spec import InferenceSpec
from giseg.utils.errors import UserError


def gate_slice(masks: np.ndarray, presence: np.ndarray, thresholds, min_pixels) -> np.ndarray:
    """(..., C, H, W) bool masks with class c emptied where ``presence`` (..., C) < thresholds[c] or the mask has
    at most min_pixels[c] pixels."""
    keep = presence >= np.asarray(thresholds, np.float32)
    keep &= masks.sum((-2, -1)) > np.asarray(min_pixels)
    return masks & keep[..., None, None]


class SliceClassifier:
    """A trained slice classifier folder with its spec: per-class presence probabilities of slices."""

    def __init__(self, model: torch.nn.Module, spec: InferenceSpec, device: torch.device):
        self.model, self.spec, self.device = model, spec, device

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu", allow_bin: bool = False,
             flag: str = "--gate_model") -> "SliceClassifier":
        """Loaded without running its code or unpickling (models/safe.py), its spec checked against the model."""
        model, spec = load_trained(Path(folder), flag, allow_bin, presence=True)
        device = torch.device(device)
        return cls(model.to(device).eval(), spec, device)

    def iter_presence(self, rows: np.ndarray, cache, neighbours: np.ndarray, batch_size: int = 16,
                      mixed_precision: str = "no", num_workers: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(row, (C,) float32 probabilities) for ``rows``, in order, batched (one host transfer per batch)."""
        for batch_rows, probs in iter_batches(lambda x: torch.sigmoid(self.model(x)[0].float()), self.spec,
                                              self.device, rows, cache, neighbours, batch_size, mixed_precision,
                                              num_workers):
            yield from zip(batch_rows, probs.cpu().numpy())


class SliceGate:
    """One slice classifier or several (probabilities averaged); thresholds: the first one's spec."""

    def __init__(self, members: list[SliceClassifier], names: list[str]):
        first = members[0].spec
        for name, m in zip(names[1:], members[1:]):
            if (m.spec.classes, m.spec.dataset) != (first.classes, first.dataset):
                raise UserError(f"--gate_model {name}: classes {list(m.spec.classes)} on {m.spec.dataset} cannot be "
                                f"averaged with {names[0]}'s {list(first.classes)} on {first.dataset}")
        self.members, self.names, self.spec = members, names, first

    @classmethod
    def load(cls, folders: list[str | Path], device: torch.device | str = "cpu", allow_bin: bool = False) -> "SliceGate":
        return cls([SliceClassifier.load(f, device, allow_bin) for f in folders], [str(f) for f in folders])

    def check_fits(self, spec: InferenceSpec, name: str) -> None:
        """The gate must speak of the segmenter's classes, in its order, on its dataset."""
        if (self.spec.classes, self.spec.dataset, self.spec.channels) != (spec.classes, spec.dataset, spec.channels):
            raise UserError(f"--gate_model {self.names[0]}: classifies {list(self.spec.classes)} on "
                            f"{self.spec.dataset}, but {name} segments {list(spec.classes)} on {spec.dataset}; a gate "
                            "needs the segmenter's classes, in its order")

    def inputs(self, adapter, index: pd.DataFrame, cache_dir, num_threads: int = 1, caches: dict | None = None) -> list:
        """Each member's (cache at its image size, neighbour table of its 2.5D setting); ``caches`` by size, shared."""
        return member_inputs([m.spec for m in self.members], adapter, index, cache_dir, num_threads, caches)

    def iter_presence(self, rows: np.ndarray, inputs: list, batch_size: int = 16, mixed_precision: str = "no",
                      num_workers: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(row, (C,) mean probability of the members), in order."""
        streams = [m.iter_presence(rows, cache, nb, batch_size, mixed_precision, num_workers)
                   for m, (cache, nb) in zip(self.members, inputs)]
        for items in zip(*streams):
            yield items[0][0], np.mean([p for _, p in items], axis=0).astype(np.float32)
