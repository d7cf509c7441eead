#!/usr/bin/env bash
# Start a fine-tuning run in the background with a log: `giseg launch` does it; `giseg launch --help` lists every
# variable it reads (BASE_MODEL DATA_DIR OUTPUT_DIR LOG_FILE RESUME GPUS ACCELERATE_CONFIG NNODES NODE_RANK
# MASTER_ADDR MASTER_PORT FOLDS PARALLEL FINAL_MODEL FOREGROUND, and EPOCHS BATCH_SIZE LR IMAGE_SIZE WARMUP
# MIXED_PRECISION DATASET REPORT_TO HUB_MODEL_ID EXTRA_ARGS for giseg train).
#   bash run_train.sh                                   the demo: embedded data and a small model, no network
#   BASE_MODEL=<hub id or folder> DATA_DIR=<kaggle folder> GPUS=0,1 MIXED_PRECISION=bf16 bash run_train.sh
#   RESUME=runs/<name> bash run_train.sh                continue a stopped run;  FOREGROUND=1: wait for the run
# The interpreter: PYTHON if set, else an active environment (venv, conda) that imports giseg, used as it is, else
# .venv, which the first call makes: torch for this machine (a CUDA build only where nvidia-smi sees a GPU), then
# requirements.txt (a few minutes, once). SETUP_ONLY=1: set up, print the interpreter and stop (run_tests.sh).
set -euo pipefail
cd "$(dirname "$0")"
setup() {
  echo "setting up .venv once: torch for this machine, then pip install -r requirements.txt (a few minutes)" >&2
  python3 -m venv .venv
  local pip=(.venv/bin/python -m pip install -q) torch=torch==2.13.0
  "${pip[@]}" --upgrade pip >&2
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch >&2  # PyPI's Linux wheel is a CUDA build
  elif "${pip[@]}" --dry-run --report - "$torch" 2>/dev/null | grep -q '"version": "[0-9.]*+cpu"'; then
    "${pip[@]}" "$torch" >&2  # the configured index has a CPU build
  else  # never PyPI's multi-GB CUDA build on a machine without a GPU
    "${pip[@]}" "$torch" --index-url https://download.pytorch.org/whl/cpu >&2
  fi
  "${pip[@]}" -r requirements.txt >&2
}
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && python -c "import giseg" 2>/dev/null; then PYTHON=python
  elif .venv/bin/python -c "import giseg" 2>/dev/null; then PYTHON=.venv/bin/python
  else setup && PYTHON=.venv/bin/python
  fi
fi
if [ "${SETUP_ONLY:-0}" = 1 ]; then echo "$PYTHON"; exit 0; fi
exec "$PYTHON" -m giseg launch "$@"
