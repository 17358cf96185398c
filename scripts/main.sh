#!/usr/bin/env bash
# The project's main job: bootstraps .venv if needed, then rolls out the shipped world model from a context clip.
#
# A 161-frame 64x64 clip is made by the procedural world generator (held out: its seed is not a training seed): the
# camera looks round (frames 0-24), walks out (24-92) and retraces its path backwards (92-160), so every frame of the
# way back shows a place seen on the way out, up to 136 frames earlier. The DecMem world model shipped in
# weights/world_tiny (configs/world_tiny.py:decmem, trained by scripts/train_world_tiny.sh) teacher-forces the first
# 97 frames (the look-round and the way out) into its memory and generates the last 64 (the way back) under the
# clip's actions: what it should show there is in its memory, mostly beyond the 32-frame local window. It writes out/main/world.mp4, the sidecar out/main/world.json (settings, timing, the
# weights' SHA-256, and PSNR/SSIM/LPIPS against the clip's true continuation next to a copy-the-last-frame baseline),
# out/main/world_vs_truth.mp4 (truth | generated), out/main/world_strip.png (a contact sheet) and the SGM retrieval
# of every chunk, out/main/retrieval.npz. Extra arguments go to `python -m decmem_jax.rollout` (e.g. --seed=1,
# --config.rollout.steps=20); DECMEM_MAIN_OUT=DIR writes elsewhere. configs/tiny.py (random weights) is for smoke tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
OUT="${DECMEM_MAIN_OUT:-out/main}"
CLIP="$OUT/world/test/0/000000"
.venv/bin/python -m decmem_jax.data.generate_world --out "$OUT/world" --clips 1 --frames 161 --size 64x64 \
    --split test --seed 0 --revisit --way-back retrace --skip-existing --quiet
exec .venv/bin/python -m decmem_jax.rollout --config=configs/world_tiny.py:decmem --context="$CLIP.mp4" \
    --actions="$CLIP.npz" --ground_truth="$CLIP.mp4" --config.rollout.context_frames=97 --num_frames=64 --out="$OUT/world.mp4" \
    --diagnostics="$OUT/retrieval.npz" "$@"
