"""Contracts across the toolkit (issue #38): every registered family (models/registry.py) trains a tiny run, and
every command that reads a model folder works on what that run saved.

Each family's commands run in a fresh interpreter, one per family, as users run them: a family that another test
registered with the Auto classes in this process would hide a loader that forgets to (a trained U-Net was refused
by predict, tune, export-onnx and figures that way). The runs are shared by the tests (a module fixture) and tiny
(32 px, two steps). In CI every family goes through the loaders (predict, score, the app, the notebook, the model
card's snippet) and one hub family, one baseline and one 3D family through every command; the other families' remaining
commands and the ONNX export of every trained family are the nightly part (GISEG_NIGHTLY=1;
tests/inference/test_onnx.py exports every family's untrained folder in CI).
"""
import json
import os
import subprocess

import pytest

from conftest import SEGMENTERS, base_model

pytestmark = pytest.mark.slow  # (bash run_tests.sh -m "not slow": the quick part)

NIGHTLY = pytest.mark.skipif(os.environ.get("GISEG_NIGHTLY") != "1",
                             reason="nightly: GISEG_NIGHTLY=1 python -m pytest tests/test_contracts.py")
# every command that reads a trained segmenter's folder, as run by the driver below ({best}, {run}, {data}, {out}):
# LOADERS first, then the rest
LOADERS = (
    ["predict", "--model", "{best}", "--data_dir", "{data}", "--fold", "0", "--out", "{out}/val.csv",
     "--num_workers", "0"],
    ["score", "--pred", "{out}/val.csv", "--data_dir", "{data}", "--json", "{out}/scores.json"],
)
READERS = LOADERS + (
    ["tune", "--model", "{best}", "--data_dir", "{data}", "--out", "{out}/tuned.json", "--search", "thresholds",
     "--num_workers", "0"],
    ["predict", "--model", "{best}", "--data_dir", "{data}", "--fold", "0", "--tuned", "{out}/tuned.json", "--out",
     "{out}/tuned.csv", "--num_workers", "0"],
    ["figures", "--run_dir", "{run}", "--out", "{out}/figures", "--max_slices", "4"],
    ["compare", "{run}"],
)
# what the app and the notebook load a model with, and the model card's snippet, in the same interpreter
DRIVER = """
import json, re, subprocess, sys
from giseg.cli import main
fill = json.loads(sys.argv[1])
for argv in json.loads(sys.argv[2]):
    argv = [a.format(**fill) for a in argv]
    code = main(argv)
    print("STEP", argv[0], code, flush=True)
    if code:
        sys.exit(code)
from giseg.commands.app import Analyser
analyser = Analyser(fill["best"], fill["data"])
print("STEP app", analyser.analyse_id(analyser.slice_ids()[0]).masks.shape, flush=True)
from giseg.evaluation import figures
print("STEP notebook", len(figures.predict_validation(fill["run"], max_slices=2).masks), flush=True)
card = open(fill["best"] + "/README.md").read()
code = re.search(r"```python\\n(.*?)```", card, re.S).group(1)
exec(code, {})
print("STEP card 0", flush=True)
"""


@pytest.fixture(scope="module")
def trained(demo_dir, tiny_models, tmp_path_factory) -> dict:
    """A tiny run per registered segmenter family: two steps at 32 px (or the family's min_size), best/ with its
    card."""
    from giseg.training.config import TrainConfig
    from giseg.training.loop import train

    from giseg.models.registry import FAMILIES

    root = tmp_path_factory.mktemp("contracts")
    runs = {}
    for family in SEGMENTERS:
        out = root / family
        size = max(32, FAMILIES[family].min_size)  # (the registry's: Mask2Former needs 64)
        train(TrainConfig(base_model=base_model(family, tiny_models, root), data_dir=str(demo_dir),
                          output_dir=str(out), image_size=size, epochs=1, max_train_steps=2, train_batch_size=4,
                          eval_batch_size=16, lr=1e-3, num_workers=0, n_folds=3, cache_dir=str(root / "cache")))
        runs[family] = out
    return runs


def _drive(fresh_python, run, data, out, steps) -> subprocess.CompletedProcess:
    """The DRIVER in a fresh interpreter (tests/fresh_python.py: none of our modules imported beforehand)."""
    fill = {"best": str(run / "best"), "run": str(run), "data": str(data), "out": str(out)}
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return fresh_python.run(DRIVER, [json.dumps(fill), json.dumps(steps)], cwd=out, env=env, timeout=600)


def _steps_ran(res, steps) -> None:
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    ran = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("STEP ")]
    assert ran == [argv[0] for argv in steps] + ["app", "notebook", "card"], res.stdout[-2000:]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("family", SEGMENTERS)
def test_a_trained_family_loads_in_predict_score_the_app_the_notebook_and_its_card(family, trained, demo_dir,
                                                                                   tmp_path, fresh_python):
    _steps_ran(_drive(fresh_python, trained[family], demo_dir, tmp_path, LOADERS), LOADERS)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert 0 <= scores["dice_mean"] <= 1 and 0 <= scores["score"] <= 1


@pytest.mark.parametrize("family", [f if f in ("segformer", "unet", "segresnet3d") else pytest.param(f, marks=NIGHTLY)
                                    for f in SEGMENTERS])
def test_a_trained_family_goes_through_every_command_that_reads_a_model(family, trained, demo_dir, tmp_path,
                                                                         fresh_python):
    _steps_ran(_drive(fresh_python, trained[family], demo_dir, tmp_path, READERS), READERS)
    assert (tmp_path / "val.csv").read_text().count("\n") == (tmp_path / "tuned.csv").read_text().count("\n")
    assert any(p.suffix == ".png" for p in (tmp_path / "figures").iterdir())


@NIGHTLY
@pytest.mark.parametrize("family", SEGMENTERS)
def test_a_trained_family_exports_to_onnx_and_predicts_the_same_masks_with_onnxruntime(family, trained, demo_dir, fresh_python,
                                                                                      tmp_path):
    steps = [["export-onnx", "--model", "{best}", "--out", "{out}/deploy"],
             ["predict", "--model", "{best}", "--data_dir", "{data}", "--fold", "0", "--out", "{out}/eager.csv",
              "--num_workers", "0"],
             ["predict", "--model", "{out}/deploy", "--data_dir", "{data}", "--fold", "0", "--out", "{out}/onnx.csv",
              "--backend", "onnxruntime", "--num_workers", "0"]]
    res = _drive(fresh_python, trained[family], demo_dir, tmp_path, steps)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (tmp_path / "eager.csv").read_text() == (tmp_path / "onnx.csv").read_text()
