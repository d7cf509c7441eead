"""The run folder: claimed with a lock, a fresh start or a resume checked against the run's identity.

RUN_IDENTITY is what a resume must share with the run it continues (the TrainConfig fields declared with
``identity``); run_config.json records every argument, the run id and each resume."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from giseg.training.batch_size import FILE as AUTO_BATCH_FILE
from giseg.training.checkpoints import RESUMABLE_MARK, find_checkpoint
from giseg.training.config import SAVED_WITHOUT, TrainConfig, defaults_source
from giseg.training.tracking import LOG_FOLDER as TRACKER_FOLDER
from giseg.utils.claims import check_no_overlap
from giseg.utils.errors import UserError
from giseg.utils.files import atomic_write_json, recover_replaced
from giseg.utils.locks import FolderLock
from giseg.utils.log import flag_groups, logger, setup_logging, wrap
from giseg.utils.provenance import code_digest

# What a resume must share with the run it continues: everything that changes what is trained, on which slices,
# in which order, or how it is scored (the fields declared with "identity": True, and the number of processes). The
# rest may differ.
RUN_IDENTITY = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["identity"]) + ("world_size",)
MAY_CHANGE_ON_RESUME = tuple(f.name for f in dataclasses.fields(TrainConfig) if not f.metadata["identity"])
# what a run writes into its output_dir: a fresh start clears these and nothing else
RUN_ARTEFACTS = ("run_config.json", RESUMABLE_MARK, "metrics.jsonl", "train.log", "best", "last", "checkpoints",
                 TRACKER_FOLDER, "val_submission.csv", "val_scores.json", "val_presence.csv", AUTO_BATCH_FILE)
BESIDE_A_RUN = ("stdout.log",)  # what giseg cv writes into a fold's folder before its trainer starts


def check_only_ours(output_dir: Path) -> None:
    """A folder a run may write into holds nothing but runs' files (and hidden ones: its lock, interrupted saves):
    a folder of the user's (data, notes, another tool's outputs) is refused before anything is written to it."""
    foreign = sorted(p.name for p in output_dir.iterdir()
                     if not p.name.startswith(".") and p.name not in RUN_ARTEFACTS + BESIDE_A_RUN)
    if foreign:
        raise UserError(f"--output_dir {output_dir} already holds files that giseg train did not write (e.g. "
                        f"{foreign[0]}); nothing was changed: choose a new or empty folder")


def resolved(values: dict) -> dict:
    """Local paths resolved (the same folder named two ways is one; a saved run has them under "resolved", as
    they were at its start); hub ids stay as they are."""
    now = {k: os.path.realpath(values[k]) for k in ("base_model", "data_dir")
           if isinstance(values.get(k), str) and os.path.exists(values[k])}
    return {**SAVED_WITHOUT, **values, **now, **values.get("resolved", {})}


def run_identity(cfg: TrainConfig, world_size: int) -> dict:
    """The RUN_IDENTITY values of ``cfg``."""
    values = resolved({**dataclasses.asdict(cfg), "world_size": world_size})
    return {k: values[k] for k in RUN_IDENTITY}


def check_resume_matches(saved: dict, now: dict, where: Path) -> None:
    """Refuse a resume whose identity differs from the saved run's, naming every argument (old and new value)."""
    saved = resolved(saved)
    differ = [f"--{k} was {saved[k]!r}, now {now[k]!r}" for k in RUN_IDENTITY if k in saved and saved[k] != now[k]]
    if differ:
        name = {"world_size": "number of processes"}
        differ = [d.replace("--world_size", name["world_size"]) for d in differ]
        raise UserError(f"cannot resume {where}: {'; '.join(differ)}. Resume with the run's values, or start a new run "
                        "(--overwrite_output_dir, or another --output_dir)")


def clear_run(output_dir: Path) -> list[str]:
    """Start over in ``output_dir``: the previous run's artefacts are moved into one hidden folder (a rename each;
    run_config.json first, so a half-cleared folder never looks like a run) and then deleted; a kill midway leaves
    a `.previous-run.tmp` that the next start deletes. Returns the names that were there."""
    present = [n for n in RUN_ARTEFACTS if (output_dir / n).exists()]
    if present:
        trash = output_dir / ".previous-run.tmp"
        trash.mkdir(exist_ok=True)
        for name in present:
            os.replace(output_dir / name, trash / name)
        shutil.rmtree(trash)
    return present


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); move it away, or pass --overwrite_output_dir to start over") from None


def _decide_start(cfg: TrainConfig, output_dir: Path, world_size: int | None, notes: list[str], dry: bool = False):
    """(checkpoint to resume or None, run id, saved run_config or None): a resume checked against the saved run,
    a refusal, or a fresh start in a cleared folder. Main process only, with the output_dir lock held. ``dry``
    (--check_only): the same decision and refusals with nothing changed on disk (world_size None: the saved run's).
    Its callers have refused a folder of the user's (check_only_ours) before they took its lock."""
    if not dry:
        notes += recover_replaced(output_dir) + recover_replaced(output_dir / "checkpoints")
    resume = None
    saved_file = output_dir / "run_config.json"
    saved = _read_json(saved_file) if saved_file.exists() else None
    run_id = (saved or {}).get("run_id", "")
    explicit = cfg.resume_from_checkpoint not in ("", "latest")
    if explicit and saved is None:
        raise UserError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: --output_dir {output_dir} holds "
                        "no run (no run_config.json); resume in the run's own output_dir")
    before = len(notes)
    found = (find_checkpoint(output_dir, cfg.resume_from_checkpoint if explicit else "latest", run_id, notes)
             if saved else None)
    resumable = found is not None
    if saved and not resumable and (output_dir / RESUMABLE_MARK).exists() and not cfg.overwrite_output_dir:
        refused = [n.removeprefix("skipped checkpoint ") for n in notes[before:]]
        what = (f"no usable checkpoint ({'; '.join(refused)})" if refused else
                f"no checkpoint left ({output_dir / 'checkpoints'} is empty or missing)")
        raise UserError(f"--output_dir {output_dir} holds a run with {what}; nothing to resume. Pass "
                        "--overwrite_output_dir to start over, or choose another --output_dir")
    if cfg.resume_from_checkpoint and resumable:
        size = world_size if world_size is not None else resolved(saved).get("world_size", 1)
        check_resume_matches(saved, run_identity(cfg, size), output_dir)
        resume = found
    elif saved and resumable and not cfg.overwrite_output_dir:
        raise UserError(f"--output_dir {output_dir} already holds a run; pass --resume_from_checkpoint latest to "
                        "continue it, --overwrite_output_dir to start over, or choose another --output_dir")
    else:
        if saved and not resumable and not cfg.overwrite_output_dir:
            notes.append("the previous start in this folder saved no resumable state: starting over")
        elif cfg.resume_from_checkpoint == "latest":
            notes.append(f"no checkpoint under {output_dir / 'checkpoints'}: starting from the beginning")
        cleared = [] if dry else clear_run(output_dir)
        if cleared:
            notes.append(f"removed the previous run's {', '.join(cleared)}")
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(4).hex()}"
        saved = None
    return resume, run_id, saved


def lock_output_dir(output_dir: Path) -> FolderLock:
    """The output folder's lock, taken without waiting: a folder a live run holds is refused with one line."""
    return FolderLock(output_dir / ".lock", wait=False).acquire_or_refuse(
        f"--output_dir {output_dir} is in use by a live run (pid {{pid}}); wait for it to end, stop it, or choose "
        "another --output_dir")


def check_output_dir(cfg: TrainConfig) -> str:
    """--check_only: what the run's own start would decide for --output_dir (in use by a live run, a run to resume
    and whether it may, a finished run that needs --overwrite_output_dir ...), with nothing of the run changed (its
    lock is only taken and released); one phrase."""
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file; pass a folder")
    if not output_dir.is_dir():
        return "output_dir new"
    check_only_ours(output_dir)
    if (output_dir / ".lock").exists():
        lock_output_dir(output_dir).release()
    resume, _, _ = _decide_start(cfg, output_dir, None, [], dry=True)
    return f"output_dir resumes {resume.name}" if resume else "output_dir starts fresh"


@dataclass
class OutputDir:
    path: Path
    run_id: str
    resume: Path | None  # the checkpoint to resume; None: a fresh run
    lock: FolderLock | None  # held by the main process until the run ends


def open_output_dir(cfg: TrainConfig, accelerator) -> OutputDir:
    """Claim --output_dir for this process (refused while a live run holds it), finish or undo interrupted saves,
    decide between a fresh start and a resume (checked against the saved run), start the log and write
    run_config.json."""
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file; pass a folder")
    check_no_overlap(output_dir, {"--data_dir": cfg.data_dir, "--base_model": cfg.base_model}, "--output_dir")
    notes: list[str] = []
    resume, run_id, lock, saved = None, "", None, None
    if accelerator.is_main_process:
        if output_dir.is_dir():
            check_only_ours(output_dir)  # (before its lock file is made there)
        output_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise UserError(f"--output_dir {output_dir} is not writable; fix its permissions or choose another folder")
        lock = lock_output_dir(output_dir)
        try:
            resume, run_id, saved = _decide_start(cfg, output_dir, accelerator.num_processes, notes)
        except BaseException:
            lock.release()
            raise
    accelerator.wait_for_everyone()
    setup_logging(accelerator.is_main_process, output_dir / "train.log")
    for line in wrap("start: ", flag_groups([Path(sys.argv[0]).name] + sys.argv[1:])):
        logger.info("%s", line)
    for note in notes:
        logger.info("output_dir: %s", note)
    logger.info("config: every argument in %s", output_dir / "run_config.json")
    source = defaults_source(cfg)
    given = [f"--{k} {getattr(cfg, k)}" for k, where in source.items() if where == "given"]
    preset = [f"--{k} {getattr(cfg, k)}" for k, where in source.items() if where == "preset"]
    items = given or ["none given"]
    if preset:
        items = [*items[:-1], f"{items[-1]};", f"from --preset {cfg.preset}:", *preset]
    items = [*items[:-1], f"{items[-1]};", "everything else is giseg train's default (giseg train --help)"]
    for line in wrap("settings: ", items):  # (several lines where the flags do not fit in one)
        logger.info("%s", line)
    logger.info("world size %d, device %s, mixed precision %s, torch %s", accelerator.num_processes,
                accelerator.device, accelerator.mixed_precision, torch.__version__)
    logger.info("Dice rule: an empty prediction on an empty truth scores %s (--empty_dice)",
                {"1": "1", "0": "0", "skip": "nothing (pair skipped)"}[cfg.empty_dice])
    if accelerator.is_main_process:
        identity = run_identity(cfg, accelerator.num_processes)
        record = {**dataclasses.asdict(cfg), "world_size": accelerator.num_processes, "run_id": run_id,
                  "resolved": {k: identity[k] for k in ("base_model", "data_dir")}, "code_sha256": code_digest()}
        if saved is not None:  # a resume: the identity stays, the rest is what this start runs with
            if "data" in saved:  # what it was trained on (build.check_data_unchanged compares it)
                record["data"] = saved["data"]
            record["resumes"] = [*saved.get("resumes", []), {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                              "from": str(resume)}]
        atomic_write_json(output_dir / "run_config.json", record)
    shared = [run_id, str(resume) if resume else ""]
    if accelerator.num_processes > 1:  # the other ranks learn what the main process decided
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(shared)
    return OutputDir(output_dir, shared[0], Path(shared[1]) if shared[1] else None, lock)
