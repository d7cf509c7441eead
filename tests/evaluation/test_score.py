import json
import re

import pandas as pd
import pytest

from giseg.data.registry import DATASETS
from giseg.data.gi import GI_CLASSES, build_index
from giseg.commands.score import main as score_main
from giseg.evaluation.score import read_submission, score_predictions
from giseg.utils.errors import UserError


def _gt_submission(demo_dir, path, cases=None):
    df = pd.read_csv(demo_dir / "train.csv", dtype=str, keep_default_na=False)
    if cases is not None:
        df = df[df["id"].str.extract(r"^case(\d+)_")[0].astype(int).isin(cases)]
    df.rename(columns={"segmentation": "predicted"}).to_csv(path, index=False)
    return path


def test_ground_truth_as_submission_scores_exactly_one(demo_dir, tmp_path, capsys):
    sub = _gt_submission(demo_dir, tmp_path / "gt.csv")
    assert score_main(["--pred", str(sub), "--data_dir", str(demo_dir), "--json", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["dice_mean"] == 1.0 and scores["hausdorff"] == 0.0 and scores["score"] == 1.0
    for key in ("dice_large_bowel", "dice_small_bowel", "dice_stomach", "global_dice_mean", "iou_mean",
                "hausdorff_merged", "time_saved_mean", "per_case"):
        assert key in scores
    assert scores["time_saved_mean"] == 1.0
    out = capsys.readouterr().out
    assert "| all |" in out and "score 1.0000" in out


def test_an_empty_submission_scores_low_and_per_case_rows_exist(demo_dir, tmp_path):
    index = build_index(demo_dir)
    pred = pd.DataFrame({"id": index["id"], **{f"pred_{c}": "" for c in ("large_bowel", "small_bowel", "stomach")}})
    overall, per_case = score_predictions(DATASETS["gi"], index, pred)
    assert overall["hausdorff"] == 1.0 and overall["global_dice_mean"] == 0.0
    assert 0 < overall["dice_mean"] < 1  # only the empty slices score (rule "1")
    assert len(per_case) == index["case"].nunique()


def test_subset_of_cases_is_scored_alone(demo_dir, tmp_path):
    sub = read_submission(_gt_submission(demo_dir, tmp_path / "gt.csv", cases=[7]), GI_CLASSES)
    overall, per_case = score_predictions(DATASETS["gi"], build_index(demo_dir), sub)
    assert per_case["case"].tolist() == [7] and overall["score"] == 1.0


def test_missing_and_extra_ids_are_named(demo_dir, tmp_path):
    index = build_index(demo_dir)
    df = pd.read_csv(_gt_submission(demo_dir, tmp_path / "gt.csv"), dtype=str, keep_default_na=False)
    df[df["id"] != index["id"].iloc[3]].to_csv(tmp_path / "missing.csv", index=False)
    with pytest.raises(UserError, match="have no prediction"):
        score_predictions(DATASETS["gi"], index, read_submission(tmp_path / "missing.csv", GI_CLASSES))
    extra = pd.concat([df, pd.DataFrame({"id": ["case99_day1_slice_0001"] * 3,
                                         "class": ["large_bowel", "small_bowel", "stomach"], "predicted": [""] * 3})])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    with pytest.raises(UserError, match="not in the ground truth.*case99_day1_slice_0001"):
        score_predictions(DATASETS["gi"], index, read_submission(tmp_path / "extra.csv", GI_CLASSES))
    df.drop(columns=["predicted"]).to_csv(tmp_path / "nocol.csv", index=False)
    with pytest.raises(UserError, match="missing column"):
        read_submission(tmp_path / "nocol.csv", GI_CLASSES)


def test_score_cli_reports_bad_input_in_one_line(demo_dir, tmp_path, capsys):
    assert score_main(["--pred", str(tmp_path / "nope.csv"), "--data_dir", str(demo_dir)]) == 2
    assert "error: submission" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [(b"", "is empty \\(0 bytes\\)"),
                                              (b"id,class,predicted\n", "has a header but no rows")])
def test_zero_byte_and_header_only_submissions_are_one_line(demo_dir, tmp_path, capsys, content, message):
    path = tmp_path / "sub.csv"
    path.write_bytes(content)
    assert score_main(["--pred", str(path), "--data_dir", str(demo_dir)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_volumes_scored_in_threads_give_the_serial_figures(demo_dir):
    """A prediction that differs from the truth (one slice off, so Hausdorff > 0) scores the same in 1 and 3 threads."""
    import numpy as np

    index = build_index(demo_dir)
    truth = pd.read_csv(demo_dir / "train.csv", dtype=str, keep_default_na=False)
    wide = truth.pivot(index="id", columns="class", values="segmentation").reindex(index["id"])
    shifted = {f"pred_{c}": np.roll(wide[c].to_numpy(), 1) for c in GI_CLASSES}  # each slice gets its neighbour's
    pred = pd.DataFrame({"id": index["id"].to_numpy(), **shifted})
    serial, per_case_serial = score_predictions(DATASETS["gi"], index, pred, workers=1)
    threaded, per_case_threaded = score_predictions(DATASETS["gi"], index, pred, workers=3)
    assert 0 < serial["hausdorff"] < 1 and serial == threaded
    assert per_case_serial.equals(per_case_threaded)
