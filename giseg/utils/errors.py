"""One-line user errors: UserError, and the storage's errors (full disk, permissions) as one line."""
from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """Bad input from the user: the message says what, where and what to do. CLIs print it on one line."""


# errors of the storage, not of the program: a one-line message is all the user needs
STORAGE_ERRORS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
                  errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a path component is a file, not a folder",
                  errno.EISDIR: "is a folder, not a file"}


def storage_error_message(e: OSError) -> str | None:
    """One line for an OSError caused by the storage (permissions, read-only, full disk, a file where a folder
    should be), or None for any other OSError (a program error that deserves its traceback)."""
    if e.errno not in STORAGE_ERRORS:
        return None
    where = f" {e.filename}" if e.filename else ""
    return f"cannot write{where}: {STORAGE_ERRORS[e.errno]}; free space, fix the permissions or choose another folder"


_STORAGE_PHRASES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied",
                    "file write failed")


def storage_cause(e: BaseException) -> BaseException | None:
    """``e`` or the error that caused it (libraries wrap them: datasets' DatasetGenerationError) when the storage
    is to blame (an OSError of STORAGE_ERRORS, or a saver's own type whose message has the OS's words)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and storage_error_message(e) is not None:
            return e
        if not isinstance(e, OSError) and any(p in str(e) for p in _STORAGE_PHRASES):
            return e
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def storage_guard(target: str | Path, what: str,
                  then: str = "rerun with --resume_from_checkpoint latest") -> Iterator[None]:
    """Turn a failed save caused by the storage into one UserError line naming ``target``. Savers that are not
    Python's own (safetensors, torch.save) raise their own types with the OS message inside, and libraries wrap
    the OS's error in theirs, so the message and the causes are read; any other error passes through."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (re-raised unless it is the storage's)
        cause = storage_cause(e)
        if cause is None:
            raise
        e = cause
        try:
            free = f"{shutil.disk_usage(Path(target).parent if not Path(target).exists() else target).free / 1e6:.0f} MB free"
        except OSError:
            free = "free space unknown"
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot save {what} to {target}: {reason} ({free}); what was saved before is intact: free "
                        f"space or fix permissions, then {then}") from None


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (kB, MB, GB, TB): a size a message can show, never '0.00 GB'."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
