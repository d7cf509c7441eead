"""Starting training processes: the GPU check and the trainer's command line that giseg launch (run_train.sh) and
giseg cv share, and the supervisor that runs one command beside its log.

The supervisor writes `run settings:`, `run start: <command>`, the command's output and `run end: exit status N`,
passes SIGTERM / SIGINT on to the trainer once (it finishes its step, saves a resumable state and ends), ends the
trainer if the supervisor itself is killed (PR_SET_PDEATHSIG), and removes the run's pid file when the run ends. In
the background it runs as ``python -m giseg.training.launch <json>`` with its output appended to the log.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from giseg.utils.errors import UserError
from giseg.utils.log import flag_groups, wrap

TRAINER = ("-m", "giseg", "train")  # the installed package's trainer: no checkout needed
ACCELERATE = ("-m", "accelerate.commands.launch")


def physical_gpus() -> int:
    """How many CUDA GPUs the machine has, whatever CUDA_VISIBLE_DEVICES says: GPU ids name the machine's own
    numbers (each trainer gets its group as CUDA_VISIBLE_DEVICES)."""
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        return sum(line.startswith("GPU") for line in listed.splitlines())
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    counted = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, env=env).stdout.strip()
    return int(counted) if counted.isdigit() else 0


def check_gpus(ids: list[str], where: str, available: int | None) -> None:
    """GPU ids that exist on this machine (``available``: physical_gpus; None: not counted), or one line naming
    ``where`` ('--gpus 0,1' or 'GPUS=0,1'): CUDA_VISIBLE_DEVICES with a missing id silently means the CPU."""
    if not all(g.isdigit() for g in ids):
        raise UserError(f"{where}: expected comma-separated GPU numbers, e.g. 0 or 0,1")
    if available == 0:
        raise UserError(f"{where}: this machine has no CUDA GPU; leave it empty (and unset CUDA_VISIBLE_DEVICES) to "
                        "train on the CPU")
    if available is not None and max(map(int, ids)) >= available:
        raise UserError(f"{where}: there is no GPU {max(map(int, ids))}; this machine has {available} "
                        f"(0-{available - 1})")


def trainer_command(trainer_args: list[str], processes: int = 1, accelerate_config: str = "",
                    nodes: tuple[int, int, str, int] | None = None, python: str = sys.executable) -> list[str]:
    """The command line of one training run: ``python -m giseg train`` for one process, else through
    ``accelerate launch``: with an `accelerate config` yaml, on ``nodes`` (count, this node's rank, node 0's
    address, port) with ``processes`` per node, or with ``processes`` on this machine."""
    mixed = trainer_args[trainer_args.index("--mixed_precision") + 1] if "--mixed_precision" in trainer_args[:-1] \
        else "no"
    if accelerate_config:
        prefix = [python, *ACCELERATE, "--config_file", accelerate_config]
    elif nodes is not None:
        count, rank, address, port = nodes
        prefix = [python, *ACCELERATE, "--multi_gpu", "--num_machines", str(count), "--machine_rank", str(rank),
                  "--num_processes", str(processes * count), "--main_process_ip", address, "--main_process_port",
                  str(port), "--mixed_precision", mixed, "--dynamo_backend", "no"]
    elif processes > 1:
        prefix = [python, *ACCELERATE, "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                  "--mixed_precision", mixed, "--dynamo_backend", "no"]
    else:
        prefix = [python]
    return [*prefix, *TRAINER, *trainer_args]


def end_with_parent() -> None:
    """(In a child, before exec.) Linux: SIGTERM when the parent dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stamp(line: str) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n"


def supervise(cmd: list[str], settings: str, env: dict, tee: Path | None = None, pid_file: Path | None = None) -> int:
    """Run ``cmd`` between its `run settings` / `run start` / `run end` lines; its exit status (128 + N when
    signal N ended it). ``tee``: the output also goes to that log (the foreground); else stdout is the log."""
    log = open(tee, "a") if tee is not None else None

    def say(text: str) -> None:
        for stream in (sys.stdout, log):
            if stream is not None:
                stream.write(text)
                stream.flush()

    visible = env.get("CUDA_VISIBLE_DEVICES")
    for line in wrap("run settings: ", settings.split("; "), "; "):
        say(stamp(line))
    for line in wrap("run start: ", flag_groups([*([f"CUDA_VISIBLE_DEVICES={visible}"] if visible else []), *cmd])):
        say(stamp(line))
    sys.stdout.flush()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=end_with_parent, stdout=subprocess.PIPE if log else None,
                            stderr=subprocess.STDOUT if log else None, text=True)
    previous = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for line in proc.stdout if log else ():
            say(line)
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = 128 - code if code < 0 else code
    say(stamp(f"run end: exit status {code}"))
    if pid_file is not None and pid_file.is_file() and pid_file.read_text().strip() == str(os.getpid()):
        pid_file.unlink()
    if log is not None:
        log.close()
    return code


def start_background(cmd: list[str], settings: str, env: dict, log: Path, pid_file: Path, lock_fd: int) -> int:
    """Start the supervisor of ``cmd`` in a session of its own (no hang-up from the terminal), its output appended
    to ``log``, holding ``lock_fd`` (the log's lock) for as long as the run lives; returns its pid once its pid file
    is written."""
    spec = json.dumps({"cmd": cmd, "settings": settings, "pid_file": str(pid_file)})
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "giseg.training.launch", spec], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, pass_fds=(lock_fd,))
    deadline = time.time() + 30
    while not pid_file.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return proc.pid


def _supervise_from_json(spec: str) -> int:
    """The background supervisor's entry: its pid file first (removed by supervise when the run ends)."""
    args = json.loads(spec)
    pid_file = Path(args["pid_file"])
    pid_file.write_text(f"{os.getpid()}\n")
    return supervise(args["cmd"], args["settings"], dict(os.environ), pid_file=pid_file)


if __name__ == "__main__":
    sys.exit(_supervise_from_json(sys.argv[1]))
