"""How commands end: the @command wrapper (a UserError is one `error:` line and exit 2, a signal 128 + N)
and stop_on_signals, which turns SIGTERM / SIGINT into Stopped so that clean-ups run."""
from __future__ import annotations

import contextlib
import functools
import signal
import sys
from typing import Callable, Iterator

from giseg.utils.errors import UserError, storage_error_message
from giseg.utils.log import logger
from giseg.utils.memory import keep_freed_memory


class Stopped(Exception):
    """SIGTERM or SIGINT arrived inside stop_on_signals(); ``note`` says what was kept or cleaned."""

    def __init__(self, signum: int, note: str = ""):
        super().__init__(note)
        self.signum, self.note = signum, note


@contextlib.contextmanager
def stop_on_signals(on_stop: Callable[[int], None] | None = None) -> Iterator[None]:
    """Within the block, the first SIGTERM or SIGINT calls ``on_stop(signum)`` (e.g. to pass it on to child
    processes) and raises Stopped, so that every ``finally`` and atomic_dir's cleanup runs (the default SIGTERM
    would end the process with its temporary folders left behind); later ones are logged and ignored while that
    cleanup runs. The previous handlers come back at the end. (Main thread only, as Python's signals.)"""
    seen: list[int] = []

    def handle(signum, frame) -> None:
        if seen:
            logger.warning("received %s again: still stopping (cleaning up)", signal.Signals(signum).name)
            return
        seen.append(signum)
        logger.warning("received %s: stopping", signal.Signals(signum).name)
        if on_stop is not None:
            on_stop(signum)
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def command(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Decorator of every command's ``main(argv)``: it returns the exit status, and a UserError becomes one
    ``error: ...`` line on stderr and exit status 2 (no traceback); SIGTERM / SIGINT (Ctrl-C) anywhere in the
    command one ``stopped by ...`` line and 128 + the signal's number, after every clean-up ran (Stopped)."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        keep_freed_memory()
        try:
            with stop_on_signals():  # (a command's own stop_on_signals, or the trainer's StopSignal, takes over inside)
                return main(argv) or 0
        except KeyboardInterrupt:  # a second Ctrl-C where a first one is being handled (the trainer's StopSignal)
            print("stopped by SIGINT", file=sys.stderr, flush=True)
            return 128 + signal.SIGINT
        except Stopped as e:
            print(f"stopped by {signal.Signals(e.signum).name}{': ' + e.note if e.note else ''}; temporary files "
                  "were removed", file=sys.stderr, flush=True)
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
