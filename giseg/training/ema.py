"""Exponential moving average of a model's weights (``--ema_decay``), with a warm-up of the decay.

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
