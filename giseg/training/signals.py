"""SIGTERM / SIGINT: finish the step, save a resumable state, stop; several processes agree on it."""
from __future__ import annotations

import signal

import torch

from giseg.utils.log import logger


# ---------------------------------------------------------------- signals
class Interrupted(Exception):
    """SIGTERM / SIGINT arrived; a resumable state was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopSignal:
    """Remembers SIGTERM / SIGINT so the loop can finish its step and save; a second SIGINT kills at once."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("received %s: finishing the current step, then saving a resumable state",
                       signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agreed_signal(accelerator, signum: int, step: int, log_every: int) -> int:
    """The signal every rank acts on: one process decides alone; several agree at each log step (a collective
    every log interval, not every step), or as soon as one of them has a signal (it waits for the others)."""
    if accelerator.num_processes == 1:
        return signum
    if step % log_every and not signum:
        return 0
    flag = torch.tensor(float(signum), device=accelerator.device)
    return int(accelerator.reduce(flag, "max").item())
