import os
import re
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id fails fast instead of retrying
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]

import pytest  # noqa: E402

from giseg.models.registry import list_families  # noqa: E402  (light: no transformers)

FAMILIES = ("segformer", "upernet", "dpt", "beit")  # the semantic-segmentation hub families of tiny_models
SEGMENTERS = list_families("hub") + list_families("baseline") + list_families("volume")  # every segmenter family


def log_events(text: str) -> list[str]:
    """A log's events, one line each: the continuation lines of a long one (`... ` or `<head> (continued): `, which
    keep lines within 160 columns) joined back to the line they continue."""
    out: list[str] = []
    for line in text.splitlines():
        m = re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (?:[A-Z]+ )?(.*)$", line)
        message = m.group(1) if m else ""
        if out and message.startswith("... "):
            out[-1] += " " + message[4:]
        elif out and re.match(r"[\w -]+ \(continued\): ", message):
            out[-1] += " " + message.split("(continued): ", 1)[1]
        else:
            out.append(line)
    return out


@pytest.fixture(scope="session")
def fresh_python():
    """Fresh interpreters without torch's import each time (tests/fresh_python.py)."""
    from fresh_python import FreshPython

    helper = FreshPython()
    yield helper
    helper.close()


def base_model(family: str, tiny_models: dict, tmp_path: Path) -> str:
    """--base_model for a registered ``family``: its tiny checkpoint (a hub family: tiny_models, else made in
    ``tmp_path``; a 3D family's too) or a baseline's name."""
    from giseg.models.registry import FAMILIES as REGISTRY
    from giseg.models.tiny import make_tiny

    if REGISTRY[family].kind == "baseline":
        return family
    return str(tiny_models[family] if family in tiny_models else make_tiny(family, tmp_path / f"tiny-{family}"))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small dataset (8 slices per case-day) in the Kaggle layout, with the large organs of the "large" anatomy
    (on almost every slice: a few training steps show learning; the demo itself has the real data's sizes)."""
    from giseg.data.demo import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", slices_per_day=8, anatomy="large")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint with 150 labels per family, saved with save_pretrained."""
    from giseg.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("models")
    return {f: make_tiny(f, root / f"tiny-{f}") for f in FAMILIES}


@pytest.fixture(scope="session")
def tracked_run(demo_dir, tiny_models, tmp_path_factory) -> Path:
    """Two epochs with TensorBoard tracking, --final_eval and --push_to_hub with the Hub offline (as here)."""
    from giseg.training.config import TrainConfig
    from giseg.training.loop import train

    root = tmp_path_factory.mktemp("tracked")
    train(TrainConfig(base_model=str(tiny_models["segformer"]), data_dir=str(demo_dir), output_dir=str(root / "run"),
                      image_size=64, epochs=2, train_batch_size=8, lr=2e-3, num_workers=0, n_folds=3,
                      cache_dir=str(root / "cache"), report_to="tensorboard", final_eval=True, push_to_hub=True,
                      hub_model_id="me/gi-test"))
    return root / "run"


# the arguments of the distributed runs that are compared with each other (tests/test_multinode.py)
DDP_ARGS = ("--image_size", "96", "--train_batch_size", "4", "--lr", "2e-3", "--num_workers", "0", "--n_folds", "3",
            "--log_every", "1", "--epochs", "2", "--eval_batch_size", "5")
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
gpu_ids: all
main_process_ip: 127.0.0.1
main_process_port: {port}
mixed_precision: 'no'
dynamo_config: {{}}
rdzv_backend: static
same_network: true
use_cpu: false
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_env(**extra) -> dict:
    """The environment of a multi-process CPU run: no ACCELERATE_USE_CPU (the trainer finds there is no GPU)."""
    return {**{k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}, "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1", **extra}


@pytest.fixture(scope="session")
def two_process_run(demo_dir, tiny_models, tmp_path_factory):
    """One machine, two processes, started as `accelerate config` users do: `accelerate launch --config_file`
    with a two-process multi-GPU yaml (on this machine without GPUs); the rows each rank trained on traced."""
    import subprocess
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("two_process")
    config = root / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG.format(port=free_port()))
    out, trace = root / "run", root / "trace"
    trace.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(ROOT / "trainer.py"),
           "--base_model", str(tiny_models["upernet"]), "--data_dir", str(demo_dir), "--output_dir", str(out),
           "--cache_dir", str(root / "cache"), "--trace_rows", str(trace), *DDP_ARGS]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT, env=distributed_env())
    return SimpleNamespace(result=res, out=out, trace=trace)


@pytest.fixture(scope="session")
def saved_model(tiny_models, tmp_path_factory):
    """A folder as the trainer writes it (weights, image processor, spec), with no training."""
    from giseg.data.gi import GI_CLASSES
    from giseg.inference.spec import InferenceSpec
    from giseg.models.load import load_model, save_model

    loaded = load_model(str(tiny_models["segformer"]), "multilabel", GI_CLASSES)
    spec = InferenceSpec(dataset="gi", task="multilabel", classes=GI_CLASSES, image_size=64, context_slices=1,
                         context_stride=2, mean=loaded.mean, std=loaded.std, thresholds=(0.5,) * 3)
    out = tmp_path_factory.mktemp("safe") / "model"
    old = os.umask(0o022)
    try:
        save_model(loaded.model, out, spec)
    finally:
        os.umask(old)
    return out
