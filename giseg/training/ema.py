"""Averages of a model's weights that evaluation and the saved models use: the exponential moving average
(``--ema_decay``, WeightEMA) and stochastic weight averaging (``--swa_start_epoch``, WeightSWA).

EMA, with a warm-up of the decay.

After every optimizer step ``ema = d_t * ema + (1 - d_t) * weights`` for every floating-point parameter, and
buffers (BatchNorm statistics) are copied. The average starts from the weights at the start of training, and its
decay warms up, ``d_t = min(decay, (1 + t) / (10 + t))`` at the t-th update (as timm's and other EMA
implementations do): without it, a random initialisation would weigh ``decay**k`` in the average after k steps (0.96
of it after 38 steps at 0.999), and a short run's average would be worse than predicting nothing. Evaluation, best/
and last/ use the average; it is part of every resumable state, with its step count.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch


class WeightEMA:
    """A frozen copy of ``model`` (unwrapped: no DDP) that follows its weights; ``save``/``load`` put it into a
    resumable state and back."""

    file = "ema.safetensors"  # its name in a resumable state

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.steps = 0

    def decay_now(self) -> float:
        """The decay of the next update: warmed up over the first steps, then ``decay``."""
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    def _pairs(self, model: torch.nn.Module):
        mine = dict(self.model.named_parameters())
        return [(mine[n], p.detach()) for n, p in model.named_parameters() if n in mine and p.is_floating_point()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step towards ``model``'s current weights (the same module tree as the copy)."""
        pairs = self._pairs(model)
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [p.to(a.dtype) for a, p in pairs], 1.0 - self.decay_now())
        mine = dict(self.model.named_buffers())
        for n, b in model.named_buffers():
            if n in mine:
                mine[n].copy_(b)
        self.steps += 1

    def save(self, path: str | Path) -> None:
        """The average as safetensors (no pickle), with its step count."""
        from safetensors.torch import save_model

        save_model(self.model, str(path), metadata={"steps": str(self.steps), "decay": repr(self.decay)})

    def load(self, path: str | Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_model

        load_model(self.model, str(path), device=str(next(self.model.parameters()).device))
        with safe_open(str(path), "pt") as f:
            self.steps = int(f.metadata()["steps"])


class WeightSWA:
    """Stochastic weight averaging (Izmailov et al. 2018; torch.optim.swa_utils' equal average): the mean of the
    weights at the ends of epochs ``start_epoch``, ``start_epoch`` + 1, ... (1-based). Until the first of them it
    follows the weights after every optimizer step, so evaluation, best/ and last/ are the trained model's; from
    then on they are the average's. Buffers (BatchNorm statistics) are copied at each snapshot; the trainer then
    recomputes BatchNorm statistics for the averaged weights (recompute_batchnorm). ``save``/``load`` as WeightEMA."""
    file = "swa.safetensors"

    def __init__(self, model: torch.nn.Module, start_epoch: int):
        if start_epoch < 1:
            raise ValueError(f"SWA start epoch must be >= 1, got {start_epoch}")
        self.start_epoch, self.averaged, self.steps = start_epoch, 0, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def _pairs(self, model: torch.nn.Module):
        mine = dict(self.model.named_parameters())
        return [(mine[n], p.detach()) for n, p in model.named_parameters() if n in mine and p.is_floating_point()]

    def _copy_buffers(self, model: torch.nn.Module) -> None:
        mine = dict(self.model.named_buffers())
        for n, b in model.named_buffers():
            if n in mine:
                mine[n].copy_(b)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """After an optimizer step: before the first snapshot, the copy is the model."""
        if self.averaged == 0:
            pairs = self._pairs(model)
            torch._foreach_copy_([a for a, _ in pairs], [p.to(a.dtype) for a, p in pairs])
            self._copy_buffers(model)
        self.steps += 1

    @torch.no_grad()
    def end_epoch(self, model: torch.nn.Module, epoch: int) -> bool:
        """At the end of (1-based) ``epoch``: from ``start_epoch`` on, add the weights to the average (True)."""
        if epoch < self.start_epoch:
            return False
        self.averaged += 1
        pairs = self._pairs(model)
        torch._foreach_lerp_([a for a, _ in pairs], [p.to(a.dtype) for a, p in pairs], 1.0 / self.averaged)
        self._copy_buffers(model)
        return True

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_model

        save_model(self.model, str(path), metadata={"steps": str(self.steps), "averaged": str(self.averaged),
                                                     "start_epoch": str(self.start_epoch)})

    def load(self, path: str | Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_model

        load_model(self.model, str(path), device=str(next(self.model.parameters()).device))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            self.steps, self.averaged = int(meta["steps"]), int(meta["averaged"])


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, loader, device) -> int:
    """BatchNorm running statistics of ``model`` (the average) recomputed from scratch on ``loader``'s batches (the
    training slices, not augmented, in order: no random state is drawn), as torch.optim.swa_utils.update_bn does;
    the other layers in eval mode (dropout off); the model's mode is restored after. Returns the number of images
    seen."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta, was_training = [m.momentum for m in norms], model.training
    model.eval()  # dropout and the rest as in inference, whatever mode an evaluation left the model in
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
        m.train()
    seen = 0
    try:
        for batch in loader:
            model(batch["pixel_values"].to(device))
            seen += batch["pixel_values"].shape[0]
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return seen
