"""Cross-validation: train every fold of one model, score each at original size, and write the CV table.

    giseg cv --output_dir runs/cv-segformer --folds all -- --base_model <id or folder> --data_dir <folder> ...
    giseg cv --output_dir runs/cv-segformer --parallel 2 --gpus 0,1,2,3 -- ...   # two folds at a time, 2 GPUs each
    giseg cv --output_dir runs/cv-segformer --final_model -- ...                   # then one model on every case

Everything after ``--`` goes to giseg train (its --n_folds and --split_seed define the folds). Fold k trains in
<output_dir>/fold_<k> with --fold k --final_eval, in its own process (``python -m giseg train``, or ``accelerate
launch -m giseg train`` with several GPUs per fold); its log is <output_dir>/fold_<k>/train.log. A finished fold (val_scores.json
present) is kept; an interrupted one resumes from its checkpoint. Then:
  cv_scores.json / cv_table.md  per class Dice, mean Dice, 3D Hausdorff and competition score per fold, their
                                mean and sample standard deviation over the folds, and the out-of-fold row: every
                                fold's validation predictions (val_submission.csv) scored together
  oof_submission.csv            those predictions, one row per slice and class of the whole data set
--final_model then trains <output_dir>/final on every case (giseg train --fold -1: no validation set, best/ is the
last epoch's model), as the 1st-place solution trained its submitted models.

    giseg cv --ensemble runs/cv-segformer runs/cv-upernet [--weights 1,2] --data_dir <folder> --output_dir runs/ens

scores an ensemble of finished CVs out of fold, with no training: fold k's models of every CV (same folds) average
their probabilities on fold k's cases (giseg.inference.ensemble.Ensemble; each with its own size, normalisation and 2.5D setting),
and the predictions of all folds are scored as one submission (ensemble_scores.json, ensemble_submission.csv).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from giseg.data.folds import data_changes
from giseg.training.launch import TRAINER, check_gpus, end_with_parent, trainer_command
from giseg.utils.errors import UserError
from giseg.utils.log import logger

def parse_folds(text: str, n_folds: int) -> list[int]:
    if text == "all":
        return list(range(n_folds))
    try:
        folds = sorted({int(t) for t in text.split(",")})
    except ValueError:
        folds = []
    if not folds or not all(0 <= f < n_folds for f in folds):
        raise UserError(f"--folds must be 'all' or comma-separated folds in [0, {n_folds - 1}], got {text!r}")
    return folds


def gpu_groups(gpus: str, parallel: int, available: int | None = None) -> list[list[str]]:
    """``parallel`` groups of GPU ids from "0,1,2,3" (contiguous, equal sizes); [[]] * parallel without GPUs.
    ``available``: how many CUDA GPUs this machine has (physical_gpus; None: not checked)."""
    ids = [g for g in gpus.split(",") if g] if gpus else []
    if not ids:
        return [[] for _ in range(parallel)]
    check_gpus(ids, f"--gpus {gpus}", available)
    if len(ids) % parallel:
        raise UserError(f"--gpus {gpus}: {len(ids)} GPU(s) cannot be split into --parallel {parallel} equal groups")
    k = len(ids) // parallel
    return [ids[i * k:(i + 1) * k] for i in range(parallel)]


def run_in_slots(folds: list[int], groups: list[list[str]], train_fold) -> None:
    """``train_fold(k, gpus)`` for every fold, ``len(groups)`` at a time: the i-th fold runs in slot i mod
    len(groups), with that slot's GPUs, after the slot's previous fold. The first failure is raised."""
    slots = [[k for i, k in enumerate(folds) if i % len(groups) == s] for s in range(len(groups))]
    if len(groups) == 1:
        for k in folds:
            train_fold(k, groups[0])
        return
    with ThreadPoolExecutor(len(groups)) as pool:
        for done in [pool.submit(lambda ks, g: [train_fold(k, g) for k in ks], ks, g) for ks, g in zip(slots, groups)]:
            done.result()


def fold_command(trainer_args: list[str], fold: int | None, out: Path, gpus: list[str], launcher: str) -> list[str]:
    """The command that trains one fold (``fold`` None: the final model on every case): giseg launch's
    (training/launch.py) with the fold's GPUs, or ``launcher``'s."""
    extra = ["--fold", "-1"] if fold is None else ["--fold", str(fold), "--final_eval"]
    resume = ["--resume_from_checkpoint", "latest"] if (out / "run_config.json").is_file() else []
    args = [*trainer_args, *extra, "--output_dir", str(out), *resume]
    return [*shlex.split(launcher), *TRAINER, *args] if launcher else trainer_command(args, len(gpus))


class FoldRunner:
    """Trains folds in child processes, and passes a stop on to them: the trainers running now, and whether a
    signal asked the CV to stop (then no further fold starts)."""

    def __init__(self) -> None:
        self.live: set[subprocess.Popen] = set()
        self.stopping = threading.Event()

    def stop(self, signum: int) -> None:
        """Pass SIGTERM / SIGINT on to every running trainer (each finishes its step, saves a resumable state and
        ends) and start no other fold. (The trainers run in sessions of their own: a Ctrl-C reaches them only
        through this, once.)"""
        self.stopping.set()
        for proc in list(self.live):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    def run(self, cmd: list[str], out: Path, gpus: list[str], name: str) -> None:
        """Train one fold in a child process (its output in out/stdout.log); a failure is one line that says
        whether a rerun can help."""
        if self.stopping.is_set():
            return
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {})}
        out.mkdir(parents=True, exist_ok=True)
        logger.info("%s: starting%s: %s", name, f" on GPUs {','.join(gpus)}" if gpus else "", shlex.join(cmd))
        t = time.perf_counter()
        with open(out / "stdout.log", "ab") as log:
            # in the user's folder, as giseg train run by hand: relative --data_dir, --base_model and --cache_dir
            # mean the same
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=end_with_parent)  # (ends if the CV dies)
            self.live.add(proc)
            try:
                code = proc.wait()
            except BaseException:  # a signal (stop passed it on): the trainer saves its state; wait for it
                proc.wait()
                raise
            finally:
                self.live.discard(proc)
        if code == 0:
            logger.info("%s: done in %.0f s", name, time.perf_counter() - t)
            return
        self.failed(code, out, name)

    def failed(self, code: int, out: Path, name: str) -> None:
        """The one line of a fold that ended with ``code``: stopped (resumable), refused (fix the arguments) or
        failed (see its log)."""
        if self.stopping.is_set() or code > 128:
            raise UserError(f"{name} was stopped (exit {code}) after saving a resumable state; run the same giseg cv "
                            "command again to resume it")
        error = last_error_line(out / "stdout.log")
        if code == 2 and error:  # the trainer refused its arguments or data: the same command would fail again
            raise UserError(f"{name} refused its settings: {error[len('error: '):]} (a rerun fails the same way: "
                            f"fix the arguments after --; {out / 'stdout.log'})")
        raise UserError(f"{name} failed (exit {code}); see {out / 'train.log'} and {out / 'stdout.log'}; once the "
                        "cause is fixed, run the same giseg cv command again to resume it")


def last_error_line(log: Path) -> str:
    """The trainer's own one-line error ('error: ...') at the end of its output, or ''."""
    with contextlib.suppress(OSError):
        lines = log.read_bytes()[-20000:].decode(errors="replace").splitlines()
        return next((ln for ln in reversed(lines) if ln.startswith("error: ")), "")
    return ""


def cv_identity(cfg) -> dict:
    """What every fold of a CV shares: the run identity (training/run_dir.py) of its trainer arguments, without
    the fold and the number of processes."""
    from giseg.training.run_dir import run_identity  # torch (2 s): `giseg cv --help` imports this module

    return {k: v for k, v in run_identity(cfg, 1).items() if k not in ("fold", "world_size", "output_dir")}


def _differences(saved: dict, now: dict) -> list[str]:
    return [f"--{k} was {saved[k]!r}, now {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]


def check_cv_reuse(cv_dir: Path, identity: dict, data: dict, cfg) -> None:
    """A CV folder is continued only with the settings and the data it started with: its cv_config.json (or the
    trainer arguments an earlier version saved there) and each fold's run_config.json must agree, or the rerun is
    refused with one line naming what differs (its finished folds would otherwise be reported as the new CV)."""
    from giseg.training.config import parse_config  # torch (2 s): `giseg cv --help` imports this module
    from giseg.training.run_dir import resolved

    saved_file = cv_dir / "cv_config.json"
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        before = saved.get("identity") or cv_identity(parse_config(saved.get("trainer_args", [])))
        differ = _differences(before, identity)
        if differ:
            raise UserError(f"--output_dir {cv_dir} holds a CV with other settings: {'; '.join(differ)}. Its folds "
                            "were not trained so: rerun with its settings, or choose another --output_dir")
        change = data_changes(saved["data"], data) if "data" in saved else None
        if change:
            raise UserError(f"--output_dir {cv_dir}: the data changed since this CV started ({change}); its folds "
                            "were trained on the old data: choose another --output_dir")
    for fold_dir in sorted(cv_dir.glob("fold_*")):
        run_file = fold_dir / "run_config.json"
        if not run_file.is_file():
            continue
        run = resolved(json.loads(run_file.read_text()))
        differ = _differences({k: run[k] for k in identity if k in run}, identity)
        number = fold_dir.name.removeprefix("fold_")
        if number.isdigit() and run.get("fold") != int(number):
            differ.append(f"--fold was {run.get('fold')!r}")
        trained_on = run.get("data") if isinstance(run.get("data"), dict) else None
        if trained_on and (trained_on.get("slices"), trained_on.get("case_ids")) != (data["slices"], data["case_ids"]):
            differ.append(f"its data had {trained_on.get('slices')} slices in {trained_on.get('cases')} cases, now "
                          f"{data['slices']} in {data['cases']}")
        if differ:
            raise UserError(f"--output_dir {cv_dir}: {fold_dir.name} was trained otherwise ({'; '.join(differ)}); it "
                            "is not a fold of this CV: rerun with its settings, or choose another --output_dir")
