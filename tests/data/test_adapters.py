"""A dataset is one adapter: a throwaway third one (tiny generated files, two classes) is trained, predicted,
scored and drawn through the real commands, with no other module touched; and every path from a trained model
to masks (the trainer's evaluation, predict.py, visualise.py, the app) gives the same masks, pixel for pixel."""
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from giseg.data.registry import DATASETS, get_adapter
from giseg.data.base import DatasetAdapter
from giseg.utils.errors import UserError


class ShapesAdapter(DatasetAdapter):
    """64x64 16-bit PNGs of a bright disc and a dark bar; each slice's two masks in a .npy beside it."""
    name = "shapes"
    description = "generated discs and bars (a test dataset)"
    classes = ("disc", "bar")
    priority = ("bar", "disc")
    colours = {"disc": "magenta", "bar": "cyan"}
    volume_columns = ("case",)

    def build_index(self, data_dir, split=None, require_labels=True):
        files = sorted(Path(data_dir).glob("case*/s*.png"))
        return pd.DataFrame([{"id": f"{p.parent.name}_{p.stem}", "case": int(p.parent.name[4:]),
                              "slice": int(p.stem[1:]), "width": 64, "height": 64, "path": str(p),
                              "mask_path": str(p.with_suffix(".npy"))} for p in files])

    def read_image(self, row):
        return cv2.imread(row.path, cv2.IMREAD_UNCHANGED)

    def read_masks(self, row):
        return np.load(row.mask_path)

    def make_demo(self, out_dir):
        yy, xx = np.mgrid[0:64, 0:64]
        for case in range(4):
            rng = np.random.default_rng(case)
            (Path(out_dir) / f"case{case}").mkdir(parents=True, exist_ok=True)
            for k in range(6):
                cy, cx = rng.integers(16, 48, 2)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(36, 120)
                bar = (np.abs(xx - rng.integers(8, 56)) <= 3) & (yy > 10) & (yy < 54)  # crosses the disc at times
                img = rng.normal(20000, 1500, (64, 64))
                img[disc], img[bar] = 50000, 5000
                cv2.imwrite(str(Path(out_dir) / f"case{case}" / f"s{k}.png"), np.clip(img, 0, 65535).astype(np.uint16))
                np.save(Path(out_dir) / f"case{case}" / f"s{k}.npy", np.stack([disc, bar]).astype(np.uint8))
        return Path(out_dir)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    DATASETS["shapes"] = ShapesAdapter()
    yield DATASETS["shapes"].make_demo(tmp_path_factory.mktemp("shapes"))
    del DATASETS["shapes"]


@pytest.fixture(scope="module")
def shapes_run(shapes, tiny_models, tmp_path_factory):
    """trainer.py's CLI on the shapes dataset; every mask its evaluation computes is recorded on the way."""
    from giseg.inference import segmenter as inference
    from giseg.training.loop import main as train_main

    out = tmp_path_factory.mktemp("shapes_run")
    recorded = []
    masks = inference.Segmenter.masks

    def recording(self, probs, size):
        result = masks(self, probs, size)
        recorded.append(result.numpy().copy())
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference.Segmenter, "masks", recording)
        assert train_main(["--dataset", "shapes", "--data_dir", str(shapes), "--base_model",
                           str(tiny_models["segformer"]), "--output_dir", str(out / "run"), "--image_size", "64",
                           "--epochs", "3", "--lr", "3e-3", "--n_folds", "2", "--train_batch_size", "4",
                           "--eval_batch_size", "64", "--num_workers", "0", "--cache_dir", str(out / "cache"),
                           "--context_slices", "3", "--context_stride", "1",
                           "--head_prior", "0"]) == 0  # zero bias: 3 short epochs predict shapes (masks to compare)
    return out / "run", out / "cache", recorded


def test_the_third_dataset_trains_with_its_own_classes(shapes_run):
    run, _, recorded = shapes_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and {"dice_disc", "dice_bar", "global_dice_bar", "iou_disc"} <= set(records[-1])
    assert "dice_large_bowel" not in records[-1]
    assert len(recorded) == 3  # one evaluation (one batch) per epoch went through Segmenter.masks
    log = (run / "train.log").read_text()
    assert "dice disc " in log and "(shapes)" in log
    spec = json.loads((run / "best" / "inference_spec.json").read_text())
    assert spec["dataset"] == "shapes" and spec["classes"] == ["disc", "bar"] and spec["context_slices"] == 3


def test_the_third_dataset_predicts_scores_and_draws(shapes, shapes_run, tmp_path):
    from giseg.evaluation import figures as vis
    from giseg.commands.app import Analyser
    from giseg.commands.predict import main as predict_main
    from giseg.commands.score import main as score_main

    run, cache, _ = shapes_run
    sub = tmp_path / "sub.csv"
    assert predict_main(["--model", str(run / "best"), "--data_dir", str(shapes), "--out", str(sub),
                         "--cache_dir", str(cache), "--num_workers", "0"]) == 0
    df = pd.read_csv(sub, dtype=str, keep_default_na=False)
    assert set(df["class"]) == {"disc", "bar"} and len(df) == 2 * 4 * 6
    assert score_main(["--pred", str(sub), "--data_dir", str(shapes), "--dataset", "shapes", "--json",
                       str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert {"dice_disc", "hausdorff_bar", "time_saved_disc"} <= set(scores) and scores["n_volumes"] == 4
    paths = vis.save_all(run, tmp_path / "figs")
    assert {"class_frequency", "slice_strip", "augmentation", "training", "predictions", "confusion"} <= \
        {p.stem for p in paths}
    analysis = Analyser(run / "best", shapes, device="cpu").analyse_id("case1_s2")
    assert list(analysis.table["organ"]) == ["disc", "bar"] and analysis.overlay.shape == (64, 64, 3)


def test_predict_visualise_and_app_give_the_masks_of_the_trainers_evaluation(shapes, shapes_run, tmp_path):
    """The slices are 64x64 and the model's size is 64: the evaluation's masks are at original size too."""
    from giseg.evaluation import figures as vis
    from giseg.commands.app import Analyser
    from giseg.data.folds import split_by_case
    from giseg.commands.predict import main as predict_main
    from giseg.data.rle import decode_rle

    run, cache, recorded = shapes_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(range(len(records)), key=lambda i: records[i]["dice_mean"])
    evaluation = recorded[best]  # (N, 2, 64, 64), the validation slices in index order
    index = DATASETS["shapes"].build_index(shapes)
    _, val_rows = split_by_case(index, 0, 2)
    ids = list(index["id"].iloc[val_rows])
    assert evaluation.shape == (len(ids), 2, 64, 64)
    assert 0 < evaluation.mean() < 1  # the comparison is not between two empty (or full) sets of masks

    sub = tmp_path / "val.csv"
    assert predict_main(["--model", str(run / "best"), "--data_dir", str(shapes), "--out", str(sub), "--fold", "0",
                         "--n_folds", "2", "--cache_dir", str(cache), "--num_workers", "0",
                         "--batch_size", "64"]) == 0
    df = pd.read_csv(sub, dtype=str, keep_default_na=False).set_index(["id", "class"])["predicted"]
    predicted = np.stack([[decode_rle(df[(i, c)], (64, 64)) for c in ("disc", "bar")] for i in ids]).astype(bool)
    np.testing.assert_array_equal(predicted, evaluation)

    pred = vis.predict_validation(run, batch_size=64)
    np.testing.assert_array_equal(np.stack([pred.masks[i] for i in ids]), evaluation)

    analyser = Analyser(run / "best", shapes, device="cpu")
    for k in (0, len(ids) // 2, len(ids) - 1):  # a volume's first, a middle and a last slice (2.5D edges)
        np.testing.assert_array_equal(analyser.analyse_id(ids[k]).masks, evaluation[k])


def test_an_unknown_dataset_is_named_with_the_registered_ones():
    with pytest.raises(UserError, match="unknown dataset 'nope'; registered: gi, lgg"):
        get_adapter("nope")


def test_an_adapter_without_options_cannot_have_them_changed_through_a_shared_default():
    """The base class's options are a read-only empty mapping: no adapter can change another's by mutating it."""
    import pytest

    from giseg.data.registry import DATASETS

    with pytest.raises(TypeError):
        DATASETS["gi"].options["image_column"] = "x"
    assert dict(DATASETS["lgg"].options) == {} and not DATASETS["gi"].options
