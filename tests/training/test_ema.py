import json

import pytest
import torch
from safetensors.torch import load_file

from giseg.training.ema import WeightEMA
from giseg.training.config import TrainConfig
from giseg.training.loop import train


def test_ema_after_k_steps_equals_the_closed_form_on_a_toy_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    decay, k = 0.9, 5
    weights = [model[0].weight.detach().clone()]
    ema = WeightEMA(model, decay)
    for _ in range(k):
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight))
            model[1].running_mean.add_(1.0)
        weights.append(model[0].weight.detach().clone())
        ema.update(model)
    # the decay warms up: the t-th update (t = 0, 1 ...) uses min(decay, (1 + t) / (10 + t))
    expected = weights[0]
    for t in range(k):
        d = min(decay, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * weights[t + 1]
    assert [round(min(decay, (1 + t) / (10 + t)), 4) for t in range(k)] == [0.1, 0.1818, 0.25, 0.3077, 0.3571]
    assert torch.allclose(ema.model[0].weight, expected, atol=1e-6)
    assert not torch.allclose(ema.model[0].weight, model[0].weight)
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)  # buffers follow the model
    assert ema.steps == k and not any(p.requires_grad for p in ema.model.parameters())


def test_ema_survives_a_save_and_load_through_safetensors(tmp_path):
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, 0.5)
    with torch.no_grad():
        model.weight.mul_(3)
    ema.update(model)
    ema.save(tmp_path / "ema.safetensors")
    other = WeightEMA(torch.nn.Linear(3, 2), 0.5)
    other.load(tmp_path / "ema.safetensors")
    assert torch.equal(other.model.weight, ema.model.weight) and other.steps == 1


def _cfg(demo_dir, model, out, tmp_path, **kw):
    return TrainConfig(**{**dict(base_model=str(model), data_dir=str(demo_dir), output_dir=str(out), image_size=64,
                                 epochs=2, train_batch_size=8, lr=2e-3, num_workers=0, n_folds=3, log_every=2,
                                 cache_dir=str(tmp_path / "cache"), ema_decay=0.9, scheduler_name="constant"), **kw})


def test_a_run_with_ema_saves_and_evaluates_the_average_and_resumes_it_exactly(demo_dir, tiny_models, tmp_path):
    from transformers import AutoModelForSemanticSegmentation

    whole = tmp_path / "whole"
    train(_cfg(demo_dir, tiny_models["segformer"], whole, tmp_path))
    last_state = sorted((whole / "checkpoints").glob("step_*"))[-1]
    ema = load_file(last_state / "ema.safetensors")
    raw = load_file(last_state / "model.safetensors")
    saved = AutoModelForSemanticSegmentation.from_pretrained(whole / "last").state_dict()
    assert set(saved) == {k.removeprefix("hf.") for k in ema}
    assert all(torch.equal(saved[k.removeprefix("hf.")], v) for k, v in ema.items())  # last/ is the average
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k in raw)  # ... not the trained weights
    assert "EMA of the weights: decay 0.9" in (whole / "train.log").read_text()

    split = tmp_path / "split"  # stopped mid-run, then resumed: the same average, bit for bit
    train(_cfg(demo_dir, tiny_models["segformer"], split, tmp_path, max_train_steps=8, save_every_steps=4))
    train(_cfg(demo_dir, tiny_models["segformer"], split, tmp_path, resume_from_checkpoint="latest"))
    resumed = AutoModelForSemanticSegmentation.from_pretrained(split / "last").state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in saved.items())
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    at = {r["step"]: r["dice_mean"] for r in rows}  # (plus the evaluation where the first part stopped)
    assert [at[r["step"]] for r in first] == pytest.approx([r["dice_mean"] for r in first], abs=1e-9)


def test_a_short_run_with_a_long_decay_is_not_worse_than_predicting_nothing_and_says_so(demo_dir, tiny_models,
                                                                                         tmp_path):
    """38 steps at --ema_decay 0.999: without the decay's warm-up the average kept 0.999**38 = 96 % of the random
    initial weights and scored far below the floor; now it follows the trained weights, and the log warns."""
    out = tmp_path / "short"
    last = train(_cfg(demo_dir, tiny_models["segformer"], out, tmp_path, ema_decay=0.999, max_train_steps=38,
                      epochs=10, scheduler_name="cosine"))
    log = (out / "train.log").read_text()
    floor = float(log.split("predicting nothing scores mean Dice ")[1].split()[0])
    assert last["step"] == 38 and last["dice_mean"] >= floor - 5e-5, (last["dice_mean"], floor)  # (log: 4 digits)
    assert "--ema_decay 0.999 averages over about 1000 steps, but this run has 38" in log


def test_swa_follows_the_weights_until_its_first_epoch_then_is_their_equal_average(tmp_path):
    from giseg.training.ema import WeightSWA

    model = torch.nn.Linear(3, 2)
    swa = WeightSWA(model, start_epoch=2)
    snapshots = []
    for epoch in (1, 2, 3):
        with torch.no_grad():
            model.weight.add_(float(epoch))
        swa.update(model)
        if epoch == 1:
            assert torch.equal(swa.model.weight, model.weight)  # before the first snapshot: the model itself
        assert swa.end_epoch(model, epoch) == (epoch >= 2)
        if epoch >= 2:
            snapshots.append(model.weight.detach().clone())
    assert swa.averaged == 2 and torch.allclose(swa.model.weight, (snapshots[0] + snapshots[1]) / 2)
    swa.save(tmp_path / "swa.safetensors")
    other = WeightSWA(torch.nn.Linear(3, 2), start_epoch=2)
    other.load(tmp_path / "swa.safetensors")
    assert other.averaged == 2 and other.steps == 3 and torch.equal(other.model.weight, swa.model.weight)


def test_batchnorm_statistics_are_recomputed_over_every_batch_of_the_loader():
    from giseg.training.ema import recompute_batchnorm

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1)).eval()
    torch.nn.init.ones_(model[0].weight)
    data = [torch.full((2, 1, 2, 2), float(v)) for v in (1.0, 3.0, 8.0)]
    assert recompute_batchnorm(model, [{"pixel_values": d} for d in data], "cpu") == 6
    assert model[1].running_mean.item() == pytest.approx(4.0)  # the mean of the three batch means
    assert not model[1].training and model[1].momentum == 0.1
    dropout = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.BatchNorm2d(1)).train()  # as an evaluation leaves it
    recompute_batchnorm(dropout, [{"pixel_values": d} for d in data], "cpu")
    assert dropout[1].running_mean.item() == pytest.approx(4.0) and dropout.training  # no dropout; mode restored


def test_a_run_with_swa_evaluates_and_saves_the_average_of_its_last_epochs_and_resumes_it_exactly(
        demo_dir, tiny_models, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSemanticSegmentation

    whole = tmp_path / "whole"
    swa = dict(ema_decay=0.0, swa_start_epoch=2, epochs=3, save_total_limit=10)
    train(_cfg(demo_dir, tiny_models["segformer"], whole, tmp_path, **swa))
    states = sorted((whole / "checkpoints").glob("step_*"))
    raw = [load_file(s / "model.safetensors") for s in states[-2:]]  # the weights at the ends of epochs 2 and 3
    average = load_file(states[-1] / "swa.safetensors")
    weights = [k for k in average if "running" not in k and "num_batches" not in k and k in raw[0]]
    assert weights and all(torch.allclose(average[k], (raw[0][k] + raw[1][k]) / 2, atol=1e-6) for k in weights)
    saved = AutoModelForSemanticSegmentation.from_pretrained(whole / "last").state_dict()
    assert all(torch.equal(saved[k.removeprefix("hf.")], v) for k, v in average.items())  # last/ is the average
    log = (whole / "train.log").read_text()
    assert "SWA: epoch 3 joined the average (2 epochs averaged); BatchNorm statistics recomputed on" in log

    split = tmp_path / "split"  # stopped inside epoch 3, then resumed: the same average, bit for bit
    train(_cfg(demo_dir, tiny_models["segformer"], split, tmp_path, **swa, max_train_steps=14, save_every_steps=14))
    train(_cfg(demo_dir, tiny_models["segformer"], split, tmp_path, **swa, resume_from_checkpoint="latest"))
    resumed = AutoModelForSemanticSegmentation.from_pretrained(split / "last").state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in saved.items())


def test_swa_flags_out_of_range_or_with_ema_are_refused():
    from giseg.training.config import validate_config
    from giseg.utils.errors import UserError

    with pytest.raises(UserError, match=r"--swa_start_epoch must be in \[1, --epochs 14\] \(0: off\), got 20"):
        validate_config(TrainConfig(epochs=14, swa_start_epoch=20))
    with pytest.raises(UserError, match="two averages of the weights: choose one"):
        validate_config(TrainConfig(swa_start_epoch=2, ema_decay=0.9))
