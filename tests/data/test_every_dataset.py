"""Every registered dataset (giseg/data/registry.py ADAPTERS, not a hand-made list) goes the whole way on its own
demo: giseg demo-data's folder, the index, a 2-step training run at 32 px of a 2D and (nightly) of a 3D model (its
volumes: the adapter's volume_columns), predict and score. A new dataset module and its registry line are covered
with no new test."""
import json
import os

import pandas as pd
import pytest

from giseg.data.registry import ADAPTERS, DATASETS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_volume(tmp_path_factory):
    from giseg.models.tiny import make_tiny

    return make_tiny("segresnet3d", tmp_path_factory.mktemp("tiny3d") / "tiny-segresnet3d")


NIGHTLY = pytest.mark.skipif(os.environ.get("GISEG_NIGHTLY") != "1",
                             reason="nightly: GISEG_NIGHTLY=1 python -m pytest tests/data/test_every_dataset.py")


# a 3D model on every dataset is the nightly part (CI: tests/test_run_train.py trains one on the nnU-Net demo through
# run_train.sh, tests/models/test_volume.py on the GI demo)
@pytest.mark.parametrize("model", ["segformer", pytest.param("segresnet3d", marks=NIGHTLY)])
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_a_registered_dataset_trains_predicts_and_scores_on_its_demo(name, model, tiny_models, tiny_volume, tmp_path):
    from giseg.commands.predict import main as predict_main
    from giseg.commands.score import main as score_main
    from giseg.training.loop import main as train_main

    if name == "hf":
        pytest.importorskip("datasets", reason="--dataset hf needs the [hf] extra (part of the dev install)")
    if name == "nnunet":
        pytest.importorskip("nibabel", reason="--dataset nnunet needs the [medical] extra (part of the dev install)")
    data = DATASETS[name].make_demo(tmp_path / "data")
    adapter = DATASETS[name].bind(data, {})
    index = adapter.build_index(data)
    assert len(index) and index["id"].is_unique and {"case", "slice", "width", "height"} <= set(index)
    run, cache = tmp_path / "run", tmp_path / "cache"
    base = str(tiny_volume if model == "segresnet3d" else tiny_models[model])
    assert train_main(["--dataset", name, "--data_dir", str(data), "--base_model", base,
                       "--output_dir", str(run), "--image_size", "32", "--epochs", "1", "--max_train_steps", "2",
                       "--train_batch_size", "4", "--eval_batch_size", "32", "--n_folds", "2", "--num_workers", "0",
                       "--cache_dir", str(cache)]) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {f"dice_{c}" for c in adapter.classes} <= set(record)
    sub = tmp_path / "sub.csv"
    assert predict_main(["--model", str(run / "best"), "--data_dir", str(data), "--out", str(sub), "--cache_dir",
                         str(cache), "--num_workers", "0"]) == 0
    rows = pd.read_csv(sub, dtype=str, keep_default_na=False)
    assert set(rows["class"]) == set(adapter.classes)
    assert score_main(["--pred", str(sub), "--data_dir", str(data), "--dataset", name, "--json",
                       str(tmp_path / "score.json")]) == 0
    assert 0 <= json.loads((tmp_path / "score.json").read_text())["score"] <= 1
