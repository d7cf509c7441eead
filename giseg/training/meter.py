"""Training losses summed on the device, read back only at log steps, saves and epoch ends; images/s; the time
elapsed and the time left."""
from __future__ import annotations

import time

import torch

from giseg.training.checkpoints import TrainState


# ---------------------------------------------------------------- the loop
class LossMeter:
    """Training losses summed on the device; read back (one host sync) only at log steps, saves and epoch ends.
    The epoch's sum starts from the state's, so an epoch resumed midway still averages all its batches."""

    def __init__(self, device: torch.device, state: TrainState):
        self.running = torch.zeros((), device=device)
        self.epoch = torch.full((), state.epoch_loss_sum, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.running_n, self.epoch_n, self.images = 0, state.batches_in_epoch, 0
        self.clock = time.perf_counter()
        self.banked_images, self.banked_seconds = 0, 0.0
        self.started, self.start_step = self.clock, state.global_step  # (this process's start: a resume's own)

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.nonfinite |= ~torch.isfinite(loss)
        self.running += loss
        self.epoch += loss
        self.running_n += 1
        self.epoch_n += 1
        self.images += images

    def new_epoch(self) -> None:
        self.epoch.zero_()
        self.epoch_n = 0

    def epoch_sum(self, accelerator) -> float:
        """The epoch's loss sum, averaged over processes (the same on every rank; a collective)."""
        return float(accelerator.reduce(self.epoch.clone(), "mean"))

    def restart_clock(self) -> None:
        """images/s measures training only, not evaluation and saving."""
        self.clock, self.images = time.perf_counter(), 0

    def bank(self) -> float:
        """Images/s since the clock started; added to the evaluation's figure, and the clock restarted."""
        dt = max(time.perf_counter() - self.clock, 1e-9)
        rate = self.images / dt
        self.banked_images, self.banked_seconds = self.banked_images + self.images, self.banked_seconds + dt
        self.restart_clock()
        return rate

    def banked_rate(self) -> float:
        """Images/s of the training since the last evaluation (its record's ``images_per_s``)."""
        self.bank()
        rate = self.banked_images / max(self.banked_seconds, 1e-9)
        self.banked_images, self.banked_seconds = 0, 0.0
        return rate

    def eta(self, step: int, total: int) -> str:
        """'elapsed 1m05s, ETA 3m10s': the time since this process started training, and the steps left at the pace
        of the steps it did (evaluations and saves included)."""
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        left = f"ETA {duration(elapsed / done * (total - step))}" if done > 0 else "ETA unknown"
        return f"elapsed {duration(elapsed)}, {left}"


def duration(seconds: float) -> str:
    """42 -> '42s', 65 -> '1m05s', 7380 -> '2h03m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
