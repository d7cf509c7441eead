import numpy as np
import pandas as pd
import pytest

from giseg.data.gi import build_index
from giseg.data.folds import split_by_case
from giseg.commands.predict import main as predict_main
from giseg.data.rle import decode_rle
from giseg.training.config import TrainConfig
from giseg.training.loop import train


@pytest.fixture(scope="module")
def trained(demo_dir, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(base_model=str(tiny_models["segformer"]), data_dir=str(demo_dir), output_dir=str(out / "r"),
                      image_size=64, epochs=1, lr=2e-3, num_workers=0, n_folds=3, cache_dir=str(out / "cache"),
                      final_eval=True, head_prior=0.0)  # zero bias: one epoch predicts organs (the rows to check)
    return out / "r", train(cfg)


def test_predict_writes_three_rows_per_slice_at_each_scans_original_size(demo_dir, trained, tmp_path):
    run, _ = trained
    out = tmp_path / "sub.csv"
    assert predict_main(["--model", str(run / "best"), "--data_dir", str(demo_dir), "--out", str(out),
                         "--cache_dir", str(tmp_path / "c"), "--num_workers", "0", "--tta",
                         "--thresholds", "0.3,0.5,0.5"]) == 0
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    index = build_index(demo_dir)
    assert list(sub.columns) == ["id", "class", "predicted"] and len(sub) == 3 * len(index)
    sizes = dict(zip(index["id"], zip(index["height"], index["width"])))
    assert {(310, 360), (266, 266)} <= set(sizes.values())
    for r in sub.itertuples():  # decode_rle raises if a run does not fit the scan's own H x W
        decode_rle(r.predicted, sizes[r.id], where=r.id)
    assert (sub["predicted"] != "").any()


def test_predict_works_on_the_test_layout_without_train_csv(demo_dir, trained, tmp_path):
    import shutil

    run, _ = trained
    data = tmp_path / "kaggle"
    shutil.copytree(demo_dir / "train" / "case7", data / "test" / "case7")
    out = tmp_path / "sub.csv"
    assert predict_main(["--model", str(run / "best"), "--data_dir", str(data), "--out", str(out),
                         "--cache_dir", str(tmp_path / "c"), "--num_workers", "0"]) == 0
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sub["id"].str.startswith("case7_").all() and len(sub) % 3 == 0


def test_final_eval_writes_validation_submission_and_scores(trained):
    run, last = trained
    assert (run / "val_submission.csv").is_file() and (run / "val_scores.json").is_file()
    assert 0 <= last["final_score"] <= 1 and "final_hausdorff" in last


def test_predict_on_a_folder_without_scans_or_model_is_clear(demo_dir, tmp_path, trained, capsys):
    run, _ = trained
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert predict_main(["--model", str(run / "best"), "--data_dir", str(tmp_path / "empty")]) == 2
    assert predict_main(["--model", str(tmp_path), "--data_dir", str(demo_dir)]) == 2
    err = capsys.readouterr().err
    assert "error: no scans found" in err and "error: --model" in err and "no config.json" in err


def test_val_scores_from_predict_and_score_agree_with_final_eval(demo_dir, trained, tmp_path):
    import json

    from giseg.commands.score import main as score_main

    run, _ = trained
    sub = tmp_path / "val.csv"
    assert predict_main(["--model", str(run / "best"), "--data_dir", str(demo_dir), "--out", str(sub), "--fold", "0",
                         "--n_folds", "3", "--cache_dir", str(tmp_path / "c"), "--num_workers", "0"]) == 0
    assert score_main(["--pred", str(sub), "--data_dir", str(demo_dir), "--json", str(tmp_path / "s.json")]) == 0
    ours = json.loads((tmp_path / "s.json").read_text())
    final = json.loads((run / "val_scores.json").read_text())
    assert ours["dice_mean"] == pytest.approx(final["dice_mean"], abs=1e-6)
    assert np.isclose(ours["score"], final["score"])


def test_predict_refuses_a_fold_or_split_other_than_the_models_own(demo_dir, trained, tmp_path, capsys):
    run, _ = trained
    base = ["--model", str(run / "best"), "--data_dir", str(demo_dir), "--out", str(tmp_path / "s.csv"),
            "--cache_dir", str(tmp_path / "c"), "--num_workers", "0"]
    for extra in (["--fold", "1"], ["--fold", "0", "--n_folds", "5"], ["--fold", "0", "--split_seed", "7"]):
        assert predict_main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert "was trained with the validation fold --fold 0 --n_folds 3 --split_seed 42" in err, err
    assert predict_main([*base, "--fold", "0"]) == 0  # its own fold: the split comes from the model
    _, val_rows = split_by_case(build_index(demo_dir), 0, 3)
    assert len(pd.read_csv(tmp_path / "s.csv")) == 3 * len(val_rows)


def test_predict_with_onnxruntime_writes_the_masks_of_pytorch(demo_dir, trained, tmp_path):
    """--backend onnxruntime runs the same path (preparation, TTA, an ensemble's averaging, thresholds) with the
    forward pass in ONNX Runtime: at most 1e-4 of the pixels may differ (a probability on a threshold's edge)."""
    from giseg.commands.export_onnx import main as export_main

    run, _ = trained
    deploy = tmp_path / "deploy"
    assert export_main(["--model", str(run / "best"), "--out", str(deploy)]) == 0
    index = build_index(demo_dir)
    sizes = dict(zip(index["id"], zip(index["height"], index["width"])))
    subs = {}
    for backend, models in (("eager", [run / "best"] * 2), ("onnxruntime", [deploy] * 2)):
        out = tmp_path / f"{backend}.csv"
        assert predict_main(["--model", *map(str, models), "--data_dir", str(demo_dir), "--out", str(out), "--tta",
                             "--thresholds", "0.3,0.5,0.5", "--cache_dir", str(tmp_path / "c"), "--num_workers", "0",
                             "--backend", backend]) == 0
        subs[backend] = pd.read_csv(out, dtype=str, keep_default_na=False)
    a, b = subs["eager"], subs["onnxruntime"]
    assert (a[["id", "class"]].values == b[["id", "class"]].values).all() and (a["predicted"] != "").any()
    differ = total = 0
    for x, y, i in zip(a["predicted"], b["predicted"], a["id"]):
        differ += int((decode_rle(x, sizes[i]) != decode_rle(y, sizes[i])).sum())
        total += sizes[i][0] * sizes[i][1]
    assert differ <= 1e-4 * total, (differ, total)
