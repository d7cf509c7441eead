import json
import os

import nbformat
import numpy as np
import pytest

from giseg.commands.figures import main as figures_main
from giseg.evaluation import figures as vis
from conftest import ROOT
from giseg.data.registry import DATASETS
from giseg.data.gi import build_index
from giseg.training.config import TrainConfig
from giseg.training.loop import train


@pytest.fixture(scope="module")
def run_dir(demo_dir, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("vis")
    cfg = TrainConfig(base_model=str(tiny_models["segformer"]), data_dir=str(demo_dir), output_dir=str(out / "run"),
                      image_size=64, epochs=2, lr=2e-3, num_workers=0, n_folds=3, cache_dir=str(out / "cache"))
    train(cfg)
    return out / "run"


def test_overlay_puts_each_organ_colour_on_its_pixels():
    image = np.full((4, 4), 0.5, np.float32)
    masks = np.zeros((3, 4, 4), bool)
    masks[0, 0, 0] = masks[1, 1, 1] = masks[2, 2, 2] = True
    rgb = vis.overlay(image, masks, vis.class_colours(DATASETS["gi"]))
    assert rgb[0, 0].argmax() == 0 and rgb[1, 1].argmax() == 1 and rgb[2, 2].argmax() == 2  # red, green, blue
    assert np.allclose(rgb[3, 3], 0.5)  # no organ: untouched gray


def test_class_frequency_counts_slices_with_each_organ(demo_dir):
    index = build_index(demo_dir)
    freq = vis.class_frequency(DATASETS["gi"], index)
    assert freq["slices"].sum() == len(index)
    assert freq.loc[7, "stomach"] == (index[index["case"] == 7]["rle_stomach"] != "").sum()


def test_training_curves_mark_the_best_epoch(run_dir, tmp_path):
    m = vis.load_metrics(run_dir)
    assert list(m["epoch"]) == [1, 2]
    written = tmp_path / "run"
    written.mkdir()
    (written / "run_config.json").write_text((run_dir / "run_config.json").read_text())
    records = [{**m.iloc[0].to_dict(), "epoch": e, "dice_mean": d} for e, d in [(1, 0.4), (2, 0.7), (3, 0.6)]]
    (written / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert vis.best_epoch(vis.load_metrics(written)) == 2  # the highest mean Dice, not the last epoch
    fig = vis.plot_training(written)
    marked = {tuple(line.get_xdata()) for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == ":"}
    assert marked == {(2, 2)}  # every panel marks epoch 2


def test_confusion_rows_are_fractions_of_each_true_organ(run_dir):
    pred = vis.predict_validation(run_dir)
    conf = vis.confusion(pred)
    assert conf.shape == (3, 4) and ((conf.to_numpy() >= 0) & (conf.to_numpy() <= 1)).all()
    # the prediction of the truth itself: the diagonal is 1 and nothing is missed
    gi = DATASETS["gi"]
    perfect = vis.Predictions(pred.index, {r.id: gi.read_masks(r).astype(bool) for r in pred.index.itertuples()},
                              pred.scores, pred.task, gi)
    np.testing.assert_allclose(np.diag(vis.confusion(perfect).to_numpy()[:, :3]), 1.0)
    assert (vis.confusion(perfect)["pred none"] == 0).all()
    table = vis.per_case_table(pred)
    assert set(table.index) == set(pred.scores["case"]) and "dice_mean" in table


def test_cli_writes_every_figure_as_png(run_dir, tmp_path):
    paths = vis.save_all(run_dir, tmp_path / "figs")
    names = {p.stem for p in paths}
    assert {"class_frequency", "size_mix", "slice_strip", "augmentation", "training", "predictions",
            "confusion"} <= names
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(ROOT / "visualisation.ipynb", as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


def test_the_notebooks_text_names_only_commands_and_files_that_exist():
    """Its first cell told users to run `visualise.py`, gone since the package move (issue #43)."""
    import re

    from giseg.commands import COMMANDS

    nb = nbformat.read(ROOT / "visualisation.ipynb", as_version=4)
    text = " ".join(c.source for c in nb.cells if c.cell_type == "markdown")
    commands = re.findall(r"`giseg ([a-z-]+)", text)
    files = re.findall(r"`([\w/.-]+\.(?:py|sh|ipynb))`", text)
    assert commands and files
    assert [c for c in commands if c not in COMMANDS] == []
    assert [f for f in files if not (ROOT / f).is_file()] == []


def test_notebook_runs_headlessly_against_a_run_and_draws_every_figure(run_dir):
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "visualisation.ipynb", as_version=4)
    os.environ["RUN_DIR"] = str(run_dir)
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["RUN_DIR"]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not [o.text for c in code for o in c.outputs if o.get("name") == "stderr"]  # no warnings (TqdmWarning)
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert images >= 9  # frequency, sizes, strip, augmentation, training, predictions, best/worst, confusion
    tables = [o for c in code for o in c.outputs if "text/html" in o.get("data", {})]
    assert len(tables) >= 3  # class frequency, per-case scores, confusion


def test_multiclass_run_predictions_have_organ_channels(demo_dir, tiny_models, tmp_path):
    cfg = TrainConfig(base_model=str(tiny_models["upernet"]), data_dir=str(demo_dir), output_dir=str(tmp_path / "r"),
                      image_size=64, epochs=1, num_workers=0, n_folds=3, cache_dir=str(tmp_path / "c"),
                      task="multiclass", context_slices=3)
    train(cfg)
    pred = vis.predict_validation(tmp_path / "r", max_slices=6)
    assert pred.task == "multiclass" and len(pred.masks) == 6
    for m in pred.masks.values():
        assert m.shape[0] == 3 and (m.sum(0) <= 1).all()  # softmax: at most one organ per pixel


def test_a_folder_that_is_no_run_or_has_no_best_model_is_one_line(run_dir, tmp_path, capsys):
    assert figures_main(["--run_dir", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    assert "is not a run folder (no run_config.json)" in capsys.readouterr().err
    early = tmp_path / "early"
    early.mkdir()
    (early / "run_config.json").write_text((run_dir / "run_config.json").read_text())  # started, not yet evaluated
    assert figures_main(["--run_dir", str(early), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "has no best/ model yet" in err and "Traceback" not in err
