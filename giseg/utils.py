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
import signal
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
    ``error: ...`` line on stderr and exit status 2 (no traceback); a Stopped (a signal) one ``stopped by ...``
    line and 128 + the signal's number."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        keep_freed_memory()
        try:
            return main(argv) or 0
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


def write_beside(path: str | Path, text: str | bytes) -> Path:
    """``text`` in a new temporary file beside ``path`` (``.<name>.<random>.tmp``, the umask's mode, synced to
    disk), for a rename onto ``path``; nothing is left behind when the write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        use_umask(tmp, folder=False)
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write_text(path: str | Path, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to ``path`` through a temporary file in the same folder and a rename."""
    tmp = write_beside(path, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- outputs that never clobber
OUTPUT_MARK = ".giseg-output"  # in every output folder a command creates: {"kind": <command>}


def check_no_overlap(out: Path, inputs: dict[str, str | Path | None], flag: str) -> None:
    """Refuse an output that is, holds or lies inside one of the command's inputs ({flag: path})."""
    out = out.resolve()
    for name, path in inputs.items():
        if not path or not Path(path).exists():
            continue
        src = Path(path).resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            how = "is" if out == src else "holds" if src.is_relative_to(out) else "lies inside"
            raise UserError(f"{flag} {out} {how} {name} {src}: an output never goes where the command reads; "
                            f"choose another {flag}")


def claim_output_dir(path: str | Path, flag: str, kind: str, inputs: dict | None = None,
                     ours: Callable[[Path], bool] | None = None, create: bool = True) -> Path:
    """The output folder ``path`` of command ``kind``, checked before anything is written: refused (one line) when
    it is a file, overlaps one of ``inputs`` ({flag: path}), or already holds something this kind of command did
    not write (not empty, no OUTPUT_MARK of ``kind``, and ``ours(path)`` false: how a folder of an earlier version
    is recognised). ``create``: make it and write the mark (otherwise the caller writes the folder whole, with
    write_output_mark, and renames it into place)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; pass a folder")
    check_no_overlap(out, inputs or {}, flag)
    if not create and Path.cwd().resolve().is_relative_to(out.resolve()):  # (written whole, then renamed into place)
        raise UserError(f"{flag} {out} is the current folder (or holds it), which this command would replace whole; "
                        f"pass a new folder, e.g. {flag} {out / 'out'}")
    # (a temporary file of ours, '.<name>.<random>.tmp', is what a kill during the first write leaves: not content)
    if out.is_dir() and any(not (p.name.startswith(".") and p.name.endswith(".tmp")) for p in out.iterdir()):
        mark = out / OUTPUT_MARK
        try:
            mine = json.loads(mark.read_text()).get("kind") == kind if mark.is_file() else bool(ours and ours(out))
        except (OSError, ValueError, AttributeError):
            mine = False
        if not mine:
            names = sorted(p.name for p in out.iterdir())
            example = next((n for n in names if not n.startswith(".")), names[0])
            raise UserError(f"{flag} {out} already holds files that giseg {kind} did not write (e.g. {example}); "
                            "nothing was changed: choose a new or empty folder")
    if create:
        out.mkdir(parents=True, exist_ok=True)
        write_output_mark(out, kind)
    return out


def write_output_mark(folder: str | Path, kind: str) -> None:
    if not (Path(folder) / OUTPUT_MARK).is_file():
        atomic_write_json(Path(folder) / OUTPUT_MARK, {"kind": kind})


def claim_output_file(path: str | Path, flag: str, inputs: dict | None = None,
                      ours: Callable[[Path], bool] | None = None) -> Path:
    """The output file ``path``, checked before anything is written: refused when it is a folder, is one of
    ``inputs``, or exists and ``ours(path)`` says this command did not write it (a rerun replaces its own)."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder; pass a file name")
    for name, src in (inputs or {}).items():  # (a new file beside the data is harmless; an input file is not)
        if src and Path(src).exists() and out.resolve() == Path(src).resolve():
            raise UserError(f"{flag} {out} is {name}: an output never replaces what the command reads; choose "
                            f"another {flag}")
    if out.exists() and ours is not None and not ours(out):
        raise UserError(f"{flag} {out} exists and was not written by this command; nothing was changed: choose "
                        "another file name, or move that file away")
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: its folder {out.parent} is not writable; choose another place")
    return out


def starts_with(prefix: str) -> Callable[[Path], bool]:
    """ours() for claim_output_file: the file begins with ``prefix`` (the header this command writes)."""
    def check(path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                return f.read(len(prefix.encode())) == prefix.encode()
        except OSError:
            return False
    return check


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


def json_text(obj: object) -> str:
    """``obj`` as the strict, sorted, indented JSON every file of this toolkit holds."""
    return json.dumps(json_safe(obj), indent=2, sort_keys=True) + "\n"


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json_text(obj))


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
    can always undo or finish. Everything in ``new`` gets the mode a plain open()/mkdir() would give it first
    (writers such as safetensors create their files 0600, which other users of a shared server could not read)."""
    for f in new.rglob("*"):
        use_umask(f, folder=f.is_dir())
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


MMAP_THRESHOLD = 32 << 20  # glibc's largest; a freed block under it stays in the heap for the next step
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top instead of handed back (and faulted in again)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep what a step frees for the next one. By default it maps every block above a
    threshold (128 kB, raised only when such a block is freed) afresh and hands it back when freed, so each
    training step's large temporaries (activations, the loss on upsampled logits) fault in their pages again:
    2.7 million page faults and 5 s of system time in a 21 s demo run here, 9 % of its speed (benchmarks/ab_loop.py).
    Fixed thresholds keep those blocks in the heap. Returns whether it applied (glibc only; a no-op elsewhere, and
    when the user set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ themselves)."""
    import ctypes

    if sys.platform != "linux" or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD)) and bool(libc.mallopt(-1, TRIM_THRESHOLD))  # M_MMAP_, M_TRIM_
    except (OSError, AttributeError):  # not glibc
        return False


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
