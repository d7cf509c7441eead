#!/usr/bin/env bash
# The test suite, as CI runs it: on a fresh machine it sets up .venv first (run_train.sh's rule for the interpreter).
#   bash run_tests.sh                     every test;  any pytest arguments work: bash run_tests.sh tests/data -x
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=$(SETUP_ONLY=1 bash run_train.sh)
exec "$PYTHON" -m pytest -q "$@"
