"""Optimizer, learning-rate schedule (warm-up, then cosine, poly, MultiStepLR or constant) and early stopping."""
from __future__ import annotations

import math

import torch

from giseg.training.config import TrainConfig


def lr_factor(step: int, total: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` of ``total``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.scheduler_name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.scheduler_name == "poly":
        return 1.0 - progress
    if cfg.scheduler_name == "MultiStepLR":
        milestones = ([int(m) for m in cfg.lr_milestones.split(",")] if cfg.lr_milestones
                      else [int(0.6 * cfg.epochs), int(0.85 * cfg.epochs)])
        return cfg.lr_gamma ** sum(step >= m * steps_per_epoch for m in milestones)
    return 1.0


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "AdamW":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
    if cfg.optimizer == "Adam":
        return torch.optim.Adam(groups, lr=cfg.lr, fused=device.type == "cuda")
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)


def should_stop_early(history: list[dict], best_step: int, patience: int) -> bool:
    """True when ``patience`` > 0 evaluations came after the best one (none of them better)."""
    return patience > 0 and sum(r["step"] > best_step for r in history) >= patience
