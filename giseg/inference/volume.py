"""Inference of a 3D model (models/volume.py): a whole volume covered by MONAI's sliding window, per-slice logits out.

``sliding_logits`` turns a (1, C, D, S, S) volume into (D, K, S, S) logits: windows of the spec's patch that overlap
by ``sw_overlap``, each window's logits weighted by a Gaussian centred on it (MONAI's ``sliding_window_inference``,
mode "gaussian": a voxel near a window's edge counts less). From there a 3D model's logits are slices like any
model's: thresholds, post-processing, submissions, ensembles with 2D members and scores are the same code.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import torch

from giseg.data.patches import read_volume, volume_rows
from giseg.data.registry import get_adapter
from giseg.models.volume import require_monai

SW_BATCH_SIZE = 4  # windows per forward pass


def sliding_logits(model: torch.nn.Module, pixel_values: torch.Tensor, patch: tuple[int, int, int], overlap: float,
                   tta: bool = False) -> torch.Tensor:
    """(1, C, D, H, W) -> (D, K, H, W) float logits of the whole volume (with ``tta``: averaged with those of the
    left-right flipped volume)."""
    require_monai("a 3D model's sliding-window inference")
    from monai.inferers.utils import sliding_window_inference  # MONAI (the [3d] extra): only for a 3D model

    def forward(window: torch.Tensor) -> torch.Tensor:  # (channels_last_3d, the trainer's: benchmarks/volume_step.py)
        return model(window.contiguous(memory_format=torch.channels_last_3d))[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(x, patch, SW_BATCH_SIZE, forward, overlap=overlap, mode="gaussian").float()

    logits = run(pixel_values)
    if tta:
        logits = 0.5 * (logits + run(pixel_values.flip(-1)).flip(-1))
    return logits[0].transpose(0, 1)


def iter_volume_logits(segmenter, index: pd.DataFrame, rows: np.ndarray, cache, mixed_precision: str,
                       tta: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """(row, its (1, K, S, S) logits) for ``rows``, in order: each volume that holds one of them is predicted
    whole (every slice of it in ``index``, so a slice sees its neighbours whatever rows were asked for), once."""
    spec, device = segmenter.spec, segmenter.device
    columns = get_adapter(spec.dataset).volume_columns
    volumes = volume_rows(index, np.arange(len(index)), columns)
    owner = np.empty(len(index), dtype=np.int64)
    for k, members in enumerate(volumes):
        owner[members] = k
    rows = np.asarray(rows, dtype=np.int64)
    left = np.bincount(owner[rows], minlength=len(volumes))  # rows still to yield, per volume
    done: dict[int, dict[int, torch.Tensor]] = {}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    for r in rows:
        k = int(owner[r])
        if k not in done:
            x = torch.from_numpy(read_volume(cache, volumes[k], spec.channels, spec.mean, spec.std))[None]
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype,
                                                 enabled=dtype is not None and device.type == "cuda"):
                logits = segmenter.logits(x.to(device), tta)
            done[k] = {int(v): logits[j:j + 1] for j, v in enumerate(volumes[k])}
        yield int(r), done[k][int(r)]
        left[k] -= 1
        if left[k] == 0:
            del done[k]
