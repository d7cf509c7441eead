import dataclasses
import json
import math
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from giseg.training.config import TrainConfig, build_parser, parse_config, validate_config
from giseg.training.optim import lr_factor
from giseg.training.loop import train
from giseg.data.gi import GI_CLASSES as CLASSES
from giseg.utils.errors import UserError


def _cfg(demo_dir, model, out, tmp_path, **kw) -> TrainConfig:
    base = dict(base_model=str(model), data_dir=str(demo_dir), output_dir=str(out), image_size=64, epochs=1,
                train_batch_size=8, eval_batch_size=16, lr=2e-3, num_workers=0, n_folds=3,
                cache_dir=str(tmp_path / "cache"), log_every=2)
    return TrainConfig(**{**base, **kw})


def test_one_epoch_run_writes_loadable_models_metrics_and_state(demo_dir, tiny_models, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    out = tmp_path / "run"
    last = train(_cfg(demo_dir, tiny_models["segformer"], out, tmp_path))
    for key in ("epoch", "step", "train_loss", "val_loss", "dice_mean", *(f"dice_{c}" for c in CLASSES)):
        assert key in last
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["epoch"] == 1 and records[0]["step"] > 0
    assert 0.0 <= records[0]["dice_mean"] <= 1.0
    assert json.loads((out / "run_config.json").read_text())["base_model"] == str(tiny_models["segformer"])
    assert list((out / "checkpoints").glob("step_*"))
    for tag in ("best", "last"):
        assert (out / tag / "model.safetensors").is_file()
        model = AutoModelForSemanticSegmentation.from_pretrained(out / tag)
        proc = AutoImageProcessor.from_pretrained(out / tag)
        assert proc.size == {"height": 64, "width": 64}
        with torch.no_grad():
            logits = model(pixel_values=torch.randn(1, 3, 64, 64)).logits
        assert logits.shape[1] == 3 and model.config.id2label[2] == "stomach"
    log = (out / "train.log").read_text()
    assert "re-initialised for our labels: decode_head.classifier" in log
    assert "dice large_bowel" in log and "\r" not in log
    # the lines of every step and evaluation fit 160 characters, and progress says the time spent and left (#43)
    progress = [line for line in log.splitlines() if " | train_loss " in line or " INFO eval epoch " in line]
    assert progress and max(map(len, progress)) <= 160, max(progress, key=len)
    assert re.search(r"step \d+/\d+ \| .* img/s \| elapsed \d+s, ETA \d+s$", log, flags=re.M)


def test_durations_read_as_a_person_writes_them():
    from giseg.training.meter import duration

    assert [duration(s) for s in (0, 42.4, 65, 3599, 7380)] == ["0s", "42s", "1m05s", "59m59s", "2h03m"]


def test_resume_continues_from_the_saved_step(demo_dir, tiny_models, tmp_path):
    out = tmp_path / "run"
    first = _cfg(demo_dir, tiny_models["segformer"], out, tmp_path, epochs=2, max_train_steps=3, save_every_steps=2)
    train(first)
    state = json.loads(sorted((out / "checkpoints").glob("step_*"))[-1].joinpath("trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["epoch"] == 0 and state["batches_in_epoch"] == 3
    resumed = _cfg(demo_dir, tiny_models["segformer"], out, tmp_path, epochs=2, resume_from_checkpoint="latest")
    train(resumed)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps[0] == 3 and steps == sorted(steps) and len(set(steps)) == len(steps)
    per_epoch = steps[-1] // 2
    assert steps[-1] == 2 * per_epoch and records[-1]["epoch"] == 2
    assert "resumed from" in (out / "train.log").read_text()


def test_multiclass_25d_run_with_an_auxiliary_head(demo_dir, tiny_models, tmp_path):
    from giseg.data.gi import build_index
    from giseg.data.folds import split_by_case
    from giseg.inference.segmenter import Segmenter

    cfg = _cfg(demo_dir, tiny_models["upernet"], tmp_path / "r", tmp_path, task="multiclass", context_slices=3,
               gradient_accumulation_steps=2, scheduler_name="MultiStepLR", channels_last=True, optimizer="SGD",
               threshold=0.3)
    last = train(cfg)
    assert "--threshold 0.3 is ignored: a multiclass model takes the argmax" in (tmp_path / "r" / "train.log").read_text()
    assert np.isfinite(last["val_loss"]) and np.isfinite(last["train_loss"])
    train_rows, _ = split_by_case(build_index(demo_dir), cfg.fold, cfg.n_folds)
    batches = len(train_rows) // cfg.train_batch_size  # drop_last
    assert last["step"] == math.ceil(batches / 2)  # accumulation: one optimizer step per 2 batches
    assert last["lr"] == pytest.approx(cfg.lr * 0.1 ** 2)  # 1 epoch: both default milestones (epoch 0) passed
    segmenter = Segmenter.load(tmp_path / "r" / "best")
    spec = segmenter.spec
    assert (spec.task, spec.context_slices, spec.classes, spec.thresholds) == ("multiclass", 3, CLASSES, ())
    assert segmenter.model.hf.config.id2label[0] == "background" and segmenter.model.hf.config.num_labels == 4
    assert segmenter.model.hf.auxiliary_head is not None  # the aux head trained and saved with the model
    masks = segmenter.masks(torch.randn(2, 4, 8, 8), (16, 16))
    assert masks.shape == (2, 3, 16, 16) and (masks.sum(1) <= 1).all()  # argmax: one class per pixel at most


def test_output_dir_of_a_finished_run_is_not_overwritten_and_overwrite_really_starts_over(demo_dir, tiny_models,
                                                                                          tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(demo_dir, tiny_models["segformer"], out, tmp_path, epochs=2, save_total_limit=3)
    train(cfg)
    first = json.loads((out / "run_config.json").read_text())["run_id"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006", "step_00000012"]
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg)
    # the old run's later checkpoints must not outlive the new run's (they used to win 'latest' and rotation)
    train(dataclasses.replace(cfg, epochs=1, overwrite_output_dir=True))
    second = json.loads((out / "run_config.json").read_text())["run_id"]
    assert second != first
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006"]
    assert json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())["run_id"] == second
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1]
    assert "removed the previous run's run_config.json, .resumable, metrics.jsonl, train.log, best, last, " \
           "checkpoints" in (out / "train.log").read_text()


@pytest.mark.parametrize("change, message", [
    (dict(lr=0), "--lr must be > 0"), (dict(train_batch_size=0), "--train_batch_size"),
    (dict(image_size=100), "multiple of 32"), (dict(fold=5, n_folds=5), "--fold must be in"),
    (dict(threshold=1.5), "--threshold"), (dict(lr_milestones="a,b"), "--lr_milestones"),
    (dict(ema_decay=1.5), "--ema_decay must be in [0, 1)"), (dict(context_slices=4), "--context_slices must be an odd number"),
    (dict(empty_slice_fraction=1.0), "--empty_slice_fraction must be in [0, 1)"),
    (dict(fold=-1, final_eval=True), "--fold -1 trains on every case"),
    (dict(torch_compile_mode="reduce-overhead", torch_compile_backend="eager"), "takes only the default mode"),
])
def test_out_of_range_arguments_are_rejected_by_name(change, message):
    with pytest.raises(UserError, match=re.escape(message)):
        validate_config(TrainConfig(**change))


def test_unknown_optimizer_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--optimizer", "Lion"])
    assert "invalid choice" in capsys.readouterr().err


def test_help_documents_every_option_and_the_reference_flags_parse():
    text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"--{f.name} has no help text"
        assert f"--{f.name}" in text
    assert "(default: 6e-05)" in text and "{gi,lgg,hf,nnunet}" in text and "--bce_weight" in text
    from giseg.models.baselines import BASELINES

    assert all(name in text.replace("- ", "-") for name in BASELINES)  # --base_model names the CNN baselines
    cfg = parse_config(["--base_model", "m", "--train_batch_size", "4", "--weight_decay", "0.1", "--optimizer", "SGD",
                        "--scheduler_name", "poly", "--epochs", "3", "--lr", "0.01", "--bce_weight", "0.3"])
    assert (cfg.base_model, cfg.train_batch_size, cfg.weight_decay, cfg.optimizer, cfg.scheduler_name, cfg.epochs,
            cfg.lr) == ("m", 4, 0.1, "SGD", "poly", 3, 0.01)
    assert cfg.pixel_loss_weight == 0.3  # the old flag name still sets the per-pixel loss weight
    assert parse_config([]) == TrainConfig()  # the CLI's defaults are the dataclass's


def test_learning_rate_schedules():
    cfg = TrainConfig(warmup_steps=10, scheduler_name="cosine", epochs=10)
    assert lr_factor(0, 110, cfg, 11) == pytest.approx(0.1)
    assert lr_factor(10, 110, cfg, 11) == pytest.approx(1.0)
    assert lr_factor(110, 110, cfg, 11) == pytest.approx(0.0)
    ms = TrainConfig(scheduler_name="MultiStepLR", epochs=10, lr_milestones="2,5")
    assert [lr_factor(s, 100, ms, 10) for s in (19, 20, 49, 50)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert lr_factor(50, 100, TrainConfig(scheduler_name="poly"), 10) == pytest.approx(0.5)


@pytest.mark.parametrize("argv, message", [
    (["--data_dir", "/nonexistent/data"], "data_dir /nonexistent/data does not exist"),
    (["--base_model", "nvidia/segformer-b0-finetuned-ade-512-512"], "hub may be unreachable"),
    (["--image_size", "100"], "multiple of 32"),
    (["--n_folds", "40"], "validation of some folds would be empty"),
])
def test_cli_errors_are_one_line_with_exit_status_2(demo_dir, tiny_models, tmp_path, capsys, argv, message):
    from giseg.training.loop import main

    base = ["--base_model", str(tiny_models["segformer"]), "--data_dir", str(demo_dir), "--output_dir",
            str(tmp_path / "o"), "--image_size", "64", "--num_workers", "0", "--cache_dir", str(tmp_path / "c")]
    assert main(base + argv) == 2
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
    assert "Traceback" not in captured.out + captured.err


def test_unknown_scheduler_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--scheduler_name", "onecycle"])
    assert "invalid choice" in capsys.readouterr().err


def test_early_stopping_counts_evaluations_after_the_best():
    from giseg.training.optim import should_stop_early

    history = [{"step": 10}, {"step": 20}, {"step": 30}, {"step": 40}]
    assert not should_stop_early(history, best_step=40, patience=1)
    assert should_stop_early(history, best_step=30, patience=1)
    assert not should_stop_early(history, best_step=20, patience=3)
    assert should_stop_early(history, best_step=10, patience=3)
    assert not should_stop_early(history, best_step=10, patience=0)  # 0: off


def test_early_stopping_stops_a_real_run(demo_dir, tiny_models, tmp_path, monkeypatch):
    from giseg.training import loop

    dice = iter([0.5, 0.6, 0.55, 0.58, 0.9, 0.9, 0.9, 0.9])  # best at evaluation 2, then 2 worse ones

    def stub_evaluate(segmenter, loader, loss_fn, accelerator, empty_dice):
        d = next(dice)
        return {**{f"{m}_{c}": d for m in ("dice", "global_dice", "iou") for c in CLASSES}, "dice_mean": d,
                "global_dice_mean": d, "iou_mean": d, "val_loss": 1 - d, "val_slices": 1}

    monkeypatch.setattr(loop, "evaluate", stub_evaluate)
    out = tmp_path / "run"
    train(_cfg(demo_dir, tiny_models["segformer"], out, tmp_path, epochs=8, early_stopping_patience=2))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["dice_mean"] for r in records] == [0.5, 0.6, 0.55, 0.58]  # stopped after 2 evaluations past the best
    log = (out / "train.log").read_text()
    assert "early stopping: no better mean Dice than 0.6000" in log and f"step {records[1]['step']})" in log


def test_evaluate_reports_the_dice_computed_by_hand():
    """Two 4x4 slices, two classes, fixed logits: every figure of the log line, worked out by hand."""
    from accelerate import Accelerator

    from giseg.inference.spec import InferenceSpec
    from giseg.inference.segmenter import Segmenter
    from giseg.training.losses import make_loss
    from giseg.evaluation.metrics import describe
    from giseg.evaluation.validation import evaluate

    classes = ("a", "b")
    truth = torch.zeros(2, 2, 4, 4, dtype=torch.uint8)
    truth[0, 0, 0, :2] = 1  # slice 0: a = 2 px, b empty
    truth[1, 0, 1:3, 1:3] = 1  # slice 1: a = 4 px, b = 2 px
    truth[1, 1, 3, :2] = 1
    pred = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    pred[0, 0, 0, 1:4] = True  # 3 px, 1 shared: Dice 2/5, IoU 1/4; b empty on empty: Dice 1, IoU 1
    pred[1, 0, 1:3, 1:3] = True  # exact: 1, 1
    pred[1, 1, 0, :2] = True  # 2 px elsewhere: 0, 0
    logits = pred.float() * 20 - 10

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, pixel_values):
            return logits[: len(pixel_values)] + self.w, None

    spec = InferenceSpec("gi", "multilabel", classes, 32, 1, 2, (0, 0, 0), (1, 1, 1), (0.5, 0.5))
    packed = (truth[:, 0] | (truth[:, 1] << 1)).to(torch.uint8)
    batch = {"pixel_values": torch.zeros(2, 3, 4, 4), "mask": packed, "index": torch.tensor([0, 1])}
    figures = evaluate(Segmenter(Fixed(), spec), [batch], make_loss("bce_dice", "multilabel", classes), Accelerator(), "1")
    assert figures["val_slices"] == 2
    assert figures["dice_a"] == pytest.approx((0.4 + 1) / 2) and figures["dice_b"] == pytest.approx((1 + 0) / 2)
    assert figures["global_dice_a"] == pytest.approx(2 * 5 / (7 + 6)) and figures["global_dice_b"] == 0
    assert figures["iou_a"] == pytest.approx((0.25 + 1) / 2) and figures["iou_b"] == pytest.approx(0.5)
    assert describe(figures, classes) == "dice a 0.7000 b 0.5000 | mean 0.6000 | global 0.3846 | iou 0.5625"


def test_bf16_mixed_precision_run_trains_and_saves_float32_weights(demo_dir, tiny_models, tmp_path):
    """bf16 autocast (what GPU users run) through the real CLI; on CPU it takes the same Accelerate path."""
    import subprocess
    import sys

    from safetensors import safe_open

    from conftest import ROOT

    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(ROOT / "trainer.py"), "--base_model", str(tiny_models["segformer"]),
                          "--data_dir", str(demo_dir), "--output_dir", str(out), "--image_size", "64", "--epochs", "1",
                          "--max_train_steps", "4", "--log_every", "2", "--num_workers", "0", "--n_folds", "3",
                          "--cache_dir", str(tmp_path / "cache"), "--mixed_precision", "bf16"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["val_loss"]) and 0 <= record["dice_mean"] <= 1
    assert "bf16" in (out / "train.log").read_text()
    with safe_open(str(out / "best" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert {d for d in dtypes if d.is_floating_point} == {torch.float32}  # (BatchNorm counters are int64)


def test_boolean_flags_take_true_false_or_nothing():
    assert parse_config(["--final_eval"]).final_eval is True and parse_config([]).final_eval is False
    assert parse_config(["--save_last", "false"]).save_last is False and parse_config([]).save_last is True
    with pytest.raises(SystemExit):
        parse_config(["--save_last", "maybe"])


def test_save_last_false_and_one_state_keep_a_run_small_on_disk(demo_dir, tiny_models, tmp_path):
    from giseg.training.loop import main

    out = tmp_path / "run"
    assert main(["--base_model", str(tiny_models["segformer"]), "--data_dir", str(demo_dir), "--output_dir", str(out),
                 "--image_size", "64", "--epochs", "2", "--num_workers", "0", "--n_folds", "3", "--cache_dir",
                 str(tmp_path / "cache"), "--save_last", "false", "--save_total_limit", "1"]) == 0
    assert (out / "best" / "model.safetensors").is_file() and not (out / "last").exists()
    assert len(list((out / "checkpoints").glob("step_*"))) == 1


def test_the_log_names_the_settings_that_differ_from_the_defaults(demo_dir, tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(demo_dir, tiny_models["segformer"], out, tmp_path, max_train_steps=1)
    monkeypatch.setattr(sys, "argv", ["giseg", "train", "--base_model", cfg.base_model, "--data_dir", cfg.data_dir,
                                      "--output_dir", cfg.output_dir, "--cache_dir", cfg.cache_dir])
    train(cfg)
    lines = (out / "train.log").read_text().splitlines()
    settings = " ".join(line.split(": ", 1)[1] for line in lines if " settings: " in line or " settings (continued): "
                        in line)
    given = settings.split(";")[0].split(" --")
    assert {"epochs 1", "image_size 64", "max_train_steps 1"} <= {g.removeprefix("--") for g in given}
    assert "--optimizer" not in settings and "everything else is giseg train's default" in settings
    # one-off lines too (the command, the settings, the re-initialised layers) fit 160 columns: long ones continue
    # on lines that say so (the paths here are pytest's, ~60 characters each)
    assert max(map(len, lines)) <= 160, max(lines, key=len)
    assert any(" start (continued): " in line for line in lines)
    floor = next(line for line in (out / "train.log").read_text().splitlines() if "floor:" in line)
    assert "predicting nothing scores mean Dice" in floor


def test_the_training_process_keeps_no_run_length_codes_once_the_cache_holds_the_masks(demo_dir, tmp_path):
    import contextlib

    from giseg.data.registry import get_adapter
    from giseg.training.build import load_data

    class OneProcess:
        def local_main_process_first(self):
            return contextlib.nullcontext()

    adapter = get_adapter("gi")
    full = adapter.build_index(str(demo_dir))
    data = load_data(_cfg(demo_dir, "unused", tmp_path / "r", tmp_path), adapter, OneProcess())
    assert not [c for c in data.index.columns if c.startswith("rle_")] and not adapter.has_labels(data.index)
    assert data.index.equals(full.drop(columns=[f"rle_{c}" for c in CLASSES]))  # the rest unchanged, same order
    for r in data.val_rows[:5]:  # the masks come from the cache, built from the codes before they were dropped
        assert (np.asarray(data.cache.masks[r]) > 0).any() == (full.iloc[r][[f"rle_{c}" for c in CLASSES]] != "").any()


def test_a_compiled_run_saves_plain_models_and_resumes_with_or_without_compile(demo_dir, tiny_models, tmp_path):
    """--torch_compile (with EMA and gradient accumulation) compiles the model in place (torch.compile's wrapper would put "_orig_mod." in its keys):
    what the run saves stays plain, and its resumable state loads into the plain model and back. The eager backend traces the model with dynamo
    without generating kernels (the inductor's logits are pinned in tests/models/test_compile.py)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSemanticSegmentation

    compiled = dict(torch_compile=True, torch_compile_backend="eager")
    whole, split = tmp_path / "whole", tmp_path / "split"
    both = dict(scheduler_name="constant", ema_decay=0.9, gradient_accumulation_steps=2)  # (EMA, accumulation: #40)
    train(_cfg(demo_dir, tiny_models["segformer"], whole, tmp_path, epochs=2, **both))
    train(_cfg(demo_dir, tiny_models["segformer"], split, tmp_path, epochs=2, max_train_steps=3, save_every_steps=3,
               **both, **compiled))
    for tag in ("best", "last"):
        assert not [k for k in load_file(split / tag / "model.safetensors") if "_orig_mod" in k]
        AutoModelForSemanticSegmentation.from_pretrained(split / tag)
    train(_cfg(demo_dir, tiny_models["segformer"], split, tmp_path, epochs=2, resume_from_checkpoint="latest",
               **both))  # compiled, then resumed without
    a = AutoModelForSemanticSegmentation.from_pretrained(whole / "last").state_dict()
    b = AutoModelForSemanticSegmentation.from_pretrained(split / "last").state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the uncut run's weights
    train(_cfg(demo_dir, tiny_models["segformer"], split, tmp_path, epochs=3, resume_from_checkpoint="latest",
               **both, **compiled))  # plain state, resumed compiled
    log = (split / "train.log").read_text()
    assert "resumed from" in log and log.count("torch.compile: backend eager, mode default") == 2
    assert json.loads((split / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 3


def test_a_run_whose_only_checkpoint_is_refused_says_why_not_that_it_was_deleted(demo_dir, tiny_models, tmp_path):
    """The refusal named a damaged checkpoint "gone (deleted?)" (issue #38): it now says which checkpoint was
    refused and why, and only says that none is left when the folder holds none."""
    out = tmp_path / "run"
    cfg = _cfg(demo_dir, tiny_models["segformer"], out, tmp_path, max_train_steps=2, save_total_limit=1)
    train(cfg)
    (step,) = (out / "checkpoints").iterdir()
    weights = next(p for p in step.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match=f"holds a run with no usable checkpoint \\({re.escape(str(step))}: "):
        train(cfg)
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(UserError, match="holds a run with no checkpoint left"):
        train(cfg)
