"""Fresh interpreters for the tests, without paying torch's and transformers' import each time (~2 s apiece).

A helper process imports torch, transformers and MONAI (third-party code only: none of ours, no registration), then
only forks: each job runs in a child of it, with its own argv, folder and environment, as `python -c code` would.
To the job it is a fresh interpreter as far as this project goes (a loader that forgets to register its model type
still fails), at a fraction of the start-up. conftest.py's `fresh_python` fixture holds one for the whole session.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HELPER = r"""
import json, os, sys, traceback
import torch, transformers  # noqa: F401  (third party only: imported once for every job)
try:  # MONAI (the [3d] extra; ~6 s to import): the 3D families' jobs
    import monai.inferers, monai.networks.nets  # noqa: F401
except ImportError:
    pass
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # (not the jobs' pipe)
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        sys.argv = job["argv"]
        sys.path[0] = job["cwd"]
        status = 0
        try:
            exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__"})
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class FreshPython:
    """``run(code, argv, cwd, env)`` -> subprocess.CompletedProcess, as `python -c code *argv` in ``cwd``."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.work = Path(tempfile.mkdtemp(prefix="fresh-python-"))

    def _line(self, timeout: float | None) -> str | None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            return self.proc.stdout.readline().strip() if sel.select(timeout) else None

    def run(self, code: str, argv: list[str] = (), cwd: Path | str | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        out, err = self.work / "stdout", self.work / "stderr"
        job = {"code": code, "argv": ["-c", *map(str, argv)], "cwd": str(cwd or os.getcwd()),
               "env": dict(os.environ if env is None else env), "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = int(self._line(60))
        status = self._line(timeout)
        if status is None:  # as subprocess.run's timeout: the job is killed (its whole session) and it is an error
            os.killpg(pid, signal.SIGKILL)
            self._line(60)
            raise subprocess.TimeoutExpired(code, timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(["python", "-c", code, *argv], int(status), out.read_text(),
                                           err.read_text())

    def run_module(self, module: str, args: list[str], **kw) -> subprocess.CompletedProcess:
        """As `python -m module *args`."""
        code = (f"import runpy, sys; sys.argv = [{module!r}, *sys.argv[1:]]; "
                f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
        return self.run(code, args, **kw)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
