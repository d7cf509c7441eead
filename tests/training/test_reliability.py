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

pytestmark = pytest.mark.slow  # (bash run_tests.sh -m "not slow": the quick part)


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


def test_accelerate_launch_with_a_config_file_shards_training_over_two_processes(two_process_run, demo_dir):
    """As `accelerate config` users start it: `accelerate launch --config_file <yaml> trainer.py ...`, here a
    two-process multi-GPU config on a machine without GPUs (the trainer then runs both ranks on the CPU)."""
    res, out = two_process_run.result, two_process_run.out
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world size 2, device cpu" in (out / "train.log").read_text()
    assert "Grad strides do not match bucket view strides" not in res.stdout + res.stderr
    from giseg.data.gi import build_index
    from giseg.data.folds import split_by_case

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


# ---------------------------------------------------------------- run identity and lifecycle (in-process)
def _cfg(demo_dir, model, out, tmp_path, **kw):
    from giseg.training.config import TrainConfig

    base = dict(base_model=str(model), data_dir=str(demo_dir), output_dir=str(out), image_size=64, epochs=1,
                train_batch_size=8, lr=2e-3, num_workers=0, n_folds=3, cache_dir=str(tmp_path / "cache"), log_every=3)
    return TrainConfig(**{**base, **kw})


def test_every_flag_is_either_part_of_the_run_identity_or_allowed_to_change_on_resume():
    import dataclasses

    from giseg.training.run_dir import MAY_CHANGE_ON_RESUME, RUN_IDENTITY
    from giseg.training.config import TrainConfig

    flags = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not set(RUN_IDENTITY) & set(MAY_CHANGE_ON_RESUME)
    assert set(RUN_IDENTITY) - {"world_size"} | set(MAY_CHANGE_ON_RESUME) == flags


def test_a_resume_with_another_split_size_or_batch_is_refused_naming_old_and_new(demo_dir, tiny_models, tmp_path):
    import dataclasses

    from giseg.training.loop import train
    from giseg.utils.errors import UserError

    out = tmp_path / "run"
    cfg = _cfg(demo_dir, tiny_models["segformer"], out, tmp_path)
    train(cfg)
    saved = (out / "run_config.json").read_text()
    resume = dataclasses.replace(cfg, resume_from_checkpoint="latest", epochs=2)
    with pytest.raises(UserError) as e:
        train(dataclasses.replace(resume, fold=1, image_size=96, train_batch_size=4))
    # every difference named with its old and new value, in the order of trainer.py --help
    assert "--fold was 0, now 1; --train_batch_size was 8, now 4; --image_size was 64, now 96." in str(e.value)
    with pytest.raises(UserError, match=r"--base_model was '.*tiny-segformer', now '.*tiny-upernet'"):
        train(dataclasses.replace(resume, base_model=str(tiny_models["upernet"])))  # used to end in a traceback
    assert (out / "run_config.json").read_text() == saved  # a refused resume changes nothing
    # allowed changes (more epochs, other logging) resume, and the saved identity stays
    train(dataclasses.replace(resume, log_every=1, data_dir=str(demo_dir) + "/"))  # the same folder, named otherwise
    config = json.loads((out / "run_config.json").read_text())
    assert config["run_id"] == json.loads(saved)["run_id"] and len(config["resumes"]) == 1
    assert [r["epoch"] for r in _records(out)] == [1, 2]


def test_a_start_that_failed_before_its_first_checkpoint_reruns_plainly(demo_dir, tiny_models, tmp_path):
    import dataclasses

    from giseg.training.loop import train
    from giseg.utils.errors import UserError

    out = tmp_path / "run"
    cfg = _cfg(demo_dir, tiny_models["segformer"], out, tmp_path)
    with pytest.raises(UserError, match="cannot load --base_model"):
        train(dataclasses.replace(cfg, base_model=str(tmp_path / "no-such-model")))
    assert (out / "run_config.json").exists()  # the failed start left a run folder ...
    train(cfg)  # ... and the plain rerun works (it used to be refused, as was --resume_from_checkpoint latest)
    assert "saved no resumable state: starting over" in (out / "train.log").read_text()
    assert [r["epoch"] for r in _records(out)] == [1]


def test_latest_skips_an_incomplete_checkpoint_and_the_epoch_is_evaluated_once(demo_dir, tiny_models, tmp_path):
    import dataclasses

    from giseg.training.loop import train

    out = tmp_path / "run"
    cfg = _cfg(demo_dir, tiny_models["segformer"], out, tmp_path, epochs=2, save_total_limit=2)
    train(cfg)
    reference = _records(out)
    newest = out / "checkpoints" / "step_00000012" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # as a kill in the middle of writing it would leave it
    train(dataclasses.replace(cfg, resume_from_checkpoint="latest"))
    log = (out / "train.log").read_text()
    assert "skipped checkpoint" in log and "model.safetensors is truncated" in log
    assert "resumed from " + str(out / "checkpoints" / "step_00000006") in log
    again = _records(out)
    assert [r["epoch"] for r in again] == [1, 2]  # epoch 2 redone, recorded once
    for a, b in zip(again, reference):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["dice_mean"] == pytest.approx(b["dice_mean"], abs=1e-6)


def test_a_live_run_holds_its_output_dir_and_a_file_is_no_output_dir(demo_dir, tiny_models, tmp_path):
    from giseg.training.loop import train
    from giseg.utils.errors import UserError
    from giseg.utils.locks import FolderLock

    out = tmp_path / "run"
    with FolderLock(out / ".lock", wait=False):  # as a running trainer holds it
        with pytest.raises(UserError, match=rf"--output_dir {out} is in use by a live run \(pid {os.getpid()}\)"):
            train(_cfg(demo_dir, tiny_models["segformer"], out, tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; pass a folder"):
        train(_cfg(demo_dir, tiny_models["segformer"], tmp_path / "file", tmp_path))


def test_final_eval_refuses_mixed_scan_sizes_in_a_volume_before_training(demo_dir, tiny_models, tmp_path):
    import shutil

    import cv2
    import pandas as pd

    from giseg.training.loop import train
    from giseg.utils.errors import UserError

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    scan = sorted(data.glob("train/*/*/scans/*.png"))[3]
    _, num, w, h, px, py = scan.stem.split("_")
    img = cv2.imread(str(scan), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(scan.with_name(f"slice_{num}_{int(w) + 16}_{h}_{px}_{py}.png")),
                cv2.resize(img, (int(w) + 16, int(h))))
    scan.unlink()
    csv = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    slice_id = f"{scan.parts[-3]}_slice_{num}"
    csv.loc[csv["id"] == slice_id, "segmentation"] = ""
    csv.to_csv(data / "train.csv", index=False)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"volume\(s\) mix scan sizes"):  # used to fail only after all epochs
        train(_cfg(data, tiny_models["segformer"], out, tmp_path, final_eval=True))
    assert not (out / "metrics.jsonl").exists()


def test_a_changed_or_zeroed_checkpoint_file_is_refused_by_its_checksum_and_latest_falls_back(demo_dir, tiny_models,
                                                                                               tmp_path):
    import dataclasses

    from giseg.training.loop import train
    from giseg.utils.errors import UserError

    out = tmp_path / "run"
    cfg = _cfg(demo_dir, tiny_models["segformer"], out, tmp_path, epochs=2, save_total_limit=2)
    train(cfg)
    newest = out / "checkpoints" / "step_00000012"
    # our own state is JSON / safetensors: no pickle of the schedule; the manifest has a checksum per file
    assert (newest / "scheduler.json").is_file() and not list(newest.glob("custom_checkpoint_*"))
    from giseg.utils.files import current_umask

    assert (newest / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~current_umask()  # (safetensors: 0600)
    manifest = json.loads((newest / "trainer_state.json").read_text())["files"]
    assert all(len(m["sha256"]) == 64 for m in manifest.values())
    rng = newest / "random_states_0.pkl"
    rng.write_bytes(bytes(rng.stat().st_size))  # zeroed, same size: Accelerate would skip it silently
    with pytest.raises(UserError, match=r"random_states_0.pkl does not match its checksum"):
        train(dataclasses.replace(cfg, resume_from_checkpoint=str(newest)))
    train(dataclasses.replace(cfg, resume_from_checkpoint="latest"))
    log = (out / "train.log").read_text()
    assert "random_states_0.pkl does not match its checksum" in log
    assert "resumed from " + str(out / "checkpoints" / "step_00000006") in log


def test_a_resume_after_the_data_changed_is_refused_naming_the_change(demo_dir, tiny_models, tmp_path):
    import dataclasses
    import shutil

    import pandas as pd

    from giseg.training.loop import train
    from giseg.utils.errors import UserError

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    out = tmp_path / "run"
    cfg = _cfg(data, tiny_models["segformer"], out, tmp_path)
    train(cfg)
    saved = json.loads((out / "run_config.json").read_text())["data"]
    gone = saved["case_ids"][-1]
    csv = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    csv[~csv["id"].str.startswith(f"case{gone}_")].to_csv(data / "train.csv", index=False)
    shutil.rmtree(data / "train" / f"case{gone}")
    with pytest.raises(UserError, match=rf"the data changed since the run started \(.*case\(s\) \[{gone}\] gone"):
        train(dataclasses.replace(cfg, resume_from_checkpoint="latest", epochs=2))
    assert json.loads((out / "run_config.json").read_text())["data"] == saved


def test_a_run_saved_before_head_prior_existed_is_taken_as_run_with_zero_bias(tmp_path):
    """run_config.json files written before --head_prior lack it; their runs had the zero bias: --resume_run resumes
    them with 0, and a resume with today's default is refused naming both values (not taken as the same recipe)."""
    from giseg.training.config import TrainConfig, saved_settings
    from giseg.training.run_dir import check_resume_matches, run_identity
    from giseg.utils.errors import UserError

    old = run_identity(TrainConfig(output_dir=str(tmp_path)), 1)
    del old["head_prior"]
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    assert saved_settings(str(tmp_path))["head_prior"] == 0.0
    check_resume_matches(old, run_identity(TrainConfig(output_dir=str(tmp_path), head_prior=0.0), 1), tmp_path)
    with pytest.raises(UserError, match=r"--head_prior was 0.0, now 0.01"):
        check_resume_matches(old, run_identity(TrainConfig(output_dir=str(tmp_path)), 1), tmp_path)
