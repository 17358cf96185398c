#!/usr/bin/env bash
# Reproduces the shipped world model (weights/world_tiny: VAE, dense stage-2 DiT, DecMem stage-3 DiT) from scratch:
#
#   bash scripts/train_world_tiny.sh                 # every step, in order, on one GPU (see docs/world_model.md)
#   bash scripts/train_world_tiny.sh vae latents     # only these steps
#
# Steps (each at most ~10 minutes on one H200, each resumable: a killed step continues from its checkpoints when
# run again, and a finished step is skipped, so the recipe also runs as a chain of short scheduler jobs):
#   data     generate_world: TRAIN_CLIPS training clips (seed 1, 70% revisit scripts) and TEST_CLIPS held-out test
#            clips (seed 2, all revisits) of 237 frames at 64x64 for the VAE and stages 1-2, then build_csv
#   vae      train the world-tiny VAE (configs/world_tiny.py:vae), export it with its latent statistics; meanwhile,
#            on the CPU (the VAE trains from clips held in memory), generate stage 3's clips: LONG_CLIPS training
#            clips (seed 4) and LONG_TEST_CLIPS held-out clips (seed 5) of 493 frames, every one a revisit script
#            with its way back drawn per clip (turn, retrace or patrol), so that most revisits lie far outside the
#            ALM window
#   latents  encode every clip with that VAE (60 latents per short clip, 124 per long one)
#   s1 s2 s3 the DiT stages dense_short -> dense_long -> decmem (configs/world_tiny.py:STAGE), each from the last
#   export   stage 2 -> $WEIGHTS/dense, stage 3 -> $WEIGHTS/decmem (bf16, with their SHA-256)
#   eval     VAE reconstruction on the test clips and the main-job protocol on test clips -> $WORK/eval.json
#
# Environment: WORK (runs/world_tiny), WEIGHTS (weights/world_tiny), PYTHON (.venv/bin/python when it exists, else
# python3), JOBS (CPU processes for data generation; default nproc), TRAIN_CLIPS (800), TEST_CLIPS (40),
# LONG_CLIPS (240), LONG_TEST_CLIPS (16), EVAL_CLIPS (4), SMOKE=1 (a few steps of everything on small data, to
# check the pipeline on a CPU).
# Extra settings go to every training step as --config.x overrides in STEP_ARGS_<STEP> (e.g.
# STEP_ARGS_S1="--config.train.steps=100"). Wall time per step is appended to $WORK/recipe_times.jsonl.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="${WORK:-runs/world_tiny}"
WEIGHTS="${WEIGHTS:-weights/world_tiny}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
JOBS="${JOBS:-$(nproc)}"
TRAIN_CLIPS="${TRAIN_CLIPS:-800}"
TEST_CLIPS="${TEST_CLIPS:-40}"
LONG_CLIPS="${LONG_CLIPS:-240}"
LONG_TEST_CLIPS="${LONG_TEST_CLIPS:-16}"
EVAL_CLIPS="${EVAL_CLIPS:-4}"
SMOKE="${SMOKE:-0}"
ALL_STEPS=(data vae latents s1 s2 s3 export eval)
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=("${ALL_STEPS[@]}")
for s in "${STEPS[@]}"; do
    [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || { echo "error: unknown step '$s'; steps: ${ALL_STEPS[*]}" >&2; exit 2; }
done
mkdir -p "$WORK"

SMOKE_VAE=() SMOKE_DIT=()
if [ "$SMOKE" = 1 ]; then
    TRAIN_CLIPS=4 TEST_CLIPS=2 LONG_CLIPS=2 LONG_TEST_CLIPS=1 EVAL_CLIPS=1
    SMOKE_VAE=(--config.train.steps=2 --config.train.batch=2 --config.data.clip_frames=9 --config.train.log_every=1)
    SMOKE_DIT=(--config.train.steps=2 --config.train.batch=2 --config.train.log_every=1 --config.train.warmup=1
               --config.data.num_threads=1)
fi

stamp() { date +%s.%N; }
record() {  # step name, start time
    "$PYTHON" -c 'import json,sys,time; print(json.dumps({"step": sys.argv[1], "seconds": round(float(sys.argv[3]) - float(sys.argv[2]), 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))' \
        "$1" "$2" "$(stamp)" >> "$WORK/recipe_times.jsonl"
}
extra() { local v="STEP_ARGS_${1^^}"; echo "${!v:-}"; }

train_stage() {  # step, config stage, init_from, latents folder (training; its held-out twin is FOLDER_test)
    local step=$1 stage=$2 init=$3 latents=$4
    # shellcheck disable=SC2046
    "$PYTHON" -m decmem_jax.train --config="configs/world_tiny.py:$stage" --workdir "$WORK/$stage" --resume \
        --config.init_from="$init" --config.data.csv="$WORK/$latents/latents.csv" \
        --config.data.eval_csv="$WORK/${latents}_test/latents.csv" "${SMOKE_DIT[@]}" $(extra "$step")
}

long_clips() {  # stage 3's clips (see the vae step)
    "$PYTHON" -m decmem_jax.data.generate_world --out "$WORK/data_long" --clips "$LONG_CLIPS" --frames 493 \
        --size 64x64 --seed 4 --revisit --way-back any --split training --jobs "$JOBS" --skip-existing --quiet
    "$PYTHON" -m decmem_jax.data.generate_world --out "$WORK/data_long" --clips "$LONG_TEST_CLIPS" --frames 493 \
        --size 64x64 --seed 5 --revisit --way-back any --split test --jobs "$JOBS" --skip-existing --quiet
    "$PYTHON" -m decmem_jax.data.build_csv --root "$WORK/data_long" --splits training,test --check probe
}

run_step() {
    case "$1" in
    data)
        "$PYTHON" -m decmem_jax.data.generate_world --out "$WORK/data" --clips "$TRAIN_CLIPS" --frames 237 \
            --size 64x64 --seed 1 --revisit-fraction 0.7 --split training --jobs "$JOBS" --skip-existing --quiet
        "$PYTHON" -m decmem_jax.data.generate_world --out "$WORK/data" --clips "$TEST_CLIPS" --frames 237 \
            --size 64x64 --seed 2 --revisit --split test --jobs "$JOBS" --skip-existing --quiet
        "$PYTHON" -m decmem_jax.data.build_csv --root "$WORK/data" --splits training,test --check probe ;;
    vae)
        # Stage 3's clips are made on the CPU while the GPU trains the VAE (they do not depend on it): ~2 minutes
        # of the recipe's wall time (docs/world_model.md). A killed step regenerates only the missing clips.
        long_clips > "$WORK/data_long.log" 2>&1 &
        local gen=$!
        # shellcheck disable=SC2046
        "$PYTHON" -m decmem_jax.train.vae --config=configs/world_tiny.py:vae --workdir "$WORK/vae" --resume \
            --config.data.csv="$WORK/data/train.csv" "${SMOKE_VAE[@]}" $(extra vae)
        wait "$gen" || { cat "$WORK/data_long.log" >&2; echo "error: generating stage 3's clips failed" >&2; exit 1; }
        "$PYTHON" -m decmem_jax.train.export --workdir "$WORK/vae" --out "$WEIGHTS/vae" \
            --stats-csv "$WORK/data/train.csv" --overwrite ;;
    latents)
        for data in data data_long; do
            for split in train test; do
                local out="$WORK/${data/data/latents}"; [ "$split" = test ] && out="${out}_test"
                "$PYTHON" -m decmem_jax.data.encode_latents --csv "$WORK/$data/$split.csv" --vae "$WEIGHTS/vae" \
                    --out "$out" --all-frames --skip-frames 0 --size 64x64 --batch 64 --no-progress
            done
        done ;;
    s1) train_stage s1 dense_short random latents ;;
    s2) train_stage s2 dense_long "$WORK/dense_short" latents ;;
    s3) train_stage s3 decmem "$WORK/dense_long" latents_long ;;
    export)
        "$PYTHON" -m decmem_jax.train.export --workdir "$WORK/dense_long" --out "$WEIGHTS/dense" --overwrite
        "$PYTHON" -m decmem_jax.train.export --workdir "$WORK/decmem" --out "$WEIGHTS/decmem" --overwrite ;;
    eval)
        "$PYTHON" -m decmem_jax.eval.world_model --data "$WORK/data" --weights "$WEIGHTS" --clips "$EVAL_CLIPS" \
            --out "$WORK/eval.json" ;;
    esac
}

# A SIGTERM (a scheduler's time limit, `timeout`) reaches the training step too, which saves its checkpoint and exits
# 0; the trap (run once that step has exited) keeps the step from being marked done, so the next run resumes it.
trap 'echo "[recipe] stopped by SIGTERM: run the same command again to resume" >&2; exit 143' TERM
for s in "${STEPS[@]}"; do
    if [ -f "$WORK/.done_$s" ]; then
        echo "[recipe] $s: done earlier (remove $WORK/.done_$s to redo it)"
        continue
    fi
    echo "[recipe] $s ..."
    t0=$(stamp)
    run_step "$s"
    record "$s" "$t0"
    touch "$WORK/.done_$s"
done
echo "[recipe] finished: ${STEPS[*]} (times in $WORK/recipe_times.jsonl)"
