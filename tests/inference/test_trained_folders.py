"""Every CNN baseline, saved as the trainer saves it, loads through the one loader of trained folders
(segmenter.load_trained) in a fresh interpreter: a U-Net trained by trainer.py was refused by giseg predict, tune,
export-onnx and figures ("Transformers does not recognize this architecture") because that loader no longer
imported the module that registers our families with the Auto classes. In one pytest process another test has
always imported it already, so the check runs in a new process, as the commands do."""
import subprocess
import sys

import pytest

from conftest import ROOT
from giseg.models.baselines import BASELINES

GI = ("large_bowel", "small_bowel", "stomach")
LOAD = """
import sys
from pathlib import Path
from giseg.inference.segmenter import load_trained
for folder, presence in zip(sys.argv[1::2], sys.argv[2::2]):
    model, spec = load_trained(Path(folder), "--model", False, presence == "1")
    print(type(model.hf).__name__, spec.task)
"""


def _saved(base: str, task: str, out):
    from giseg.inference.spec import InferenceSpec
    from giseg.models.load import load_model, save_model

    loaded = load_model(base, task, GI)
    spec = InferenceSpec(dataset="gi", task=task, classes=GI, image_size=32, context_slices=1, context_stride=2,
                         mean=loaded.mean, std=loaded.std, thresholds=(0.5,) * 3)
    save_model(loaded.model, out, spec)
    return out


@pytest.fixture(scope="module")
def saved_baselines(tmp_path_factory):
    """Each baseline as a segmenter, and each one with an encoder classifier as a slice classifier (--task
    presence), with no training: (folder, presence) pairs."""
    root = tmp_path_factory.mktemp("baselines")
    folders = [(_saved(name, "multilabel", root / name), False) for name in sorted(BASELINES)]
    folders += [(_saved(name, "presence", root / f"{name}-presence"), True)
                for name in sorted(BASELINES) if BASELINES[name] != "unext"]
    return folders


def test_every_baseline_folder_loads_through_load_trained_in_a_fresh_process(saved_baselines):
    args = [a for folder, presence in saved_baselines for a in (str(folder), "1" if presence else "0")]
    res = subprocess.run([sys.executable, "-c", LOAD, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert len(lines) == len(saved_baselines)
    for line, (folder, presence) in zip(lines, saved_baselines):
        assert line.endswith("presence" if presence else "multilabel"), (folder, line)
