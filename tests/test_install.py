"""A non-editable install: the wheel of this checkout, installed apart from it, trains and cross-validates from a
folder outside the checkout (giseg cv starts `python -m giseg train`, not a path into the checkout)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(cmd, cwd, env, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_the_built_wheel_trains_and_cross_validates_outside_the_checkout(tmp_path):
    dist, site, work = tmp_path / "dist", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    # the wheel as `pip install .` builds it (no network: the build backend is the one installed here), from a copy
    # of what the package is made of, so that the build's build/ and egg-info stay out of the checkout
    source = tmp_path / "source"
    shutil.copytree(ROOT / "giseg", source / "giseg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
         str(source)], tmp_path, env)
    wheel = next(dist.glob("giseg-*.whl"))
    run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], tmp_path, env)
    env["PYTHONPATH"] = str(site)  # the installed copy, ahead of the editable one of this checkout
    where = run([sys.executable, "-c", "import giseg; print(giseg.__file__)"], work, env)
    assert where.startswith(str(site)), where
    giseg = [sys.executable, "-m", "giseg"]
    run([*giseg, "demo-data", "--out", "data", "--anatomy", "large", "--slices_per_day", "8"], work, env)
    run([*giseg, "make-tiny", "--family", "segformer", "--out", "model"], work, env)
    tiny = ["--base_model", "model", "--data_dir", "data", "--image_size", "32", "--epochs", "1",
            "--train_batch_size", "4", "--max_train_steps", "2", "--cache_dir", "cache"]
    run([*giseg, "train", *tiny, "--output_dir", "runs/one"], work, env)
    assert (work / "runs" / "one" / "best" / "model.safetensors").is_file()
    run([*giseg, "cv", "--output_dir", "runs/cv", "--folds", "0", "--", *tiny, "--n_folds", "2"], work, env)
    assert (work / "runs" / "cv" / "cv_table.md").is_file()
    assert not list(ROOT.glob("runs/cv")), "the CV wrote into the checkout"
