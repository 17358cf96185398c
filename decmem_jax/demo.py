"""Stand-in main job (`bash scripts/main.sh`) until the DecMem rollout lands.

It exercises the real pieces that exist today on a tiny random-weight model: export an original-layout Wan2.1
checkpoint, convert it with the real converter CLI, reload it, check the reload is exact, and run a block-causal
chunk-by-chunk KV-cache rollout. It does not use a trained model and produces no video.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from decmem_jax.convert import keymap
from decmem_jax.convert.__main__ import main as convert_main
from decmem_jax.convert.dit import load_dit
from decmem_jax.models.config import get_config
from decmem_jax.models.dit import WanDiT

LATENT_SHAPE = (1, 5, 8, 8, 16)  # [B, F, H, W, C] channels-last latents
CHUNK_FRAMES, NUM_CHUNKS = 2, 3
TOLERANCE = 1e-5


def say(step: str, msg: str) -> None:
    print(f"[demo {step}] {msg}", flush=True)


@nnx.jit
def forward(model, latents, t, ctx):
    return model(latents, t, ctx)


@nnx.jit(static_argnames="chunk_size")
def forward_causal(model, latents, t, ctx, chunk_size):
    return model(latents, t, ctx, chunk_size=chunk_size)


@nnx.jit
def forward_chunk(model, chunk, t, ctx, cache):
    return model.forward_chunk(chunk, t, ctx, cache)


@nnx.jit
def commit(model, chunk, t, ctx, cache):
    return model.commit(chunk, t, ctx, cache)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m decmem_jax.demo",
        description="STAND-IN main job until the DecMem rollout issue lands: builds a tiny Wan2.1 DiT with random "
                    "weights, exports it as an original-layout PyTorch checkpoint, converts it with the real "
                    "converter (python -m decmem_jax.convert dit), reloads it, checks the output is unchanged, and "
                    "runs a block-causal KV-cache rollout over random latents. No trained model, no video.")
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default: 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")  # exact float32 checks on GPUs too (no TF32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say("0", f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); output -> {out}")

    # 1. A tiny WanDiT with random weights.
    # float32 + the XLA attention reference: exact comparisons on any device ('auto' picks cuDNN on GPUs, bf16 only).
    cfg = get_config("tiny", dtype="float32", attention="xla")
    model = WanDiT(cfg, rngs=nnx.Rngs(args.seed))
    flat = {tuple(str(p) for p in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    n_params = sum(a.size for a in flat.values())
    say("1/5", f"built WanDiT 'tiny' (random weights, seed {args.seed}): {n_params:,} parameters, "
               f"dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads")

    # 2. Export as an original-layout Wan2.1 checkpoint.
    src = out / "torch" / "diffusion_pytorch_model.safetensors"
    src.parent.mkdir(parents=True, exist_ok=True)
    tensors = dict(keymap.iter_export(flat, cfg, "original"))
    save_file(tensors, str(src))
    say("2/5", f"exported {len(tensors)} tensors in the original Wan2.1 layout -> {src} "
               f"({src.stat().st_size / 2**20:.1f} MiB)")

    # 3. Convert with the real CLI entry point.
    dst = out / "ckpt"
    shutil.rmtree(dst, ignore_errors=True)
    argv_convert = ["dit", "--src", str(src), "--dst", str(dst), "--config", "tiny", "--quiet"]
    say("3/5", "converting: python -m decmem_jax.convert " + " ".join(argv_convert))
    t0 = time.perf_counter()
    rc = convert_main(argv_convert)
    if rc:
        say("3/5", f"FAILED: the converter exited with {rc}")
        return 1
    say("3/5", f"converted in {time.perf_counter() - t0:.2f} s -> {dst}")

    # 4a. Reload and compare a bidirectional forward with the original model.
    loaded = load_dit(str(dst), dtype="float32", attention="xla")
    keys = jax.random.split(jax.random.key(args.seed + 1), 3)
    latents = jax.random.normal(keys[0], LATENT_SHAPE, jnp.float32)
    t = jnp.array([500.0], jnp.float32)
    ctx = jax.random.normal(keys[1], (1, 7, cfg.text_dim), jnp.float32)
    ref = forward(model, latents, t, ctx)
    got = forward(loaded, latents, t, ctx)
    diff = float(jnp.max(jnp.abs(ref - got)))
    ok = bool(np.isfinite(diff)) and diff < TOLERANCE
    say("4/5", f"bidirectional forward {tuple(latents.shape)} -> {tuple(got.shape)}; "
               f"max |original - converted| = {diff:.3e} ({'OK' if ok else 'FAILED'}, tolerance {TOLERANCE:g})")
    if not ok:
        return 1

    # 4b. Rollout stand-in: chunk by chunk against a KV cache (one Euler step to a clean chunk, then commit).
    b, _, h, w, c = LATENT_SHAPE
    cache = loaded.init_cache(b, CHUNK_FRAMES * NUM_CHUNKS, (h, w))
    say("4/5", f"KV cache: k {tuple(cache.k.shape)} {cache.k.dtype}, capacity {cache.capacity} frames")
    noise = jax.random.normal(keys[2], (b, CHUNK_FRAMES * NUM_CHUNKS, h, w, c), jnp.float32)
    chunks, clean, committed = [], [], []
    for i in range(NUM_CHUNKS):
        x_t = noise[:, i * CHUNK_FRAMES:(i + 1) * CHUNK_FRAMES]
        t0 = time.perf_counter()
        v = forward_chunk(loaded, x_t, t, ctx, cache)
        x0 = x_t - (t[0] / 1000.0) * v  # flow matching: x_t = (1 - s) x0 + s eps, v = eps - x0, s = t / 1000
        out_c, cache = commit(loaded, x0, jnp.zeros((b,), jnp.float32), ctx, cache)
        jax.block_until_ready(cache)
        ms = 1e3 * (time.perf_counter() - t0)
        clean.append(x0)
        committed.append(out_c)
        chunks.append({"chunk": i, "shape": list(x0.shape), "cache_length": int(cache.length), "ms": round(ms, 2)})
        say("4/5", f"chunk {i}: {tuple(x_t.shape)} -> velocity {tuple(v.shape)}, committed; cache length "
                   f"{int(cache.length)}/{cache.capacity} frames; {ms:.1f} ms{' (incl. compile)' if i == 0 else ''}")

    # The cached rollout must equal one block-causal pass over the same clean frames.
    full = forward_causal(loaded, jnp.concatenate(clean, 1), jnp.zeros((b,), jnp.float32), ctx, CHUNK_FRAMES)
    causal_diff = float(jnp.max(jnp.abs(full - jnp.concatenate(committed, 1))))
    causal_ok = bool(np.isfinite(causal_diff)) and causal_diff < 1e-4
    say("4/5", f"max |KV-cache rollout - block-causal full pass (chunk_size={CHUNK_FRAMES})| = {causal_diff:.3e} "
               f"({'OK' if causal_ok else 'FAILED'}, tolerance 1e-4)")
    if not causal_ok:
        return 1

    # 5. Summary.
    summary = {
        "stand_in": True, "note": "random-weight tiny model; not a trained model, no video",
        "jax": jax.__version__, "backend": jax.default_backend(), "seed": args.seed, "config": "tiny",
        "parameters": int(n_params), "checkpoint": str(src), "converted": str(dst),
        "forward": {"latents": list(LATENT_SHAPE), "max_abs_diff": diff, "tolerance": TOLERANCE},
        "rollout": chunks, "rollout_vs_block_causal_max_abs_diff": causal_diff,
    }
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    say("5/5", f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
