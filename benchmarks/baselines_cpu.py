"""A CPU-sized try of every CNN baseline, as a user types it, timed.

    python benchmarks/baselines_cpu.py [--models unet,unext] > benchmarks/baselines_cpu.txt

Each row runs `BASE_MODEL=<baseline> DATA_DIR=<fresh demo data> EPOCHS=2 IMAGE_SIZE=96 LR=1e-3 FOREGROUND=1 bash
run_train.sh` (the baselines start from random weights; the defaults, 15 epochs at 288 px, take hours on a CPU)
and reports its wall time, the final and best mean Dice, and the floor of predicting nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("unet", "unet-resnet34", "unet-resnext50", "dense-unet", "unext")
SETTINGS = {"EPOCHS": "2", "IMAGE_SIZE": "96", "LR": "1e-3"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated baselines (default: all)")
    args = ap.parse_args()
    settings = " ".join(f"{k}={v}" for k, v in SETTINGS.items())
    print(f"# python benchmarks/baselines_cpu.py --models {args.models}")
    print(f"# {os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at the start, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# each: BASE_MODEL=<model> DATA_DIR=<demo data> {settings} FOREGROUND=1 bash run_train.sh\n")
    print("| BASE_MODEL | wall s (check + training) | final mean Dice | best mean Dice | floor |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "giseg", "demo-data", "--out", str(data)], check=True,
                       capture_output=True)
        for model in args.models.split(","):
            out = Path(tmp) / model
            env = {**os.environ, "PYTHON": sys.executable, "BASE_MODEL": model, "DATA_DIR": str(data),
                   "OUTPUT_DIR": str(out), "LOG_FILE": str(Path(tmp) / f"{model}.log"), "FOREGROUND": "1",
                   "HF_HUB_OFFLINE": "1", "EXTRA_ARGS": f"--cache_dir {Path(tmp) / 'cache'}", **SETTINGS}
            t = time.perf_counter()
            res = subprocess.run(["bash", str(ROOT / "run_train.sh")], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if res.returncode:
                print(f"| `{model}` | failed (exit {res.returncode}) | | | |", flush=True)
                continue
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            floor = re.search(r"predicting nothing scores mean Dice ([0-9.]+)", (out / "train.log").read_text())
            print(f"| `{model}` | {wall:.0f} | {rows[-1]['dice_mean']:.4f} | {max(r['dice_mean'] for r in rows):.4f} "
                  f"| {floor.group(1)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
