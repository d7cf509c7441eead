"""giseg launch: start a training run in the background with a log, as `bash run_train.sh` does (it calls this).

    giseg launch                                  the demo: embedded data and a small model, CPU is fine, no network
    giseg launch --base_model <hub id or folder> --data_dir <kaggle folder> --gpus 0,1 -- --mixed_precision bf16
    giseg launch --resume runs/<name>             continue a stopped run with its saved settings, same log

Each option's default is its environment variable (named in its help), so run_train.sh's variables set it. Arguments
after `--` (and EXTRA_ARGS) go to giseg train. The run is checked in the foreground first (giseg train --check_only:
a mistake is one line and exit 2, no run folder or log left behind); then it starts in the background and this
prints its pid, log and how to follow, stop and resume it. `kill <pid>` makes the trainer finish its step and save
a resumable state; the pid file (logs/<name>.pid) goes when the run ends.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from giseg.training.launch import check_gpus, physical_gpus, start_background, supervise, trainer_command
from giseg.utils.claims import claim_output_file
from giseg.utils.errors import UserError
from giseg.utils.exits import command

DEMO_DATA, DEMO_MODEL = Path("demo/data"), Path("demo/models/tiny-segformer")
# (option, its environment variable, help): where the run is, how it is started
PLACES = (("base_model", "BASE_MODEL", "hub id or local folder [demo: demo/models/tiny-segformer, built on first use]"),
          ("data_dir", "DATA_DIR", "Kaggle-layout folder (or --dataset's) [demo: demo/data, generated on first use]"),
          ("output_dir", "OUTPUT_DIR", "the run's folder [runs/<model>-<time>-<pid>]"),
          ("log_file", "LOG_FILE", "the log [logs/<name>.log]; refused while a live run writes it"),
          ("resume", "RESUME", "a run's folder (runs/<name>): continue it from its latest checkpoint with its saved "
                               "settings (giseg train --resume_run), appending to its log"),
          ("gpus", "GPUS", "GPU numbers, e.g. 0 or 0,1 (several: accelerate launch --multi_gpu); refused unless they "
                           "exist [unset: the default device]"),
          ("accelerate_config", "ACCELERATE_CONFIG", "a yaml of `accelerate config`: started as accelerate launch "
                                                     "--config_file <it> (GPUS still picks the devices)"),
          ("nnodes", "NNODES", "machines [1]: run this on each with its NODE_RANK and the same OUTPUT_DIR on a shared "
                               "filesystem; one process per GPU of GPUS (or per visible GPU, or 1) on every node"),
          ("node_rank", "NODE_RANK", "this machine's rank [0]: 0 on the one at MASTER_ADDR"),
          ("master_addr", "MASTER_ADDR", "node 0's address (with NNODES > 1)"),
          ("master_port", "MASTER_PORT", "node 0's port [29500]"),
          ("folds", "FOLDS", "cross-validation (giseg cv): 'all' or e.g. '0,2', each fold in OUTPUT_DIR/fold_<k>"),
          ("parallel", "PARALLEL", "with FOLDS: folds at a time, GPUS shared out among them [1]"))
SWITCHES = (("foreground", "FOREGROUND", "wait for the run and exit with its status (1/0, yes/no, true/false, "
                                         "on/off) [0: start it in the background and return]"),
            ("final_model", "FINAL_MODEL", "with FOLDS: then train OUTPUT_DIR/final on every case (--fold -1) [0]"))
# (variable, giseg train's flag): passed on when set; unset, giseg train's defaults (or the demo preset) apply
SETTINGS = (("EPOCHS", "--epochs"), ("BATCH_SIZE", "--train_batch_size"), ("LR", "--lr"), ("IMAGE_SIZE", "--image_size"),
            ("WARMUP", "--warmup_steps"), ("MIXED_PRECISION", "--mixed_precision"), ("DATASET", "--dataset"),
            ("REPORT_TO", "--report_to"), ("HUB_MODEL_ID", "--hub_model_id"))
NAMED = {"--output_dir": "OUTPUT_DIR", "--base_model": "BASE_MODEL", "--data_dir": "DATA_DIR"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="giseg train's settings, passed on when their variable is set: "
                                        + ", ".join(f"{v} ({f})" for v, f in SETTINGS) + " (HUB_MODEL_ID also "
                                        "--push_to_hub); EXTRA_ARGS: more of its arguments, split at spaces")
    for name, var, about in (*PLACES, *SWITCHES):
        ap.add_argument(f"--{name}", default=None, help=f"{about} (env {var})")
    ap.add_argument("trainer_args", nargs="*", help="after --: giseg train's arguments")
    return ap


def resolve(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """Each option's (value, how to name it in a message): from the command line, else its variable."""
    out = {}
    for name, var, _ in (*PLACES, *SWITCHES):
        given = getattr(args, name)
        value = given if given is not None else os.environ.get(var, "")
        out[name] = (value, f"--{name} {value}" if given is not None else f"{var}={value}")
    return out


def switch(value: str, where: str) -> bool:
    if value.lower() in ("1", "yes", "true", "on"):
        return True
    if value.lower() in ("0", "no", "false", "off", ""):
        return False
    raise UserError(f"{where}: expected 1 or 0 (yes/no, true/false, on/off)")


def whole(value: str, default: int) -> int | None:
    return default if value == "" else int(value) if value.isdigit() else None


def trainer_settings(extra: list[str]) -> tuple[list[str], list[str]]:
    """giseg train's flags from the SETTINGS variables and EXTRA_ARGS + ``extra``, and the variables set."""
    flags, named = [], []
    for var, flag in SETTINGS:
        if os.environ.get(var):
            flags += [flag, os.environ[var]]
            named.append(f"{var}={os.environ[var]}")
    if os.environ.get("HUB_MODEL_ID"):
        flags.append("--push_to_hub")
    for source, words in (("EXTRA_ARGS", os.environ.get("EXTRA_ARGS", "").split()), ("after --", extra)):
        for word in words:
            flag = word.split("=")[0]
            if flag in NAMED:
                raise UserError(f"{source}: set {NAMED[flag]}=<value> instead of passing {flag} there (or giseg "
                                f"launch {flag}: this names the run, its log and its messages after it)")
        flags += words
    return flags, named


def check_resume(resume: str, o: dict) -> None:
    if not Path(resume, "run_config.json").is_file():
        raise UserError(f"{o['resume'][1]}: no run_config.json there; pass the output folder of a run (runs/<name>)")
    output_dir = o["output_dir"][0].rstrip("/")
    if o["base_model"][0] or o["data_dir"][0] or (output_dir and output_dir != resume):
        raise UserError(f"{o['resume'][1]} continues that run with its own model, data and folder; unset BASE_MODEL, "
                        "DATA_DIR and OUTPUT_DIR")


def check_places(o: dict, nnodes: int, rank: int | None) -> list[str]:
    """Everything about where and how the run starts that needs no data or model; the GPU ids."""
    if nnodes is None or rank is None or nnodes < 1 or rank >= nnodes:
        raise UserError(f"{o['nnodes'][1]} {o['node_rank'][1]}: expected NNODES >= 1 and 0 <= NODE_RANK < NNODES")
    if nnodes > 1 and not (o["output_dir"][0] and o["master_addr"][0]):
        raise UserError(f"{o['nnodes'][1]}: set OUTPUT_DIR (the same shared folder on every node) and MASTER_ADDR (the "
                        "address of node 0)")
    if o["resume"][0]:
        check_resume(o["resume"][0].rstrip("/"), o)
    gpus = [g for g in o["gpus"][0].split(",")] if o["gpus"][0] else []
    if gpus:
        check_gpus(gpus, o["gpus"][1], physical_gpus())
    config = o["accelerate_config"][0]
    if config and not Path(config).is_file():
        raise UserError(f"{o['accelerate_config'][1]}: no such file (write one with: accelerate config --config_file "
                        f"{config})")
    if o["folds"][0] and o["resume"][0]:
        raise UserError(f"{o['folds'][1]} and RESUME: to resume a CV, run the same FOLDS command again (finished folds "
                        "are kept)")
    if o["folds"][0] and (nnodes > 1 or config):
        raise UserError(f"{o['folds'][1]} runs on one machine without ACCELERATE_CONFIG (giseg cv starts each fold "
                        "itself)")
    return gpus


def demo_inputs(o: dict) -> tuple[str, str]:
    """--base_model and --data_dir, the demo's built on first use where unset."""
    data_dir, base_model = o["data_dir"][0], o["base_model"][0]
    quiet = {"stdout": subprocess.DEVNULL, "check": True}
    if not data_dir:
        data_dir = str(DEMO_DATA)
        if not (DEMO_DATA / "train.csv").is_file():
            print(f"creating demo data in {DEMO_DATA}", flush=True)
            subprocess.run([sys.executable, "-m", "giseg", "demo-data", "--out", data_dir], **quiet)
    if not base_model:
        base_model = str(DEMO_MODEL)
        if not (DEMO_MODEL / "config.json").is_file():
            print(f"creating demo model in {DEMO_MODEL}", flush=True)
            subprocess.run([sys.executable, "-m", "giseg", "make-tiny", "--family", "segformer", "--width", "2",
                            "--out", base_model], **quiet)
    return base_model, data_dir


def plan(o: dict, nnodes: int, rank: int, gpus: list[str], extra: list[str],
         final_model: bool) -> tuple[list, list, str, Path, str]:
    """(the command, giseg train's arguments for its check, the settings line, the log, the output folder)."""
    flags, named = trainer_settings(extra)
    resume, demo = o["resume"][0].rstrip("/"), not (o["resume"][0] or o["data_dir"][0])  # the demo data
    if resume:
        output_dir, name, args = resume, Path(resume).name, ["--resume_run", resume, *flags]
        how = f"resuming {resume} with its saved settings (giseg train --resume_run) for what is not set"
    else:
        base_model, data_dir = demo_inputs(o)
        name = f"{Path(base_model.rstrip('/')).name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        output_dir = o["output_dir"][0] or f"runs/{name}"
        args = ["--base_model", base_model, "--data_dir", data_dir, "--output_dir", output_dir,
                *(["--preset", "demo"] if demo else []), *flags]
        how = ("demo preset (DATA_DIR not set: the demo data): giseg train --preset demo for what is not set"
               if demo else "giseg train's defaults for what is not set")
    if nnodes > 1:
        name = f"{Path(o['output_dir'][0].rstrip('/')).name}-node{rank}"
    log = Path(o["log_file"][0] or f"logs/{name}.log")
    check = list(args)
    if o["folds"][0]:
        cv_args = [a for i, a in enumerate(args) if "--output_dir" not in args[max(0, i - 1):i + 1]]
        cmd = [sys.executable, "-m", "giseg", "cv", "--output_dir", output_dir, "--folds", o["folds"][0],
               "--parallel", o["parallel"][0] or "1", "--gpus", ",".join(gpus),
               *(["--final_model"] if final_model else []), "--", *cv_args]
        check += ["--output_dir", str(Path(output_dir, "fold_0"))]  # (giseg cv passes each fold's folder)
        named.append(f"FOLDS={o['folds'][0]}")
    else:
        per_node = len(gpus) or (physical_gpus() if nnodes > 1 else 0) or 1
        nodes = (nnodes, rank, o["master_addr"][0], int(o["master_port"][0] or 29500)) if nnodes > 1 else None
        cmd = trainer_command(args, per_node, o["accelerate_config"][0], nodes)
    return cmd, check, f"{' '.join(named) or 'none set'}; {how}", log, output_dir


def is_run_log(path: Path) -> bool:
    """ours() for the log: empty, or a log that giseg launch began (its first line: `<time> run settings: ...`)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return False
    return not first or re.match(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d run settings: ", first) is not None


def lock_log(log: Path) -> int:
    """The log opened for appending and locked (the run holds the lock while it lives): a second launch onto the
    log of a live run is refused instead of interleaving two runs in one file."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"LOG_FILE {log} is being written by a live run; wait for it, or pick another LOG_FILE") \
            from None
    return fd


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    o = resolve(args)
    foreground, final_model = switch(*o["foreground"]), switch(*o["final_model"])
    nnodes, rank = whole(o["nnodes"][0], 1), whole(o["node_rank"][0], 0)
    gpus = check_places(o, nnodes, rank)
    cmd, check, settings, log, output_dir = plan(o, nnodes, rank, gpus, args.trainer_args, final_model)
    claim_output_file(log, "--log_file (LOG_FILE)", ours=is_run_log)  # a resume appends to its own log, no other file
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           **({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {})}
    # everything that can be checked in a few seconds, in the foreground: a mistake is one line here, not in a log
    checked = subprocess.run([sys.executable, "-m", "giseg", "train", *check, "--check_only"], env=env)
    if checked.returncode:
        return checked.returncode
    fd = lock_log(log)
    if foreground:
        print(f"log: {log}   output: {output_dir}", flush=True)
        return supervise(cmd, settings, env, tee=log)
    pid = start_background(cmd, settings, env, log, log.with_suffix(".pid"), fd)
    print(f"started (pid {pid}): output in {output_dir}\nlog:    {log}{' (appended to)' if o['resume'][0] else ''}\n"
          f"follow: tail -f {log}\nstop:   kill {pid}   (saves a resumable state; then: RESUME={output_dir} bash "
          "run_train.sh)")
    return 0
