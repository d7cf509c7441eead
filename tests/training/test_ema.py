import json

import pytest
import torch
from safetensors.torch import load_file

from giseg.training.ema import WeightEMA
from giseg.training.config import TrainConfig
from trainer import train


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
