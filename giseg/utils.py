"""Small shared helpers: clear user errors and the CLI wrapper that prints them, atomic writes, logging."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger("gi_seg")


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


def command(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Decorator of every command's ``main(argv)``: it returns the exit status, and a UserError becomes one
    ``error: ...`` line on stderr and exit status 2 (no traceback)."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
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


_STORAGE_PHRASES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied",
                    "file write failed")


@contextlib.contextmanager
def storage_guard(target: str | Path, what: str) -> Iterator[None]:
    """Turn a failed save caused by the storage into one UserError line naming ``target``. Savers that are not
    Python's own (safetensors, torch.save) raise their own types with the OS message inside, so the message is
    read; any other error passes through."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (re-raised unless it is the storage's)
        if isinstance(e, OSError) and storage_error_message(e) is None:
            raise
        if not isinstance(e, OSError) and not any(p in str(e) for p in _STORAGE_PHRASES):
            raise
        try:
            free = f"{shutil.disk_usage(Path(target).parent if not Path(target).exists() else target).free / 1e6:.0f} MB free"
        except OSError:
            free = "free space unknown"
        raise UserError(f"cannot save {what} to {target}: {str(e).strip().splitlines()[-1][:200]} ({free}); what was "
                        "saved before is intact: free space or fix permissions, then rerun with "
                        "--resume_from_checkpoint latest") from None


def current_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status); elsewhere os.umask is the only
    way to read it, which sets it for a moment."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def use_umask(path: str | Path, folder: bool) -> None:
    """Give ``path`` the mode a plain open()/mkdir() would have (tempfile creates 0600 files and 0700 folders,
    which other users of a shared server could not read)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        use_umask(tmp, folder=False)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_csv_strings(path: str | Path, name: str, needs: str):
    """A CSV as a DataFrame of strings (empty cells stay ''); an empty or unparsable file is one UserError line
    naming ``name`` (the file as the user knows it) and what it ``needs``."""
    import pandas as pd  # (0.5 s; only the commands that read a CSV pay it)

    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{name} is empty (0 bytes); it needs {needs}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{name}: not a readable CSV ({e})") from None


def json_safe(obj: object) -> object:
    """NaN and infinities become null, so the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``. A crash at any point leaves
    either the old or the new copy whole: the old one is renamed to ``.<name>.old`` before the new one takes its
    place, and recover_replaced() (run at every start) puts it back if the new one never arrived."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    use_umask(tmp, folder=True)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, path: Path) -> None:
    """Move the complete folder ``new`` to ``path``, replacing what is there, in renames that recover_replaced
    can always undo or finish."""
    old = path.with_name(f".{path.name}.old")
    if old.exists() and path.exists():  # left by an earlier replace that died after its second rename
        shutil.rmtree(old)
    if path.exists():  # (if only old exists, it stays the whole copy until new is in place)
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_replaced(folder: str | Path, name: str = "*") -> list[str]:
    """Finish or undo the replaces that a killed process left in ``folder``: a ``.<name>.old`` whose ``<name>``
    is missing is renamed back (the new copy never arrived); one whose ``<name>`` exists is removed; temporary
    ``.<name>.*.tmp`` files and folders (never complete) are removed. ``name`` limits this to one entry (a glob),
    for folders where other processes may be writing other entries. Returns what was done, one phrase each."""
    folder, done = Path(folder), []
    if not folder.is_dir():
        return done
    for old in folder.glob(f".{name}.old"):
        target = folder / old.name[1:-len(".old")]
        if target.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            done.append(f"removed {old.name} (its replacement {target.name} is complete)")
        else:
            os.replace(old, target)
            done.append(f"restored {target.name} from {old.name} (a save was interrupted)")
    for tmp in folder.glob(f".{name}.*tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        done.append(f"removed the unfinished {tmp.name}")
    return done


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


def release_memory() -> None:
    """Hand freed heap back to the operating system: pyarrow's pool (pandas' string columns) and glibc's malloc
    keep what a large read freed (about 250 MB after indexing the competition's train.csv), and data-loader
    workers forked later would each map it."""
    import ctypes
    import gc

    gc.collect()
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def setup_logging(is_main_process: bool = True, log_file: str | Path | None = None) -> logging.Logger:
    """One timestamped line per event on stdout (and ``log_file``); non-main ranks log warnings only."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main_process else logging.WARNING)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if log_file is not None and is_main_process:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def quiet_third_party() -> None:
    """Silence library progress bars and load tables; we log what matters ourselves."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------- options declared once, as dataclass fields
def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_options(parser: argparse.ArgumentParser, options: type, groups: dict | None = None) -> None:
    """One command-line option per field of the dataclass ``options``: its help, choices and aliases come from the
    field's metadata (callables there are evaluated now), its type and default from the field. A bool takes
    ``--flag``, ``--flag true`` or ``--flag false``. ``metadata["group"]`` names the --help section (``groups``
    caches the argparse groups across calls)."""
    groups = {} if groups is None else groups
    for f in dataclasses.fields(options):
        meta = {k: v() if callable(v) else v for k, v in f.metadata.items()}
        help_, aliases, title = meta.pop("help", ""), meta.pop("aliases", ()), meta.pop("group", None)
        kwargs = {k: meta[k] for k in ("choices", "metavar") if k in meta}
        where = parser
        if title:
            where = groups.setdefault(title, parser.add_argument_group(title))
        if f.type in ("bool", bool):
            where.add_argument(f"--{f.name}", *aliases, dest=f.name, type=parse_bool, nargs="?", const=True,
                               default=f.default, metavar="true|false",
                               help=f"{help_} (default: {str(f.default).lower()})")
            continue
        typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        where.add_argument(f"--{f.name}", *aliases, dest=f.name, type=typ, default=f.default,
                           help=f"{help_} (default: {f.default!r})", **kwargs)


def options_of(options: type, args) -> dict:
    """The values of ``options``' fields in ``args`` (an argparse namespace, or a dataclass with those fields)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(options)}
