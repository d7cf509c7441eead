"""--auto_batch_size: the largest training batch that fits the GPU for this model, size and precision, and the
learning rate scaled to it.

The search tries training steps (forward, loss, backward and an optimizer step, under the run's autocast) on blank
batches: the batch doubles from --train_batch_size until one does not fit (CUDA out of memory) or the cap (the
training slices, at most 1,024) is reached, then a binary search between the last that fitted and the first that
did not. Blank batches and a throwaway optimizer: the model's weights, buffers and random state are as before. A
margin of 10 % below the largest batch that fitted leaves room for what a real batch adds (augmentation on the
fly, fragmentation). The learning rate follows --lr_scaling from --train_batch_size (the reference batch): sqrt
(lr x sqrt(batch / reference), the default: safe for AdamW) or linear (lr x batch / reference, Goyal et al.'s rule
for SGD) or none. The chosen batch and lr are written to auto_batch.json in the run folder: a resume reuses them
(the batch fixes the epoch's steps, which an exact resume needs), and the log and the model card state them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from giseg.utils.files import atomic_write_json
from giseg.utils.log import logger

CAP = 1024
MARGIN = 0.9
RULES = ("sqrt", "linear", "none")
FILE = "auto_batch.json"
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # (torch.OutOfMemoryError: 2.5+)


def largest_batch(fits: Callable[[int], bool], start: int, cap: int) -> tuple[int, list[int]]:
    """The largest batch b <= ``cap`` for which ``fits(b)`` (from ``start``: doubling, then bisection), and the
    batches tried, in order. 0 when not even ``start`` fits."""
    tried, good, bad = [], 0, None
    b = min(start, cap)
    while b <= cap:
        tried.append(b)
        if not fits(b):
            bad = b
            break
        good = b
        if b == cap:
            break
        b = min(2 * b, cap)
    if good == 0:
        return 0, tried
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        tried.append(mid)
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, tried


def scaled_lr(lr: float, batch: int, reference: int, rule: str) -> float:
    """--lr for ``batch`` when it was chosen for ``reference``, by ``rule`` (RULES)."""
    ratio = batch / reference
    return lr * {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[rule]


def step_fits(model: torch.nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int, int],
              device: torch.device, autocast) -> Callable[[int], bool]:
    """fits(b): whether a training step of a blank batch of b images of ``shape`` (C, H, W) runs on ``device``
    without running out of memory; ``loss(outputs)`` makes a scalar of the model's outputs."""
    def fits(batch: int) -> bool:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=0.0, foreach=True)
        try:
            with autocast():
                out = model(torch.zeros(batch, *shape, device=device))
            loss(out).backward()
            optimizer.step()
            return True
        except OUT_OF_MEMORY:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            del optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return fits


def search(model: torch.nn.Module, shape: tuple[int, int, int], device: torch.device, autocast, start: int,
           cap: int) -> tuple[int, list[int]]:
    """The largest batch whose step fits, with the model's weights, buffers and random state left as they were."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        found, tried = largest_batch(step_fits(model, _output_sum, shape, device, autocast), start, cap)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return found, tried


def _output_sum(out) -> torch.Tensor:
    """A scalar of every floating output (a stand-in loss: the search measures memory, not learning)."""
    tensors = out if isinstance(out, (tuple, list)) else (out,)
    return sum(t.float().mean() for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


def resolve(cfg, model: torch.nn.Module, accelerator, out: Path, shape: tuple[int, int, int], n_train: int):
    """(batch, lr) of the run: auto_batch.json's on a resume; found, agreed over processes, saved and logged on a
    first start; --train_batch_size and --lr on a CPU (a CPU's memory is not what limits the batch)."""
    path = out / FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        logger.info("--auto_batch_size: batch %d, lr %g (%s, chosen when the run started)", saved["batch"],
                    saved["lr"], path)
        return saved["batch"], saved["lr"]
    device = accelerator.device
    if device.type != "cuda":
        logger.info("--auto_batch_size: no GPU here, so the batch stays --train_batch_size %d", cfg.train_batch_size)
        return cfg.train_batch_size, cfg.lr
    found, tried = search(model.to(device), shape, device, accelerator.autocast, cfg.train_batch_size,
                          min(CAP, max(cfg.train_batch_size, n_train)))
    # every rank's GPU must fit it: the minimum over ranks, as minus the maximum of minus (Accelerate's reduce has
    # "max", "sum" and "mean"; another name sums)
    found = -int(accelerator.reduce(torch.tensor(-found, device=device), "max").item())
    if found == 0:
        raise MemoryError(f"--auto_batch_size: not even --train_batch_size {cfg.train_batch_size} fits this GPU")
    batch = max(cfg.train_batch_size, int(found * MARGIN)) if found > cfg.train_batch_size else found
    lr = scaled_lr(cfg.lr, batch, cfg.train_batch_size, cfg.lr_scaling)
    logger.info("--auto_batch_size: batch %d (the largest that fitted: %d, less a 10%% margin; tried %s), lr %g "
                "(--lr %g x %s scaling from batch %d)", batch, found, tried, lr, cfg.lr, cfg.lr_scaling,
                cfg.train_batch_size)
    if accelerator.is_main_process:
        atomic_write_json(path, {"batch": batch, "lr": lr, "largest_fitting": found, "tried": tried,
                                 "reference_batch": cfg.train_batch_size, "reference_lr": cfg.lr,
                                 "rule": cfg.lr_scaling})
    return batch, lr
