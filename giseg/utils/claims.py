"""Outputs that never clobber: a command claims its output folder or file before it writes (never an input,
never what another command wrote)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

from giseg.utils.errors import UserError
from giseg.utils.files import atomic_write_json
from giseg.utils.locks import FolderLock


OUTPUT_MARK = ".giseg-output"  # in every output folder a command creates: {"kind": <command>}
OUTPUT_LOCK = ".giseg-output.lock"  # held by the command writing the folder (hold_output)


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


@contextlib.contextmanager
def hold_output(folder: str | Path, flag: str) -> Iterator[FolderLock]:
    """Within the block, the writer's lock on its claimed output folder (OUTPUT_LOCK inside it), taken without
    waiting: a second command filling the same folder at the same time is refused with one line, instead of both
    reporting success over each other's files."""
    lock = FolderLock(Path(folder) / OUTPUT_LOCK, wait=False).acquire_or_refuse(
        f"{flag} {folder} is being written by another giseg command (pid {{pid}}); wait for it to end, or choose "
        f"another {flag}")
    try:
        yield lock
    finally:
        lock.release()


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
