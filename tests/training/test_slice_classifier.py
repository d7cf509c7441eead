"""--task presence end to end: a slice classifier trains, resumes exactly, is scored at --final_eval, and gates a
segmenter in giseg predict exactly as giseg tune scored the gate."""
import json

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from giseg.training.config import TrainConfig
from giseg.utils.errors import UserError


@pytest.fixture(scope="module")
def presence_setup(demo_dir, tiny_models, tmp_path_factory):
    from giseg.models.tiny import make_tiny
    from giseg.training.loop import train

    root = tmp_path_factory.mktemp("presence")
    common = dict(data_dir=str(demo_dir), image_size=64, lr=2e-3, num_workers=0, n_folds=2,
                  cache_dir=str(root / "cache"), train_batch_size=8)
    classifier = make_tiny("convnext-classifier", root / "tiny-convnext")
    train(TrainConfig(base_model=str(classifier), task="presence", output_dir=str(root / "cls"), epochs=2,
                      final_eval=True, **common))
    train(TrainConfig(base_model=str(tiny_models["segformer"]), output_dir=str(root / "seg"), epochs=1,
                      head_prior=0.0, **common))  # (0.5 everywhere at the start: false positives to gate)
    return root, classifier, common


def test_a_presence_run_logs_auc_f1_and_empty_slices_and_saves_an_image_classifier(presence_setup):
    from transformers import AutoModelForImageClassification

    root, _, _ = presence_setup
    run = root / "cls"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(0 <= r["auc_mean"] <= 1 and "dice_mean" not in r for r in records)
    log = (run / "train.log").read_text()
    assert "| auc large_bowel" in log and "empty correct" in log and "best mean AUC" in log
    spec = json.loads((run / "best" / "inference_spec.json").read_text())
    assert spec["task"] == "presence" and spec["thresholds"] == [0.5, 0.5, 0.5]
    model = AutoModelForImageClassification.from_pretrained(run / "best", trust_remote_code=False)
    assert model.config.problem_type == "multi_label_classification" and model.config.num_labels == 3
    card = (run / "best" / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "AutoModelForImageClassification" in card
    # --final_eval: the figures of val_presence.csv, at original size
    from giseg.evaluation.presence import presence_figures

    table = pd.read_csv(run / "val_presence.csv")
    scores = json.loads((run / "val_scores.json").read_text())
    wide = {k: table.pivot(index="id", columns="class", values=k)[["large_bowel", "small_bowel", "stomach"]].to_numpy()
            for k in ("probability", "predicted", "present")}
    again = presence_figures(wide["probability"], wide["present"] > 0, scores["thresholds"],
                             ("large_bowel", "small_bowel", "stomach"), wide["predicted"] > 0)
    assert again["auc_mean"] == pytest.approx(scores["auc_mean"], abs=1e-5)
    assert again["empty_correct"] == scores["empty_correct"] and scores["n_slices"] == len(table) // 3


def test_a_presence_run_stopped_after_one_epoch_resumes_to_the_same_weights(presence_setup, tmp_path):
    from giseg.training.loop import train

    root, classifier, common = presence_setup
    common = {**common, "scheduler_name": "constant"}  # (the schedule of a 1-epoch run is then a 2-epoch one's start)
    half, whole = tmp_path / "half", tmp_path / "whole"
    train(TrainConfig(base_model=str(classifier), task="presence", output_dir=str(whole), epochs=2, **common))
    train(TrainConfig(base_model=str(classifier), task="presence", output_dir=str(half), epochs=1, **common))
    train(TrainConfig(base_model=str(classifier), task="presence", output_dir=str(half), epochs=2,
                      resume_from_checkpoint="latest", **common))
    assert "resumed from" in (half / "train.log").read_text()
    straight = load_file(whole / "last" / "model.safetensors")
    resumed = load_file(half / "last" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(np.array_equal(straight[k].numpy(), resumed[k].numpy()) for k in straight)


def test_predict_gates_the_segmenter_as_tune_scored_it(presence_setup, demo_dir, tmp_path):
    from giseg.commands.predict import main as predict_main
    from giseg.commands.score import main as score_main
    from giseg.commands.tune import main as tune_main
    from giseg.data.folds import split_by_case
    from giseg.data.registry import get_adapter
    from giseg.evaluation.tuning import Tuner, collect_volumes, start_decisions
    from giseg.inference.ensemble import Ensemble
    from giseg.inference.gate import SliceGate

    root, _, common = presence_setup
    seg, cls, cache = root / "seg" / "best", root / "cls" / "best", common["cache_dir"]
    # the path predict takes and the one tune scores are one rule: with a gate that does act (0.6 and 12 pixels)
    model = Ensemble.load([seg])
    gate = SliceGate.load([cls])
    adapter = get_adapter("gi").bind(str(demo_dir), {}, model.spec.classes)
    index = adapter.build_index(str(demo_dir))
    _, rows = split_by_case(index, 0, 2, 42)
    volumes = collect_volumes(model, adapter, index, rows, cache, 16, "no", 0, gate)
    decisions = [{**d, "gate_threshold": 0.6, "gate_min_pixels": 12} for d in start_decisions(model.spec)]
    tuner = Tuner(volumes, "multilabel", model.spec.classes, "1", workers=1)
    expected = {(int(r), c): tuner.class_masks(v, c, decisions[c])[i] for v in volumes
                for i, r in enumerate(v.rows) for c in range(3)}
    gated = model.with_decisions(gate_threshold=(0.6,) * 3, gate_min_pixels=(12,) * 3).with_gate(gate)
    inputs = gated.inputs(adapter, index, cache)
    got = dict(gated.iter_masks(index, rows, inputs, adapter.volume_columns))
    assert all(np.array_equal(got[r][c], expected[(r, c)]) for r, c in expected)
    ungated = model.with_decisions().iter_masks(index, rows, model.inputs(adapter, index, cache), adapter.volume_columns)
    assert sum(m.any() for m in expected.values()) < sum(int(m[c].any()) for _, m in ungated for c in range(3))
    # tune searches the gate and saves it; predict with the same gate reproduces tune's score
    assert tune_main(["--model", str(seg), "--gate_model", str(cls), "--data_dir", str(demo_dir), "--cache_dir", cache,
                      "--num_workers", "0", "--search", "thresholds,slice_gate"]) == 0
    report = json.loads((root / "seg" / "tuning.json").read_text())
    assert report["gate_models"] == [str(cls)] and report["after"]["score"] >= report["before"]["score"]
    out = tmp_path / "gated.csv"
    assert predict_main(["--model", str(seg), "--gate_model", str(cls), "--data_dir", str(demo_dir), "--fold", "0",
                         "--out", str(out), "--cache_dir", cache, "--num_workers", "0"]) == 0
    assert score_main(["--pred", str(out), "--data_dir", str(demo_dir), "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["score"] == pytest.approx(report["after"]["score"], abs=1e-6)


def test_classifiers_and_segmenters_are_refused_in_each_others_place(presence_setup, demo_dir, tmp_path, capsys):
    from giseg.commands.predict import main as predict_main
    from giseg.commands.tune import main as tune_main
    from giseg.training.config import validate_config
    from giseg.training.loop import train

    root, classifier, common = presence_setup
    seg, cls, cache = root / "seg" / "best", root / "cls" / "best", common["cache_dir"]
    assert predict_main(["--model", str(cls), "--data_dir", str(demo_dir), "--out", str(tmp_path / "a.csv")]) == 2
    assert "is a slice classifier (--task presence), not a segmenter: pass it as --gate_model" in capsys.readouterr().err
    assert predict_main(["--model", str(seg), "--gate_model", str(seg), "--data_dir", str(demo_dir), "--out",
                         str(tmp_path / "b.csv")]) == 2
    assert "is a multilabel segmenter, not a slice classifier" in capsys.readouterr().err
    # tuned out of fold only: a classifier trained on the segmenter's validation cases is refused
    other = tmp_path / "other"
    train(TrainConfig(base_model=str(classifier), task="presence", output_dir=str(other), epochs=1,
                      **{**common, "n_folds": 3}))
    assert tune_main(["--model", str(seg), "--gate_model", str(other / "best"), "--data_dir", str(demo_dir),
                      "--cache_dir", cache, "--search", "slice_gate"]) == 2
    assert "a classifier that trained on them would gate too well" in capsys.readouterr().err
    with pytest.raises(UserError, match="--task presence trains a slice classifier with binary cross-entropy"):
        validate_config(TrainConfig(task="presence", cutmix_prob=0.5))
