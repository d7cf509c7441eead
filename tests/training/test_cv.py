import json

import numpy as np
import pandas as pd
import pytest

from conftest import log_events
from giseg.training.cv import gpu_groups, parse_folds
from giseg.commands.cv import main as cv_main
from giseg.utils.errors import UserError

pytestmark = pytest.mark.slow  # (bash run_tests.sh -m "not slow": the quick part)


@pytest.fixture(scope="module")
def cv_run(demo_dir, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    args = ["--output_dir", str(root / "cv"), "--", "--base_model", str(tiny_models["segformer"]),
            "--data_dir", str(demo_dir), "--image_size", "64", "--epochs", "1", "--lr", "2e-3", "--num_workers", "0",
            "--n_folds", "2", "--cache_dir", str(root / "cache"), "--train_batch_size", "8"]
    assert cv_main(args) == 0
    return root / "cv", args


def test_the_cv_table_is_the_mean_and_sd_of_the_fold_figures(cv_run, demo_dir):
    cv, _ = cv_run
    scores = json.loads((cv / "cv_scores.json").read_text())
    folds = [json.loads((cv / f"fold_{k}" / "val_scores.json").read_text()) for k in (0, 1)]
    for key in ("dice_large_bowel", "dice_small_bowel", "dice_stomach", "dice_mean", "hausdorff", "score"):
        values = [f[key] for f in folds]
        assert scores["mean"][key] == pytest.approx(np.mean(values), abs=1e-12)
        assert scores["sd"][key] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    table = (cv / "cv_table.md").read_text()
    assert "| mean ± sd |" in table and "| out of fold |" in table
    log = (cv / "cv.log").read_text()  # the table's rows in the log read as rows ("cv | | fold ..." before)
    assert " INFO cv | fold | slices | dice_large_bowel |" in log and "cv | |" not in log
    # the out-of-fold submission: every slice of the data once, from the model that did not train on it
    oof = pd.read_csv(cv / "oof_submission.csv", dtype=str, keep_default_na=False)
    n_slices = sum(1 for _ in (demo_dir / "train").rglob("*.png"))
    assert oof["id"].nunique() == n_slices and len(oof) == 3 * n_slices
    assert scores["out_of_fold"]["n_slices"] == n_slices


def test_the_final_model_trains_on_every_case_without_validation(demo_dir, tiny_models, tmp_path):
    from transformers import AutoModelForSemanticSegmentation

    from giseg.training.cv import fold_command
    from giseg.training.config import TrainConfig
    from giseg.training.loop import train

    cmd = fold_command(["--epochs", "1"], None, tmp_path / "final", [], "")
    assert cmd[-4:] == ["--fold", "-1", "--output_dir", str(tmp_path / "final")]  # what cv.py --final_model runs
    final = tmp_path / "final"
    train(TrainConfig(base_model=str(tiny_models["segformer"]), data_dir=str(demo_dir), output_dir=str(final),
                      image_size=64, epochs=1, lr=2e-3, num_workers=0, n_folds=2, fold=-1,
                      cache_dir=str(tmp_path / "cache")))
    record = json.loads((final / "metrics.jsonl").read_text().splitlines()[-1])
    assert "dice_mean" not in record and record["train_loss"] > 0
    log = (final / "train.log").read_text()
    assert "--fold -1: all of them train, no validation set" in log and "val_loss" not in log
    n_slices = sum(1 for _ in (demo_dir / "train").rglob("*.png"))
    assert f"train {n_slices} slices" in log or f"{n_slices} slices" in log
    AutoModelForSemanticSegmentation.from_pretrained(final / "best")
    assert "trained on every case" in (final / "best" / "README.md").read_text()
    with pytest.raises(UserError, match="--fold -1 trains on every case with no validation set"):
        train(TrainConfig(data_dir=str(demo_dir), output_dir=str(tmp_path / "x"), fold=-1, final_eval=True))


def test_a_second_start_keeps_the_finished_folds(cv_run):
    cv, args = cv_run
    before = {k: (cv / f"fold_{k}" / "val_scores.json").stat().st_mtime_ns for k in (0, 1)}
    assert cv_main(args) == 0
    assert {k: (cv / f"fold_{k}" / "val_scores.json").stat().st_mtime_ns for k in (0, 1)} == before
    assert "fold 0: finished before (val_scores.json, same settings and data), kept" in (cv / "cv.log").read_text()


def test_an_out_of_fold_ensemble_of_a_cv_with_itself_scores_as_the_cv(cv_run, demo_dir, tmp_path, capsys):
    cv, args = cv_run
    cache = args[args.index("--cache_dir") + 1]
    assert cv_main(["--ensemble", str(cv), str(cv), "--weights", "1,3", "--data_dir", str(demo_dir), "--output_dir",
                    str(tmp_path / "ens"), "--cache_dir", cache, "--num_workers", "0"]) == 0
    ens = json.loads((tmp_path / "ens" / "ensemble_scores.json").read_text())
    oof = json.loads((cv / "cv_scores.json").read_text())["out_of_fold"]
    for key in ("dice_mean", "hausdorff", "score"):
        assert ens[key] == pytest.approx(oof[key], abs=1e-6)
    (tmp_path / "not-a-cv").mkdir()
    assert cv_main(["--ensemble", str(tmp_path / "not-a-cv"), "--data_dir", str(demo_dir), "--output_dir",
                    str(tmp_path / "x")]) == 2
    assert "no cv_config.json" in capsys.readouterr().err


def test_tuning_a_cv_out_of_fold_saves_values_that_predict_uses(cv_run, demo_dir, tmp_path):
    from giseg.commands.predict import main as predict_main
    from giseg.commands.score import main as score_main
    from giseg.commands.tune import main as tune_main

    cv, args = cv_run
    cache = args[args.index("--cache_dir") + 1]
    # (the gates' grid is left out to stay quick: tests/test_tune.py searches it)
    assert tune_main(["--cv", str(cv), "--data_dir", str(demo_dir), "--cache_dir", cache, "--num_workers", "0",
                      "--search", "thresholds,postprocess"]) == 0
    report = json.loads((cv / "tuning.json").read_text())
    assert report["after"]["score"] >= report["before"]["score"]
    specs = [json.loads((cv / f"fold_{k}" / "best" / "inference_spec.json").read_text()) for k in (0, 1)]
    assert specs[0]["postprocess"] == specs[1]["postprocess"] == list(report["decisions"]["postprocess"])
    # predict.py applies them: each fold's model on its own cases, scored together = the tuner's figure
    subs = []
    for k in (0, 1):
        out = tmp_path / f"fold{k}.csv"
        assert predict_main(["--model", str(cv / f"fold_{k}" / "best"), "--data_dir", str(demo_dir), "--fold", str(k),
                             "--out", str(out), "--cache_dir", cache, "--num_workers", "0"]) == 0
        subs.append(pd.read_csv(out, dtype=str, keep_default_na=False))
    pd.concat(subs).to_csv(tmp_path / "oof.csv", index=False)
    assert score_main(["--pred", str(tmp_path / "oof.csv"), "--data_dir", str(demo_dir), "--json",
                       str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["score"] == pytest.approx(report["after"]["score"], abs=2e-3)


def test_fold_lists_and_gpu_groups_are_checked():
    assert parse_folds("all", 3) == [0, 1, 2] and parse_folds("2,0", 3) == [0, 2]
    with pytest.raises(UserError, match="--folds must be"):
        parse_folds("3", 3)
    assert gpu_groups("0,1,2,3", 2) == [["0", "1"], ["2", "3"]] and gpu_groups("", 2) == [[], []]
    with pytest.raises(UserError, match="cannot be split"):
        gpu_groups("0,1,2", 2)
    with pytest.raises(UserError, match="--gpus 0,1: this machine has no CUDA GPU"):
        gpu_groups("0,1", 1, available=0)  # (run_train.sh refuses the same)
    with pytest.raises(UserError, match="there is no GPU 2; this machine has 2"):
        gpu_groups("1,2", 1, available=2)
    with pytest.raises(UserError, match="expected comma-separated GPU numbers"):
        gpu_groups("a,b", 1, available=2)


def _rerun(cv_run, tmp_path, capsys, *change, output_dir=None):
    cv, args = cv_run
    args = [a if a != str(cv) else str(output_dir or cv) for a in args]
    trainer = args[args.index("--") + 1:]
    for flag, value in zip(change[::2], change[1::2]):
        trainer[trainer.index(flag) + 1] = value
    before = (cv / "cv_config.json").read_text()
    code = cv_main([*args[:args.index("--") + 1], *trainer])
    assert (cv / "cv_config.json").read_text() == before
    return code, capsys.readouterr().err


def test_a_cv_rerun_with_other_settings_is_refused_not_reported_with_the_old_folds(cv_run, tmp_path, capsys):
    code, err = _rerun(cv_run, tmp_path, capsys, "--image_size", "96")
    assert code == 2 and "holds a CV with other settings: --image_size was 64, now 96" in err
    code, err = _rerun(cv_run, tmp_path, capsys, "--n_folds", "3")  # 2-fold folders are no 3-fold CV
    assert code == 2 and "--n_folds was 2, now 3" in err


def test_a_fold_folder_of_another_cv_is_not_taken_as_this_ones(cv_run, tmp_path, capsys):
    import shutil

    cv, _ = cv_run
    other = tmp_path / "other"
    shutil.copytree(cv, other)
    (other / "fold_0").rename(other / "swap")  # the two folds' runs, each placed where the other goes
    (other / "fold_1").rename(other / "fold_0")
    (other / "swap").rename(other / "fold_1")
    code, err = _rerun(cv_run, tmp_path, capsys, output_dir=other)
    assert code == 2 and "fold_0 was trained otherwise (--fold was 1)" in err


def _start_cv_with_a_stand_in_trainer(demo_dir, tiny_models, tmp_path):
    """giseg cv whose launcher is a stand-in that records the signal it gets; returns (process, fold 0's folder)."""
    import os
    import subprocess
    import sys
    import time

    fake = tmp_path / "fake_trainer.py"  # stands in for the launcher: records the signal it gets, as trainer.py saves
    fake.write_text("import signal, sys, time, pathlib\n"
                    "out = pathlib.Path(sys.argv[sys.argv.index('--output_dir') + 1])\n"
                    "def stop(n, f):\n    (out / 'got_signal').write_text(str(n)); sys.exit(128 + n)\n"
                    "signal.signal(signal.SIGTERM, stop)\n(out / 'started').write_text('1')\n"
                    "time.sleep(120)\n")
    cmd = [sys.executable, "-m", "giseg", "cv", "--output_dir", str(tmp_path / "cv"), "--launcher",
           f"{sys.executable} {fake}", "--", "--base_model", str(tiny_models["segformer"]), "--data_dir", str(demo_dir),
           "--n_folds", "2", "--cache_dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    fold = tmp_path / "cv" / "fold_0"
    deadline = time.time() + 120
    while not (fold / "started").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (fold / "started").exists(), proc.communicate()
    return proc, fold


def test_a_cv_killed_with_sigkill_still_ends_its_trainer(demo_dir, tiny_models, tmp_path):
    import signal
    import time

    proc, fold = _start_cv_with_a_stand_in_trainer(demo_dir, tiny_models, tmp_path)
    proc.kill()  # no handler runs: the trainer learns it through PR_SET_PDEATHSIG
    proc.communicate(timeout=30)
    deadline = time.time() + 30
    while not (fold / "got_signal").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (fold / "got_signal").read_text() == str(int(signal.SIGTERM))  # (it used to run on, detached)


def test_sigterm_to_a_cv_is_passed_to_its_trainer_which_ends_and_nothing_runs_on(demo_dir, tiny_models, tmp_path):
    import signal

    proc, fold = _start_cv_with_a_stand_in_trainer(demo_dir, tiny_models, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert (fold / "got_signal").read_text() == str(int(signal.SIGTERM))
    assert not (tmp_path / "cv" / "fold_1").exists()  # no further fold started
    assert "stopped by SIGTERM" in err.splitlines()[-1]


def test_parallel_folds_run_in_slots_with_their_own_gpus_at_the_same_time():
    import threading
    import time

    from giseg.training.cv import run_in_slots

    seen, running, peak, lock = [], [0], [0], threading.Lock()

    def train_fold(k, gpus):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            seen.append((k, tuple(gpus)))
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    run_in_slots([0, 1, 2, 3, 4], gpu_groups("0,1,2,3", 2), train_fold)
    assert sorted(seen) == [(0, ("0", "1")), (1, ("2", "3")), (2, ("0", "1")), (3, ("2", "3")), (4, ("0", "1"))]
    assert peak[0] == 2  # two folds at once, never more
    seen.clear()
    run_in_slots([1, 2], [[]], train_fold)
    assert seen == [(1, ()), (2, ())]  # one slot: in order


def test_compare_reads_a_cv_folder_as_its_fold_runs(cv_run, capsys):
    """`giseg compare runs/*` with a CV among them: a row per fold (named cv/fold_<k>), not a skipped folder."""
    from giseg.commands.compare import main as compare_main

    cv, _ = cv_run
    assert compare_main([str(cv)]) == 0
    out = capsys.readouterr()
    rows = [line for line in out.out.splitlines() if line.startswith("| cv/fold_")]
    # (the table is sorted by mean Dice, best first)
    assert sorted(r.split("|")[1].strip() for r in rows) == ["cv/fold_0", "cv/fold_1"] and "left out" not in out.err


def test_a_presence_cv_scores_its_folds_out_of_fold_and_gates_the_segmenter_cv_in_tune(cv_run, demo_dir, tmp_path):
    from giseg.commands.tune import main as tune_main
    from giseg.models.tiny import make_tiny

    cv, args = cv_run
    trainer_args = args[args.index("--") + 1:]
    trainer_args[trainer_args.index("--base_model") + 1] = str(make_tiny("convnext-classifier", tmp_path / "tiny"))
    assert cv_main(["--output_dir", str(tmp_path / "pcv"), "--", *trainer_args, "--task", "presence"]) == 0
    scores = json.loads((tmp_path / "pcv" / "cv_scores.json").read_text())
    folds = [json.loads((tmp_path / "pcv" / f"fold_{k}" / "val_scores.json").read_text()) for k in (0, 1)]
    for key in ("auc_large_bowel", "auc_mean", "f1_mean", "empty_correct"):
        assert scores["mean"][key] == pytest.approx(np.mean([f[key] for f in folds]), abs=1e-12)
    n_slices = sum(1 for _ in (demo_dir / "train").rglob("*.png"))
    assert scores["out_of_fold"]["n_slices"] == n_slices
    assert len(pd.read_csv(tmp_path / "pcv" / "oof_presence.csv")) == 3 * n_slices
    assert "| out of fold |" in (tmp_path / "pcv" / "cv_table.md").read_text()
    # fold k's classifier gates fold k's segmenter, out of fold
    cache = args[args.index("--cache_dir") + 1]
    assert tune_main(["--cv", str(cv), "--gate_model", str(tmp_path / "pcv"), "--data_dir", str(demo_dir),
                      "--cache_dir", cache, "--num_workers", "0", "--search", "slice_gate",
                      "--out", str(tmp_path / "gate.json")]) == 0
    report = json.loads((tmp_path / "gate.json").read_text())
    assert report["gate_models"] == [str(tmp_path / "pcv")] and report["after"]["score"] >= report["before"]["score"]
    assert report["before"]["n_slices"] == n_slices


def test_the_competition_preset_trains_both_families_and_tunes_their_ensemble_out_of_fold(cv_run, tiny_models,
                                                                                           tmp_path, capsys):
    """giseg cv --preset competition: the folds of --base_model and of --second_model with the same flags, then the
    pair's thresholds, gates and post-processing tuned out of fold into tuned.json; the log names the predict
    command."""
    cv, args = cv_run
    trainer_args, out = args[args.index("--") + 1:], tmp_path / "preset"
    assert cv_main(["--output_dir", str(out), "--preset", "competition", "--", *trainer_args]) == 2
    assert "--preset competition needs --second_model" in capsys.readouterr().err and not out.exists()
    preset = ["--output_dir", str(out), "--preset", "competition", "--second_model", str(tiny_models["upernet"])]
    assert cv_main([*preset, "--", *trainer_args]) == 0
    # the first family's folds are the plain CV's run again (same flags and seed: the same figures, on a CPU)
    first, plain = (json.loads((c / "cv_scores.json").read_text()) for c in (out / "first", cv))
    assert first["mean"] == pytest.approx(plain["mean"], abs=1e-6)
    second = json.loads((out / "second" / "fold_0" / "run_config.json").read_text())
    assert second["base_model"] == str(tiny_models["upernet"])
    report = json.loads((out / "tuned.json").read_text())
    assert report["source"] == f"out-of-fold validation of {out / 'first'}, {out / 'second'}"
    assert report["after"]["score"] >= report["before"]["score"]
    log = "\n".join(log_events((out / "preset.log").read_text()))
    assert f"predict with: giseg predict --model {out / 'first'}" in log and f"--tuned {out / 'tuned.json'}" in log
    # a plain CV folder is not taken for the recipe's (a rerun's resume: test_a_second_start_keeps_the_finished_folds)
    assert cv_main([*preset[:1], str(cv), *preset[2:], "--", *trainer_args]) == 2
    assert "giseg cv --preset did not write" in capsys.readouterr().err
