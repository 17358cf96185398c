#!/usr/bin/env bash
# The project's main job: bootstraps .venv if needed, then rolls out the DecMem world model from a context clip.
#
# Until a trained DecMem checkpoint exists this runs configs/tiny.py (RANDOM weights, CPU-friendly: the video is noise
# and the CLI says so) on a clip made by the procedural world generator, and writes out/main/world.mp4 (+ .json).
# Extra arguments go to `python -m decmem_jax.rollout` (e.g. --num_frames=600, --config.rollout.steps=8); for a real
# run see README ("Rollout").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
OUT="${DECMEM_MAIN_OUT:-out/main}"
.venv/bin/python -m decmem_jax.data.generate_world --out "$OUT/world" --clips 1 --frames 161 --size 64x64 \
    --split test --seed 0 --skip-existing --quiet
exec .venv/bin/python -m decmem_jax.rollout --config=configs/tiny.py --context="$OUT/world/test/0/000000.mp4" \
    --actions="$OUT/world/test/0/000000.npz" --num_frames=64 --out="$OUT/world.mp4" --diagnostics="$OUT/retrieval.npz" \
    "$@"
