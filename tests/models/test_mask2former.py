"""Mask2Former, the mask-classification family: its head replaced for our labels, its own matched loss, per-class
maps that keep overlapping organs, and a trained folder that predict.py and Mask2Former's own class load."""
import pytest
import torch

from giseg.data.gi import GI_CLASSES as GI
from giseg.data.gi import GI_PRIORITY
from giseg.models.wrapper import SegmentationModel, freeze_unused_parameters, query_maps, query_targets
from giseg.models.load import load_model
from giseg.models.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny_mask2former(tmp_path_factory):
    return make_tiny("mask2former", tmp_path_factory.mktemp("m2f") / "tiny-mask2former")


def test_per_class_maps_keep_two_overlapping_organs():
    # two queries: one says "large_bowel" for the left two thirds, one "stomach" for the right two thirds
    class_logits = torch.full((1, 2, 4), -10.0)
    class_logits[0, 0, 0] = class_logits[0, 1, 2] = 10.0
    mask_logits = torch.full((1, 2, 3, 3), -10.0)
    mask_logits[0, 0, :, :2] = 10.0
    mask_logits[0, 1, :, 1:] = 10.0
    maps = torch.sigmoid(query_maps(class_logits, mask_logits, multiclass=False))[0] > 0.5
    assert maps[0, :, 1].all() and maps[2, :, 1].all()  # the middle column: both organs (an argmax keeps one)
    assert maps[0].sum() == 6 and maps[2].sum() == 6 and not maps[1].any()
    one = query_maps(class_logits, mask_logits, multiclass=True)[0].argmax(0)
    assert set(one[:, 1].tolist()) <= {0, 2}  # multiclass: one label per pixel


def test_targets_are_one_mask_per_present_organ_with_overlaps_kept():
    packed = torch.zeros(2, 4, 4, dtype=torch.uint8)
    packed[0, :2] = 0b001  # large bowel
    packed[0, 1:3] |= 0b100  # stomach, overlapping row 1
    masks, labels = query_targets(packed, "multilabel", GI, GI_PRIORITY)
    assert labels[0].tolist() == [0, 2] and labels[1].tolist() == []  # the second slice shows nothing
    assert (masks[0][0] * masks[0][1]).sum() == 4 and masks[1].shape == (0, 4, 4)
    masks, labels = query_targets(packed, "multiclass", GI, GI_PRIORITY)
    assert labels[0].tolist() == [0, 1, 3]  # background, large bowel, stomach (stomach wins the overlap)
    assert (masks[0].sum(0) == 1).all()


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_head_is_replaced_and_the_matched_loss_trains_every_used_weight(tiny_mask2former, task):
    torch.manual_seed(0)
    loaded = load_model(str(tiny_mask2former), task, GI)
    assert loaded.family == "mask2former"
    assert any(r.startswith("class_predictor.weight: (151, 32) -> ") for r in loaded.reinitialised)
    model = SegmentationModel(loaded.model)
    frozen = freeze_unused_parameters(model)
    assert frozen == ["hf.model.pixel_level_module.encoder.swin.layernorm.weight",
                      "hf.model.pixel_level_module.encoder.swin.layernorm.bias"]  # the Swin's last norm: unused
    packed = torch.zeros(2, 64, 64, dtype=torch.uint8)
    packed[0, 10:40, 10:40] = 0b011
    logits, loss = model(torch.randn(2, 3, 64, 64), query_targets(packed, task, GI, GI_PRIORITY))
    assert logits.shape == (2, 3 if task == "multilabel" else 4, 16, 16) and torch.isfinite(loss)
    loss.backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_mask2former_and_unext_train_through_run_train_predict_score_and_compare(demo_dir, tiny_mask2former,
                                                                                 tmp_path, capsys):
    import os
    import subprocess
    import sys

    import pandas as pd
    from transformers import Mask2FormerForUniversalSegmentation

    from giseg.commands import compare
    from conftest import ROOT
    from giseg.commands.predict import main as predict_main
    from giseg.commands.score import main as score_main
    from giseg.training.config import TrainConfig
    from giseg.training.loop import train

    runs = {"m2f": tmp_path / "m2f", "unext": tmp_path / "unext"}
    env = {**os.environ, "PYTHON": sys.executable, "FOREGROUND": "1", "EPOCHS": "1", "IMAGE_SIZE": "64",
           "DATA_DIR": str(demo_dir), "BASE_MODEL": str(tiny_mask2former), "OUTPUT_DIR": str(runs["m2f"]),
           "LOG_FILE": str(tmp_path / "m2f.log"),
           "EXTRA_ARGS": f"--num_workers 0 --n_folds 3 --cache_dir {tmp_path / 'cache'}"}
    res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:]
    train(TrainConfig(base_model="unext", data_dir=str(demo_dir), output_dir=str(runs["unext"]), image_size=64,
                      epochs=1, lr=2e-3, num_workers=0, n_folds=3, cache_dir=str(tmp_path / "cache")))
    model = Mask2FormerForUniversalSegmentation.from_pretrained(runs["m2f"] / "best")
    assert model.config.id2label == {0: "large_bowel", 1: "small_bowel", 2: "stomach"}
    for name, run in runs.items():
        sub = tmp_path / f"{name}.csv"
        assert predict_main(["--model", str(run / "best"), "--data_dir", str(demo_dir), "--out", str(sub), "--fold",
                             "0", "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0"]) == 0
        assert len(pd.read_csv(sub)) % 3 == 0
        assert score_main(["--pred", str(sub), "--data_dir", str(demo_dir)]) == 0
    capsys.readouterr()
    assert compare.main([str(runs["m2f"]), str(runs["unext"])]) == 0
    table = capsys.readouterr().out
    assert f"| m2f | {tiny_mask2former} | multilabel |" in table and "| unext | unext | multilabel | 1.47M |" in table


def test_mask2former_trains_under_two_processes(demo_dir, tiny_mask2former, tmp_path):
    """Its per-image target lists pass through DDP's forward (gloo on the CPU, as CI can run it)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "trainer.py"),
              "--base_model", str(tiny_mask2former), "--data_dir", str(demo_dir), "--output_dir", str(out),
              "--image_size", "64", "--epochs", "1", "--num_workers", "0", "--n_folds", "3", "--train_batch_size", "4",
              "--cache_dir", str(tmp_path / "cache")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(launch, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["step"] == 48 // (4 * 2)  # each rank trained half of the epoch
