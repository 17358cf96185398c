#!/usr/bin/env bash
# The project's main job: bootstraps .venv if needed, then rolls out the shipped world model from a context clip.
#
# A 249-frame 64x64 clip is made by the procedural world generator with the memory benchmark's protocol (held out:
# seed 0 is not a training seed): the camera looks round (frames 0-24), walks a 160-step path out (24-184) and walks
# it back, facing as on the way out, so every frame of the way back shows a place seen on the way out, up to ~300
# frames earlier. The DecMem world model shipped in weights/world_tiny (configs/world_tiny.py:decmem, trained by
# scripts/train_world_tiny.sh) teacher-forces the first 185 frames (the look-round and the way out) into its memory
# and generates the next 64 (the first part of the way back) under the clip's actions: what it should show there is
# in its memory, mostly beyond the 32-frame local window. It writes out/main/world.mp4, the sidecar out/main/world.json
# (settings, timing, the weights' SHA-256, and PSNR/SSIM/LPIPS against the clip's true continuation next to a
# copy-the-last-frame baseline),
# out/main/world_vs_truth.mp4 (truth | generated), out/main/world_strip.png (a contact sheet) and the SGM retrieval
# of every chunk, out/main/retrieval.npz. Extra arguments go to `python -m decmem_jax.rollout` (e.g. --seed=1,
# --config.rollout.steps=20); DECMEM_MAIN_OUT=DIR writes elsewhere. configs/tiny.py (random weights) is for smoke tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
OUT="${DECMEM_MAIN_OUT:-out/main}"
CLIP="$OUT/patrol_clip/test/0/000000"  # not world/: a run before 2026-12-03 left a shorter clip there
.venv/bin/python -m decmem_jax.data.generate_world --out "$OUT/patrol_clip" --clips 1 --frames 249 --size 64x64 \
    --split test --seed 0 --revisit --way-back patrol --skip-existing --quiet
exec .venv/bin/python -m decmem_jax.rollout --config=configs/world_tiny.py:decmem --context="$CLIP.mp4" \
    --actions="$CLIP.npz" --ground_truth="$CLIP.mp4" --config.rollout.context_frames=185 --num_frames=64 \
    --out="$OUT/world.mp4" \
    --diagnostics="$OUT/retrieval.npz" "$@"
