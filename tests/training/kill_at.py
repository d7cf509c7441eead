"""Run a Python command and SIGKILL it just before a given call in its main thread, found through Python's audit
hooks: what `strace -e inject=<syscall>:signal=SIGKILL:when=N` does, without a ptrace stop at every one of the
~145,000 syscalls of a trainer's start (a faulty run took 25 s under strace, 6 s this way).

    python tests/training/kill_at.py rename '["<base>/run/.best.*.tmp", "<base>/run/best"]' 1 <base> -- trainer.py ...
    python tests/training/kill_at.py unlinkat '["generator"]' 1 <base> -- -m giseg export-hf ...

The call is named by its syscall, its paths' shape (shape(): <base> for the run's folder, temporary names' random
part as *) and which occurrence of that shape: not by a plain count, which another library's extra lock file
shifts (the datasets library removes one more on some runs). Python raises the audit event before it makes the
call, so the process dies in the state strace's injection leaves it in. The events stand for the syscalls strace
lists: os.rename/os.replace without dir_fd make rename(2); os.remove/os.unlink and os.rmdir with a dir_fd
(shutil.rmtree's way) make unlinkat(2). Before dying it writes ``kill_at: <syscall> <shape>`` to stderr.
"""
from __future__ import annotations

import json
import os
import re
import runpy
import signal
import sys
import threading


def counted(syscall: str, event: str, args: tuple) -> tuple | None:
    """The path arguments of the call when the audit event is a ``syscall`` call; None otherwise."""
    if syscall == "rename" and event == "os.rename" and args[2] == -1 and args[3] == -1:
        return args[:2]
    if syscall == "unlinkat" and event in ("os.remove", "os.rmdir") and args[1] != -1:
        return args[:1]
    return None


def shape(paths, base: str) -> list[str]:
    """Paths as comparable across runs: the run's folder as <base>, a temporary name's random part as *."""
    return [re.sub(r"\.[a-z0-9_]{8}\.(work\.)?tmp", r".*.\1tmp", os.fsdecode(p).replace(base, "<base>")) for p in paths]


def install(syscall: str, want: list[str], occurrence: int, base: str) -> None:
    main, seen = threading.get_ident(), [0]

    def hook(event: str, args: tuple) -> None:
        paths = counted(syscall, event, args) if threading.get_ident() == main else None
        if paths is None or shape(paths, base) != want:
            return
        seen[0] += 1
        if seen[0] == occurrence:
            sys.stderr.write(f"kill_at: {syscall} {json.dumps(want)}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def main() -> None:
    syscall, want, occurrence, base, dashes, *command = sys.argv[1:]
    assert dashes == "--" and syscall in ("rename", "unlinkat"), __doc__
    install(syscall, json.loads(want), int(occurrence), base)
    if command[0] == "-m":
        sys.argv, sys.path[0] = [command[1], *command[2:]], os.getcwd()
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path[0] = command, os.path.dirname(os.path.abspath(command[0]))
        runpy.run_path(command[0], run_name="__main__")


if __name__ == "__main__":
    main()
