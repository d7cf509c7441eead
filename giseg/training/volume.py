"""What training a 3D model (models/volume.py) changes: its patch, the flags that do not apply, its loaders.

The loop itself is the same: a batch of patches (B, C, d, h, w) gives (B, K, d, h, w) logits, which the loss sees as
B x d slices (every --loss recipe works unchanged); evaluation covers each validation volume with the sliding
window (inference/volume.py) and scores its slices as every other model's.
"""
from __future__ import annotations

import math
import os

import torch

from giseg.data.patches import PatchDataset, VolumeDataset, volume_rows
from giseg.inference.spec import InferenceSpec, parse_patch
from giseg.models.volume import patch_multiple
from giseg.training.config import TrainConfig
from giseg.utils.errors import UserError
from giseg.utils.log import logger

DEPTH = 16  # the default patch's slices (SwinUNETR: its least side, 64)


def is_volume_model(hf_model: torch.nn.Module) -> bool:
    return hf_model.config.model_type == "gi_volume"


def check_flags(cfg: TrainConfig, volume: bool) -> None:
    """One line for a flag that a 3D model cannot honour (or --patch_size given to a 2D one)."""
    if not volume:
        if cfg.patch_size:
            raise UserError(f"--patch_size {cfg.patch_size}: only for a 3D model (--base_model segresnet3d, "
                            f"swinunetr3d or a folder of one); {cfg.base_model} is 2D")
        return
    refused = (("--context_slices", cfg.context_slices != 1, "a 3D model sees the neighbouring slices itself"),
               ("--cutmix_prob / --mixup_prob", bool(cfg.cutmix_prob or cfg.mixup_prob), "they mix 2D slices"),
               ("--empty_slice_fraction", cfg.empty_slice_fraction >= 0, "a patch spans organ-free slices and organs; "
                "patches are centred on an organ a third of the time instead"),
               ("--channels_last", cfg.channels_last, "a 2D memory format (a 3D model uses channels_last_3d)"),
               ("--auto_batch_size", cfg.auto_batch_size, "its search tries 2D slices; give --train_batch_size"))
    for name, bad, why in refused:
        if bad:
            raise UserError(f"{name} does not apply to a 3D model ({cfg.base_model}): {why}")


def resolve_patch(cfg: TrainConfig, hf_model: torch.nn.Module) -> str:
    """The run's patch as "D,H,W": --patch_size, checked against the network's multiple and least side and
    --image_size, or the default (DEPTH slices, or the network's least side if larger, by the whole --image_size
    slice)."""
    multiple, least = patch_multiple(hf_model.config)
    if not cfg.patch_size:
        if cfg.image_size < least:
            raise UserError(f"--image_size {cfg.image_size}: a {hf_model.config.architecture} patch needs rows and "
                            f"columns of at least {least}")
        return f"{max(DEPTH, least)},{cfg.image_size},{cfg.image_size}"
    patch = parse_patch(cfg.patch_size)
    if patch is None or any(p % multiple or p < least for p in patch) or max(patch[1:]) > cfg.image_size:
        raise UserError(f"--patch_size {cfg.patch_size}: three integers D,H,W, each a multiple of {multiple} and at "
                        f"least {least} ({hf_model.config.architecture}), rows and columns at most --image_size "
                        f"{cfg.image_size}")
    return cfg.patch_size


def make_volume_loaders(cfg: TrainConfig, data, spec: InferenceSpec, volume_columns: tuple[str, ...],
                        process_index: int, processes: int):
    """Training patches (an epoch: about as many slices as the training set, at least one patch per volume) and the
    validation volumes of this process (each process scores its share; evaluate gathers the slices)."""
    patch = spec.patch()
    train = volume_rows(data.index, data.train_rows, volume_columns)
    length = max(len(train), math.ceil(len(data.train_rows) / patch[0]))
    train_ds = PatchDataset(data.cache, train, patch, spec.channels, len(spec.classes), spec.mean, spec.std,
                            cfg.seed, length)
    workers = cfg.num_workers if cfg.num_workers >= 0 else min(8, (os.cpu_count() or 1) // processes)
    train_dl = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.train_batch_size, shuffle=True, drop_last=len(train_ds) >= 2 * cfg.train_batch_size,
        generator=torch.Generator().manual_seed(cfg.seed), num_workers=workers, persistent_workers=workers > 0)
    logger.info("3D: patches of %s (slices, rows, columns) from %d training volumes, %d per epoch (a third centred "
                "on an organ); validation: whole volumes, sliding window with overlap %g", "x".join(map(str, patch)),
                len(train), length, spec.sw_overlap)
    if not len(data.val_rows):
        return train_dl, None
    val = volume_rows(data.index, data.val_rows, volume_columns)[process_index::processes]
    val_ds = VolumeDataset(data.cache, val, spec.channels, spec.mean, spec.std)
    return train_dl, torch.utils.data.DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=0)

