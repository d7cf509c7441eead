"""Interrupted runs resume, signals save state, NaN stops the run, and two processes train like one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT


def _args(demo_dir, model, out, tmp_path, *extra):
    return [sys.executable, str(ROOT / "trainer.py"), "--base_model", str(model), "--data_dir", str(demo_dir),
            "--output_dir", str(out), "--image_size", "96", "--train_batch_size", "4", "--lr", "2e-3",
            "--num_workers", "0", "--n_folds", "3", "--cache_dir", str(tmp_path / "cache"), "--log_every", "1", *extra]


def _wait_for(predicate, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_mid_epoch_then_resume_completes_the_run(demo_dir, tiny_models, tmp_path):
    out = tmp_path / "run"
    args = _args(demo_dir, tiny_models["segformer"], out, tmp_path, "--epochs", "3", "--save_every_steps", "3")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = _wait_for(lambda: list((out / "checkpoints").glob("step_00000003")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saved, "the run ended before its first step-level save"
    before = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    res = subprocess.run([*args, "--resume_from_checkpoint", "latest"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    resumed_step = int(before[-1].split("_")[1])
    assert f"resumed from {out / 'checkpoints' / before[-1]}: step {resumed_step}" in res.stdout
    recs = _records(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3]  # every epoch evaluated exactly once across both runs
    steps = [r["step"] for r in recs]
    assert steps == sorted(steps) and steps[-1] == 3 * steps[0]  # the full number of optimizer steps


def test_sigterm_finishes_the_step_saves_state_and_exits_non_zero(demo_dir, tiny_models, tmp_path):
    out = tmp_path / "run"
    args = _args(demo_dir, tiny_models["segformer"], out, tmp_path, "--epochs", "50")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert _wait_for(lambda: "step 2/" in (out / "train.log").read_text() if (out / "train.log").exists() else False,
                     proc)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, text[-2000:]
    assert "received SIGTERM" in text and "stopped by SIGTERM after step" in text
    state_dirs = list((out / "checkpoints").glob("step_*"))
    assert state_dirs and json.loads((state_dirs[-1] / "trainer_state.json").read_text())["global_step"] >= 2


def test_nan_loss_stops_with_a_message_naming_the_step(demo_dir, tiny_models, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(_args(demo_dir, tiny_models["segformer"], out, tmp_path, "--epochs", "2", "--lr", "1e30",
                               "--max_grad_norm", "0"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stdout[-2000:]
    assert "loss became NaN/inf between step" in res.stdout and "Traceback" not in res.stdout + res.stderr


def test_two_processes_on_cpu_shard_training_and_count_validation_once(demo_dir, tiny_models, tmp_path):
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = _args(demo_dir, tiny_models["upernet"], out, tmp_path, "--epochs", "2", "--eval_batch_size", "5")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*launch, *args[1:]], capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Grad strides do not match bucket view strides" not in res.stdout + res.stderr
    from data import build_index, split_by_case

    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    recs = _records(out)
    assert [r["epoch"] for r in recs] == [1, 2]  # one writer: each evaluation recorded once
    train_rows, val_rows = split_by_case(build_index(demo_dir), 0, 3)
    assert all(r["val_slices"] == len(val_rows) for r in recs)  # gathered across ranks, padding not counted twice
    steps_per_epoch = len(train_rows) // (4 * 2)  # each rank sees half of every epoch
    assert [r["step"] for r in recs] == [steps_per_epoch, 2 * steps_per_epoch]
    from transformers import AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(out / "best")
    assert model.config.num_labels == 3
