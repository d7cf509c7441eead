"""--report_to: Accelerate's trackers get the figures of metrics.jsonl (read back with TensorBoard's own reader)."""
import json

import pytest

from giseg.utils.errors import UserError


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_the_per_class_dice_series_of_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _records(tracked_run)
    assert len(records) == 2
    folders = {p.parent for p in (tracked_run / "trackers").rglob("events.out.tfevents.*")}
    scalars = {}
    for folder in folders:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for key in ("dice_large_bowel", "dice_small_bowel", "dice_stomach", "dice_mean", "train_loss", "val_loss", "lr",
                "images_per_s"):
        assert [s for s, _ in scalars[key]] == [r["step"] for r in records], key
        assert [v for _, v in scalars[key]] == pytest.approx([r[key] for r in records], rel=1e-6), key
    hparams = next((tracked_run / "trackers").rglob("hparams.yml")).read_text()
    assert "report_to: tensorboard" in hparams and "image_size: 64" in hparams


def test_report_to_none_is_the_default_and_starts_no_tracker(demo_dir, tiny_models, tmp_path):
    from giseg.training.config import TrainConfig
    from giseg.training.loop import train

    assert TrainConfig().report_to == "none"
    train(TrainConfig(base_model=str(tiny_models["segformer"]), data_dir=str(demo_dir), output_dir=str(tmp_path / "r"),
                      image_size=64, epochs=1, max_train_steps=1, num_workers=0, n_folds=3,
                      cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "r" / "trackers").exists()


def test_a_tracker_that_is_not_installed_or_unknown_is_refused_naming_what_to_install(monkeypatch):
    from giseg.training import tracking
    from giseg.training.config import TrainConfig, validate_config

    monkeypatch.setattr(tracking, "installed", lambda name: name == "tensorboard")
    with pytest.raises(UserError, match="--report_to mlflow: the package is not installed; pip install mlflow"):
        validate_config(TrainConfig(report_to="mlflow"))
    with pytest.raises(UserError, match="unknown tracker 'neptune'"):
        validate_config(TrainConfig(report_to="tensorboard,neptune"))
    assert tracking.parse_report_to("all") == ["tensorboard"]  # every installed one
    monkeypatch.setattr(tracking, "installed", lambda name: False)
    with pytest.raises(UserError, match="no tracker is installed"):
        tracking.parse_report_to("all")
