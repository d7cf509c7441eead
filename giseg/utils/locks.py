"""An exclusive advisory lock on a file (flock), naming the process that holds it."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from giseg.utils.errors import UserError


class FolderLock:
    """An exclusive advisory lock (flock) on ``<folder>/<name>``, held while the object lives in a ``with`` or
    until release(). ``wait=False`` raises BlockingIOError when another process holds it."""

    def __init__(self, path: str | Path, wait: bool = True):
        self.path, self.wait, self.fd = Path(path), wait, None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return self

    def acquire_or_refuse(self, refusal: str) -> "FolderLock":
        """acquire() without waiting; when another process holds the lock, UserError(``refusal``) with ``{pid}``
        replaced by the holder's pid."""
        try:
            return self.acquire()
        except BlockingIOError:
            raise UserError(refusal.format(pid=self.holder())) from None

    def holder(self) -> str:
        """The pid written by the process that holds (or last held) the lock."""
        with contextlib.suppress(OSError):
            return self.path.read_text().strip() or "?"
        return "?"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
