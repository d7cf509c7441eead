#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py says what it measures), ready to fire on a lent CUDA machine:
#   bash benchmarks/gpu_check.sh            # sized for 8 minutes; everything under $OUT (the device tool's) or gpu-check/
#   bash benchmarks/gpu_check.sh --smoke    # the same script on the CPU at toy size (tests/test_bench.py runs it)
# It prints the machine (nvidia-smi, torch, CUDA), installs what the machine lacks from wheels carried in .whl/
# (albumentations and its needs: see docs/performance.md), records what `pip install torch==2.13.0` would do there,
# then runs the sections, writing gpu_check.txt (all output) and gpu_check.json beside env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=""
[ "${1:-}" = "--smoke" ] && SMOKE="--smoke"
DIR="${OUT:-gpu-check}"
mkdir -p "$DIR"
PY="${PYTHON:-python3}"
{
  echo "# bash benchmarks/gpu_check.sh $SMOKE  ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available here"
  "$PY" -c 'import platform, os, torch; print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}, {os.cpu_count()} CPU cores")'
  if [ -z "$SMOKE" ]; then
    echo "# pip install torch==2.13.0 --dry-run (what the README's install step would fetch here):"
    timeout 60 "$PY" -m pip install --dry-run --retries 0 --timeout 5 torch==2.13.0 2>&1 | tail -3
  fi
} 2>&1 | tee "$DIR/env.txt"
if ls .whl/*.whl >/dev/null 2>&1; then  # the device README's way: carried wheels, no network there
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site .whl/*.whl \
    && export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # giseg from this checkout in every child (bench.py's workers too)
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"$PY" -c 'import albumentations, accelerate, transformers' 2>&1 | tee -a "$DIR/env.txt" || true
"$PY" benchmarks/gpu_check.py $SMOKE --out "$DIR" 2>&1 | tee "$DIR/gpu_check.txt"
exit "${PIPESTATUS[0]}"
