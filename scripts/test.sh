#!/usr/bin/env bash
# Runs the test suite: bootstraps .venv if needed, then pytest. Arguments are passed to pytest.
# Defaults to JAX on CPU; run on a GPU with e.g. `JAX_PLATFORMS=cuda bash scripts/test.sh`.
# Two pytest-xdist workers by default (PYTEST_WORKERS=N to change, 0 for one process): most of a test's time is
# XLA compilation, which runs on one core, so two workers on two cores took the suite from 28.5 to 19 minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export JAX_PLATFORMS="${JAX_PLATFORMS-cpu}"
WORKERS="${PYTEST_WORKERS:-2}"
if [ "$WORKERS" = 0 ]; then
    exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$WORKERS" "$@"
