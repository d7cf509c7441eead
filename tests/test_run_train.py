import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, log_events

pytestmark = pytest.mark.slow  # (bash run_tests.sh -m "not slow": the quick part)


def _env(tmp_path, **kw):
    env = {**os.environ, "PYTHON": sys.executable, "EPOCHS": "1", "IMAGE_SIZE": "64",
           "EXTRA_ARGS": f"--num_workers 0 --n_folds 3 --cache_dir {tmp_path / 'cache'}",
           "OUTPUT_DIR": str(tmp_path / "out"), "LOG_FILE": str(tmp_path / "logs" / "run.log")}
    env.update(kw)
    return env


def test_foreground_run_logs_start_command_dice_and_exit_status(demo_dir, tiny_models, tmp_path):
    env = _env(tmp_path, FOREGROUND="yes", DATA_DIR=str(demo_dir), BASE_MODEL=str(tiny_models["beit"]),
               REPORT_TO="tensorboard")  # (yes, true, on and 1 all mean it; FOREGROUND=yes used to be ignored)
    res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    log = (tmp_path / "logs" / "run.log").read_text()
    start = next(e for e in log_events(log) if " run start: " in e)  # (the command, its continuation lines joined)
    assert "-m giseg train --base_model" in start
    assert "dice large_bowel" in log and "run end: exit status 0" in log.splitlines()[-1]
    # a user's model on data: only what was set is passed, trainer.py's defaults (lr 6e-5) do the rest
    assert "run settings: EPOCHS=1 IMAGE_SIZE=64 REPORT_TO=tensorboard; giseg train's defaults for what is not set" in log
    assert list((tmp_path / "out" / "trackers").rglob("events.out.tfevents.*"))
    assert "--lr" not in start
    assert json.loads((tmp_path / "out" / "run_config.json").read_text())["lr"] == 6e-05  # trainer.py's default
    assert "trackers: tensorboard, files under" in log and max(map(len, log.splitlines())) < 600
    assert (tmp_path / "out" / "best" / "config.json").is_file()


def test_a_mistake_fails_in_the_foreground_with_one_line_and_leaves_no_run_or_log(demo_dir, tiny_models, tmp_path):
    """Checked before the run goes to the background: a bad argument, data folder or model is one error line and a
    non-zero status at once, not a line in a log after `started`; no run folder, no log file."""
    for settings, message in (({"LR": "-1"}, "error: --lr must be > 0"),
                              ({"DATA_DIR": str(tmp_path / "nowhere")}, "error: data_dir"),
                              ({"BASE_MODEL": str(tmp_path / "no-model")}, "no such folder, and not a hub id")):
        env = _env(tmp_path, DATA_DIR=str(demo_dir), BASE_MODEL=str(tiny_models["segformer"]))
        env.update(settings)
        res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2 and message in res.stderr, (settings, res.stderr)
        assert "Traceback" not in res.stderr and "started" not in res.stdout
        assert not (tmp_path / "out").exists() and not (tmp_path / "logs" / "run.log").exists()


def test_switches_and_extra_args_are_taken_as_written_or_refused_in_one_line(demo_dir, tiny_models, tmp_path):
    (tmp_path / "data").mkdir()
    for settings, message in (({"FOREGROUND": "maybe"}, "error: FOREGROUND=maybe: expected 1 or 0"),
                              ({"FINAL_MODEL": "2"}, "error: FINAL_MODEL=2: expected 1 or 0"),
                              ({"EXTRA_ARGS": "--output_dir elsewhere"}, "error: EXTRA_ARGS: set OUTPUT_DIR=<value> "
                                                                          "instead of passing --output_dir there"),
                              ({"EXTRA_ARGS": "--data_dir=x"}, "error: EXTRA_ARGS: set DATA_DIR=<value>"),
                              ({"EXTRA_ARGS": "--lr *"}, "argument --lr: invalid float value: '*'"),  # not globbed
                              ({"OUTPUT_DIR": str(tmp_path / "data"), "DATA_DIR": str(tmp_path / "data")},
                               "error: --output_dir " + str(tmp_path / "data") + " is --data_dir")):
        env = _env(tmp_path, DATA_DIR=str(demo_dir), BASE_MODEL=str(tiny_models["segformer"]))
        env.update(settings)
        res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2 and message in res.stderr, (settings, res.stderr)
        assert not (tmp_path / "out").exists() and not (tmp_path / "logs" / "run.log").exists()


def test_an_accelerate_config_file_is_what_the_run_is_launched_with(demo_dir, tiny_models, tmp_path):
    config = tmp_path / "accelerate.yaml"
    env = _env(tmp_path, FOREGROUND="1", DATA_DIR=str(demo_dir), BASE_MODEL=str(tiny_models["segformer"]),
               ACCELERATE_CONFIG=str(config))
    env["EXTRA_ARGS"] += " --max_train_steps 1"
    res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and f"ACCELERATE_CONFIG={config}: no such file" in res.stderr
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\n"
                      "mixed_precision: 'no'\nuse_cpu: true\n")
    res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "logs" / "run.log").read_text()
    assert f"-m accelerate.commands.launch --config_file {config} -m giseg train" in "\n".join(log_events(log))
    assert "run end: exit status 0" in log and res.returncode == 0


def test_background_run_returns_at_once_and_finishes_in_the_log(demo_dir, tiny_models, tmp_path):
    env = _env(tmp_path, DATA_DIR=str(demo_dir), BASE_MODEL=str(tiny_models["segformer"]))
    res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True, timeout=60)
    log = tmp_path / "logs" / "run.log"
    # it returned while the run goes on in the background (whatever the machine's speed: no clock involved)
    assert res.returncode == 0 and "run end:" not in (log.read_text() if log.exists() else "")
    assert f"tail -f {log}" in res.stdout and log.with_suffix(".pid").is_file()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "run end:" not in (log.read_text() if log.exists() else ""):
        time.sleep(1)
    assert "run end: exit status 0" in log.read_text()
    while time.monotonic() < deadline and log.with_suffix(".pid").exists():  # (removed just after the last line)
        time.sleep(0.2)
    assert not log.with_suffix(".pid").exists()  # the pid file goes with the run (it stayed behind: issue #43)


def readme_demo_run() -> tuple[Path, Path, Path] | None:
    """(run, log, project) of the finished default demo run that the README's first command (`bash run_train.sh`)
    left in this checkout, when it ran the code under test (run_config.json's code_sha256, and no run_train.sh
    edited since): the suite is the README's second command, and CI runs the two in that order. None otherwise."""
    import dataclasses

    from giseg.training.config import parse_config
    from giseg.training.run_dir import RUN_IDENTITY
    from giseg.utils.provenance import code_digest

    digest, script = code_digest(), (ROOT / "run_train.sh").stat().st_mtime
    demo = dataclasses.asdict(parse_config(["--preset", "demo", "--base_model", "demo/models/tiny-segformer",
                                            "--data_dir", "demo/data"]))
    for config in sorted((ROOT / "runs").glob("*/run_config.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        run, saved = config.parent, json.loads(config.read_text())
        log = ROOT / "logs" / f"{run.name}.log"
        done = log.is_file() and log.read_text().rstrip().endswith("run end: exit status 0")
        default = all(saved.get(k) == demo[k] for k in RUN_IDENTITY if k in demo and k != "output_dir")
        if saved.get("code_sha256") == digest and default and done and config.stat().st_mtime > script:
            return run, log, ROOT
    return None


def test_default_demo_run_builds_its_data_and_model_without_network_and_gives_the_docs_figures(tmp_path):
    """`bash run_train.sh` with no settings, in a fresh copy of the project: it builds the demo data and model, and
    its figures are the ones docs/training.md states (benchmarks/demo_figures.py writes that block; --check fails
    when a figure moved by more than 0.005: it moved from 0.8795 to 0.9420 unnoticed while the README's was typed by
    hand). One run serves both checks: the demo is the slowest thing the suite trains, so the run that the README's
    first command left here is checked when it ran this very code (CI: .ci/run runs it, then the suite); otherwise
    the test runs it."""
    found = readme_demo_run()
    if found is None:
        proj = tmp_path / "proj"
        shutil.copytree(ROOT, proj, ignore=shutil.ignore_patterns(".venv", ".git", "demo", "runs", "cache", "logs",
                                                                  "__pycache__", ".pytest_cache"))
        env = {**os.environ, "PYTHON": sys.executable, "FOREGROUND": "1", "HF_HUB_OFFLINE": "1"}
        res = subprocess.run(["bash", "run_train.sh"], cwd=proj, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:]
        logs = list((proj / "logs").glob("*.log"))
        assert len(logs) == 1
        (run,) = (proj / "runs").iterdir()
        found = run, logs[0], proj
    run, log, proj = found
    assert (proj / "demo" / "data" / "train.csv").is_file()
    assert (proj / "demo" / "models" / "tiny-segformer" / "config.json").is_file()
    text = log.read_text()
    assert "eval epoch 1" in text and "demo preset (DATA_DIR not set: the demo data)" in text
    assert "--lr 0.002" in text  # the preset, stated in the trainer's settings line
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_figures.py"), "--check", "--from_run",
                          str(run), "--data_dir", str(proj / "demo" / "data")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "all within their stated range" in res.stdout


def test_gpus_that_do_not_exist_are_refused(demo_dir, tiny_models, tmp_path):
    # used to train on the CPU without a word (GPUS=7), or start two unrelated runs writing one folder (GPUS=0,1)
    import torch

    count = torch.cuda.device_count()
    for gpus, message in ((str(count), f"there is no GPU {count}" if count else "this machine has no CUDA GPU"),
                          ("a,1", "expected comma-separated GPU numbers")):
        env = _env(tmp_path, FOREGROUND="1", DATA_DIR=str(demo_dir), BASE_MODEL=str(tiny_models["segformer"]),
                   GPUS=gpus)
        res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_a_live_log_file_is_not_reused(demo_dir, tiny_models, tmp_path):
    import fcntl

    log = tmp_path / "logs" / "run.log"
    log.parent.mkdir()
    with open(log, "a") as held:  # as the run_train.sh of a live run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        env = _env(tmp_path, FOREGROUND="1", DATA_DIR=str(demo_dir), BASE_MODEL=str(tiny_models["segformer"]))
        res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "is being written by a live run" in res.stderr
    assert log.read_text() == ""  # untouched


def test_two_launches_in_the_same_second_get_their_own_folder_and_log(demo_dir, tiny_models, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "run_train.sh", proj)
    env = {**os.environ, "PYTHON": sys.executable, "FOREGROUND": "1", "DATA_DIR": str(demo_dir),
           "BASE_MODEL": str(tiny_models["segformer"]), "EPOCHS": "1", "IMAGE_SIZE": "32",
           "EXTRA_ARGS": f"--max_train_steps 1 --num_workers 0 --n_folds 3 --cache_dir {tmp_path / 'cache'}"}
    (proj / "trainer.py").symlink_to(ROOT / "trainer.py")
    procs = [subprocess.Popen(["bash", "run_train.sh"], cwd=proj, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    heads = [next(line for line in p.communicate(timeout=120)[0].splitlines() if line.startswith("log:"))
             for p in procs]
    assert heads[0] != heads[1], heads  # "log: logs/<model>-<time>-<pid>.log   output: runs/…"
    assert len(list((proj / "logs").glob("*.log"))) == 2


def test_multi_node_settings_are_checked_before_anything_starts(tmp_path):
    for settings, message in (({"NNODES": "2", "NODE_RANK": "2"}, "expected NNODES >= 1 and 0 <= NODE_RANK < NNODES"),
                              ({"NNODES": "x"}, "expected NNODES >= 1"),
                              ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"},
                               "set OUTPUT_DIR (the same shared folder on every node) and MASTER_ADDR")):
        env = {k: v for k, v in _env(tmp_path, **settings).items() if k != "OUTPUT_DIR"}
        res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and message in res.stderr, (settings, res.stderr)


def test_the_printed_pid_stops_the_run_cleanly_and_resume_appends_to_its_log(demo_dir, tiny_models, tmp_path):
    """`kill <pid>` (the pid run_train.sh prints) reaches the trainer: it saves a resumable state and the log ends
    with `run end`; RESUME=<output folder> continues the run with its saved settings, in the same log."""
    import signal

    env = _env(tmp_path, DATA_DIR=str(demo_dir), BASE_MODEL=str(tiny_models["segformer"]), EPOCHS="50")
    env["EXTRA_ARGS"] += " --log_every 1"
    res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout.split("started (pid ")[1].split(")")[0])
    assert f"stop:   kill {pid}" in res.stdout and (tmp_path / "logs" / "run.pid").read_text().strip() == str(pid)
    log = tmp_path / "logs" / "run.log"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and " step 2/" not in log.read_text():
        time.sleep(0.5)
    os.kill(pid, signal.SIGTERM)
    while time.monotonic() < deadline and "run end:" not in log.read_text():
        time.sleep(0.5)
    text = log.read_text()
    assert "stopped by SIGTERM" in text and "run end: exit status 143" in text, text[-2000:]
    assert list((tmp_path / "out" / "checkpoints").glob("step_*"))
    env = {k: v for k, v in _env(tmp_path, FOREGROUND="1", RESUME=str(tmp_path / "out"), EPOCHS="1").items()
           if k not in ("OUTPUT_DIR", "IMAGE_SIZE")}
    env["EXTRA_ARGS"] = ""  # the saved settings (image size, folds, cache) come back from run_config.json
    res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    text = log.read_text()  # one log for the whole run: the first start, the stop, the resume
    assert text.count("run start:") == 2 and "resumed from" in text and text.rstrip().endswith("run end: exit status 0")
    assert "--resume_run" in [e for e in log_events(text) if " run start: " in e][1]
    assert sorted(p.name for p in (tmp_path / "logs").glob("*.log")) == ["run.log"]


def test_the_foreground_check_refuses_what_the_run_itself_would_refuse(tracked_run, demo_dir, tmp_path):
    """The check before `started` is the run's own start-up decision on its folder, dry (training/run_dir.py): an
    output folder holding a finished run, and a resume that changes --fold, passed the check and died in the log
    (issue #38). Nothing is started, and the run folder is left as it was."""
    import json

    run = tmp_path / "run"
    shutil.copytree(tracked_run, run)
    saved = json.loads((run / "run_config.json").read_text())
    before = sorted(p.name for p in run.iterdir())
    common = {"LOG_FILE": str(tmp_path / "logs" / "run.log"), "EXTRA_ARGS": f"--cache_dir {tmp_path / 'cache'}"}
    for settings, message in (({"OUTPUT_DIR": str(run), "BASE_MODEL": saved["base_model"],
                                "DATA_DIR": saved["data_dir"]}, f"--output_dir {run} already holds a run"),
                              ({"RESUME": str(run), "EXTRA_ARGS": "--fold 1"}, "--fold was 0, now 1")):
        env = {**_env(tmp_path, **common), **settings}
        env.pop("OUTPUT_DIR") if "RESUME" in settings else None
        for var in ("EPOCHS", "IMAGE_SIZE"):
            env.pop(var)
        res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2 and message in res.stderr, (settings, res.stderr[-2000:])
        assert "started" not in res.stdout and not (tmp_path / "logs" / "run.log").exists()
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_3d_family_trains_on_an_nnunet_dataset_through_run_train_sh(tmp_path):
    """BASE_MODEL=segresnet3d (a registered 3D family by name: random weights, the [3d] extra) on an nnU-Net
    dataset (giseg demo-data --dataset nnunet), through the launcher as users start runs."""
    from giseg.data.registry import DATASETS

    data = DATASETS["nnunet"].make_demo(tmp_path / "nnunet")
    env = _env(tmp_path, FOREGROUND="1", DATA_DIR=str(data), DATASET="nnunet", BASE_MODEL="segresnet3d",
               IMAGE_SIZE="32", EXTRA_ARGS=f"--num_workers 0 --n_folds 3 --cache_dir {tmp_path / 'cache'} "
                                           "--patch_size 8,32,32 --max_train_steps 2")
    res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    log = "\n".join(log_events((tmp_path / "logs" / "run.log").read_text()))
    assert "model: segresnet3d (gi_volume)" in log and "3D: patches of 8x32x32" in log and "(nnunet)" in log
    assert "eval epoch 1 | loss" in log and "run end: exit status 0" in log
    spec = json.loads((tmp_path / "out" / "best" / "inference_spec.json").read_text())
    assert spec["patch_size"] == "8,32,32" and spec["dataset"] == "nnunet"
