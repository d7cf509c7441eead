"""--dataset lgg: the LGG brain-MRI layout through the same trainer, metrics, predict, score and notebook code."""
import json

import numpy as np
import pandas as pd
import pytest

from giseg.data.lgg import LGG_CLASSES, build_lgg_index, make_lgg_demo
from giseg.training.config import TrainConfig
from giseg.training.loop import train
from giseg.utils.errors import UserError


@pytest.fixture(scope="module")
def lgg_dir(tmp_path_factory):
    return make_lgg_demo(tmp_path_factory.mktemp("lgg") / "kaggle_3m", n_patients=4, slices=8, size=64)


def test_lgg_index_has_one_row_per_slice_grouped_by_patient(lgg_dir):
    index = build_lgg_index(lgg_dir)
    assert len(index) == 4 * 8 and index["patient"].nunique() == 4 and index["case"].nunique() == 4
    assert (index.groupby("case")["slice"].apply(lambda s: list(s) == sorted(s))).all()
    assert {"path", "mask_path"} <= set(index.columns) and (index["width"] == 64).all()


def test_lgg_bad_folder_is_named(tmp_path):
    with pytest.raises(UserError, match="no <patient>/<name>_mask.tif"):
        build_lgg_index(tmp_path)


@pytest.fixture(scope="module")
def lgg_run(lgg_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lggrun")
    last = train(TrainConfig(base_model="unet", dataset="lgg", data_dir=str(lgg_dir), output_dir=str(out / "r"),
                             image_size=64, epochs=1, lr=2e-3, num_workers=0, n_folds=2, cache_dir=str(out / "c"),
                             final_eval=True, train_batch_size=4))
    return out / "r", last


def test_lgg_trains_one_epoch_with_a_tumor_class(lgg_run):
    run, last = lgg_run
    assert "dice_tumor" in last and "dice_large_bowel" not in last and 0 <= last["dice_mean"] <= 1
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["epoch"] == 1 and "dice_tumor" in rec
    scores = json.loads((run / "val_scores.json").read_text())
    assert "hausdorff_tumor" in scores and 0 <= scores["score"] <= 1


def test_lgg_predict_and_score_round_trip(lgg_run, lgg_dir, tmp_path):
    from giseg.commands.predict import main as predict_main
    from giseg.commands.score import main as score_main

    run, _ = lgg_run
    out = tmp_path / "sub.csv"
    assert predict_main(["--model", str(run / "best"), "--data_dir", str(lgg_dir), "--out", str(out),
                         "--cache_dir", str(tmp_path / "c"), "--num_workers", "0"]) == 0
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert set(sub["class"]) == set(LGG_CLASSES) and len(sub) == 4 * 8
    # the truth written as a submission scores 1
    from giseg.data.lgg import read_lgg_mask
    from giseg.data.rle import encode_rle

    index = build_lgg_index(lgg_dir)
    truth = pd.DataFrame({"id": index["id"], "class": "tumor",
                          "predicted": [encode_rle(read_lgg_mask(p)[0]) for p in index["mask_path"]]})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    assert score_main(["--pred", str(tmp_path / "truth.csv"), "--data_dir", str(lgg_dir), "--dataset", "lgg",
                       "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["score"] == 1.0


def test_lgg_figures_and_notebook_helpers(lgg_run, tmp_path):
    from giseg.evaluation import figures as vis

    run, _ = lgg_run
    paths = vis.save_all(run, tmp_path / "figs")
    assert {"class_frequency", "slice_strip", "training", "predictions", "confusion"} <= {p.stem for p in paths}
    pred = vis.predict_validation(run)
    assert pred.classes == LGG_CLASSES and vis.confusion(pred).shape == (1, 2)
    assert np.isfinite(vis.per_case_table(pred)["slices"]).all()
