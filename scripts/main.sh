#!/usr/bin/env bash
# The project's main job: bootstraps .venv if needed, then runs it. Arguments are passed through.
# Until the rollout lands this is a stand-in (see `bash scripts/main.sh --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
exec .venv/bin/python -m decmem_jax.demo "$@"
