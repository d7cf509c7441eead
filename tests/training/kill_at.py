"""Run a Python command and SIGKILL it just before the N-th call of a syscall in its main thread, found through
Python's audit hooks: what `strace -e inject=<syscall>:signal=SIGKILL:when=N` does, without a ptrace stop at every
one of the ~145,000 syscalls of a trainer's start (a faulty run took 25 s under strace, 6 s this way).

    python tests/training/kill_at.py rename 3 -- trainer.py --base_model ...
    python tests/training/kill_at.py unlinkat 2 -- -m giseg export-hf ...

Python raises the audit event before it makes the call, so the process dies in the state strace leaves it in. The
events stand for the syscalls strace counts: os.rename/os.replace without dir_fd make rename(2); os.remove/os.unlink
and os.rmdir with a dir_fd (shutil.rmtree's way) make unlinkat(2). Before dying it writes the call to stderr
(``kill_at: rename('a', 'b')``), so fault_injection.py checks that it is the call strace listed at that number.
"""
from __future__ import annotations

import os
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


def install(syscall: str, n: int) -> None:
    main, seen = threading.get_ident(), [0]

    def hook(event: str, args: tuple) -> None:
        paths = counted(syscall, event, args) if threading.get_ident() == main else None
        if paths is None:
            return
        seen[0] += 1
        if seen[0] == n:
            sys.stderr.write(f"kill_at: {syscall}({', '.join(repr(os.fsdecode(p)) for p in paths)})\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def main() -> None:
    syscall, n, dashes, *command = sys.argv[1:]
    assert dashes == "--" and syscall in ("rename", "unlinkat"), __doc__
    install(syscall, int(n))
    if command[0] == "-m":
        sys.argv, sys.path[0] = [command[1], *command[2:]], os.getcwd()
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path[0] = command, os.path.dirname(os.path.abspath(command[0]))
        runpy.run_path(command[0], run_name="__main__")


if __name__ == "__main__":
    main()
