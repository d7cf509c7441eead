"""Exponential moving average of a model's weights (``--ema_decay``).

After every optimizer step ``ema = decay * ema + (1 - decay) * weights`` for every floating-point parameter, and
buffers (BatchNorm statistics) are copied; the average starts from the weights at the start of training, so after
k steps ``ema_k = decay**k * w_0 + (1 - decay) * sum_i decay**(k - i) * w_i``. Evaluation, best/ and last/ use the
average; it is part of every resumable state.
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

    def _pairs(self, model: torch.nn.Module):
        mine = dict(self.model.named_parameters())
        return [(mine[n], p.detach()) for n, p in model.named_parameters() if n in mine and p.is_floating_point()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step towards ``model``'s current weights (the same module tree as the copy)."""
        pairs = self._pairs(model)
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [p.to(a.dtype) for a, p in pairs], 1.0 - self.decay)
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
