#!/usr/bin/env bash
# The test suite, as CI runs it: on a fresh machine it sets up .venv first (run_train.sh's rule for the interpreter).
#   bash run_tests.sh                     every test, in TEST_WORKERS processes (default 2: pytest-xdist, each test
#                                         file in one process, so module fixtures are built once)
#   bash run_tests.sh tests/data -x       any pytest arguments work;  TEST_WORKERS=0 bash run_tests.sh: one process
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=$(SETUP_ONLY=1 bash run_train.sh)
exec "$PYTHON" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
