import os
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from giseg.data.gi import GI_CLASSES
from giseg.evaluation.metrics import mask_stats, summarise


@pytest.mark.parametrize("rule", ["1", "skip"])
def test_evaluate_module_loads_offline_and_agrees_with_metrics(rule):
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import evaluate

    module = evaluate.load(str(ROOT / "giseg" / "evaluation" / "gi_dice"))
    rng = np.random.default_rng(1)
    preds = (rng.random((5, 3, 7, 9)) < 0.3).astype(np.uint8)
    refs = (rng.random((5, 3, 7, 9)) < 0.3).astype(np.uint8)
    preds[0] = refs[0] = 0  # an empty/empty slice, where the rule matters
    got = module.compute(predictions=list(preds), references=list(refs), empty_dice=rule)
    want = summarise(mask_stats(torch.tensor(preds), torch.tensor(refs)), rule, GI_CLASSES)
    for key in ("dice_large_bowel", "dice_small_bowel", "dice_stomach", "dice_mean", "global_dice_mean"):
        assert got[key] == pytest.approx(want[key])


def test_training_path_never_imports_evaluate():
    import subprocess
    import sys

    code = ("import sys, trainer, model; import giseg.evaluation.metrics, giseg.commands.predict, giseg.commands.score, "
            "giseg.data.dataset; print('evaluate' in sys.modules)")
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False", time.monotonic() - t
