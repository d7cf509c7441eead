import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id fails fast instead of retrying
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

FAMILIES = ("segformer", "upernet", "dpt", "beit")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small demo dataset (8 slices per case-day) in the Kaggle layout."""
    from demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", slices_per_day=8)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint with 150 labels per family, saved with save_pretrained."""
    from model import make_tiny

    root = tmp_path_factory.mktemp("models")
    return {f: make_tiny(f, root / f"tiny-{f}") for f in FAMILIES}


@pytest.fixture(scope="session")
def tracked_run(demo_dir, tiny_models, tmp_path_factory) -> Path:
    """Two epochs with TensorBoard tracking, --final_eval and --push_to_hub with the Hub offline (as here)."""
    from trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("tracked")
    train(TrainConfig(base_model=str(tiny_models["segformer"]), data_dir=str(demo_dir), output_dir=str(root / "run"),
                      image_size=64, epochs=2, train_batch_size=8, lr=2e-3, num_workers=0, n_folds=3,
                      cache_dir=str(root / "cache"), report_to="tensorboard", final_eval=True, push_to_hub=True,
                      hub_model_id="me/gi-test"))
    return root / "run"
