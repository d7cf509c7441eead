"""Atomic files and folders: writes through a temporary file and a rename, folder replaces a crash can undo,
strict JSON, the umask's modes, CSVs read as strings."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from giseg.utils.errors import UserError


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


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 4 MiB blocks (checkpoint manifests, ONNX exports and the weights they came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
