"""How commands end: the @command wrapper (a UserError is one `error:` line and exit 2, a signal 128 + N, the one
place that maps a signal to an exit status) and StopSignals, which turns SIGTERM / SIGINT into Stopped so that
clean-ups run (at once, or after the training loop's step and save)."""
from __future__ import annotations

import functools
import signal
import sys
import threading
from typing import Callable

from giseg.utils.errors import UserError, storage_error_message
from giseg.utils.log import logger
from giseg.utils.memory import keep_freed_memory


class Stopped(Exception):
    """SIGTERM or SIGINT stopped a command; ``note`` says what was kept or cleaned (default: the temporary files
    went)."""

    def __init__(self, signum: int, note: str = ""):
        super().__init__(note)
        self.signum, self.note = signum, note


class StopSignals:
    """SIGTERM / SIGINT within a ``with`` block, the one design of the package's signal handling.

    at_once=True (stop_on_signals): the first signal calls ``on_stop(signum)`` (e.g. to pass it on to child
    processes) and raises Stopped, so that every ``finally`` and atomic_dir's clean-up runs (the default SIGTERM
    would end the process with its temporary folders left behind); later ones are logged and ignored while that
    clean-up runs. at_once=False (the training loop): the first is only remembered in ``signum``, so that the loop
    finishes its step, saves a resumable state and raises Stopped itself; a second SIGINT (Ctrl-C twice) raises
    KeyboardInterrupt at once. The previous handlers come back at the end. (Main thread only, as Python's signals.)
    """

    def __init__(self, on_stop: Callable[[int], None] | None = None, at_once: bool = True):
        self.on_stop, self.at_once = on_stop, at_once
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # (elsewhere Python has no signal handlers)
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum:
            if not self.at_once and signum == signal.SIGINT == self.signum:
                raise KeyboardInterrupt
            logger.warning("received %s again: still stopping (%s)", name,
                           "cleaning up" if self.at_once else "finishing the current step")
            return
        self.signum = signum
        if not self.at_once:
            logger.warning("received %s: finishing the current step, then saving a resumable state", name)
            return
        logger.warning("received %s: stopping", name)
        if self.on_stop is not None:
            self.on_stop(signum)
        raise Stopped(signum)


def stop_on_signals(on_stop: Callable[[int], None] | None = None) -> StopSignals:
    """Within the block, the first SIGTERM or SIGINT calls ``on_stop(signum)`` and raises Stopped (StopSignals)."""
    return StopSignals(on_stop, at_once=True)


def command(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Decorator of every command's ``main(argv)``: it returns the exit status, and a UserError becomes one
    ``error: ...`` line on stderr and exit status 2 (no traceback); SIGTERM / SIGINT (Ctrl-C) anywhere in the
    command one ``stopped by ...`` line and 128 + the signal's number, after every clean-up ran (Stopped)."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        keep_freed_memory()
        try:
            with stop_on_signals():  # (a command's own StopSignals, or the training loop's, takes over inside)
                return main(argv) or 0
        except KeyboardInterrupt:  # a second Ctrl-C where a first one is being handled (the training loop's)
            print("stopped by SIGINT", file=sys.stderr, flush=True)
            return 128 + signal.SIGINT
        except Stopped as e:
            print(f"stopped by {signal.Signals(e.signum).name}; {e.note or 'temporary files were removed'}",
                  file=sys.stderr, flush=True)
            return 128 + e.signum
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        except OSError as e:
            message = storage_error_message(e)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr, flush=True)
            return 2
    return run
