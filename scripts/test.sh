#!/usr/bin/env bash
# Runs the test suite: bootstraps .venv if needed, then pytest. Arguments are passed to pytest.
# Defaults to JAX on CPU; run on a GPU with e.g. `JAX_PLATFORMS=cuda bash scripts/test.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export JAX_PLATFORMS="${JAX_PLATFORMS-cpu}"
exec .venv/bin/python -m pytest -q "$@"
