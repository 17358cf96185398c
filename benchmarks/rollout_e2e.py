#!/usr/bin/env python
"""End-to-end rollout throughput: what the rollout CLI delivers per 16-frame chunk, the DiT's chunk step AND the
streaming VAE decode, the frames' trip to the host, their uint8 conversion and (with `av` installed) the mp4
encoder, through the library path the CLI runs (`decmem_jax.rollout.generate`), random weights.

Two orders of the same work, measured in the same run, in alternating rounds:
  pipelined   (the CLI's) segment s + 1 is dispatched before segment s's frames are fetched and written, so the
              host's work overlaps the device's;
  sequential  (the peer) each segment's frames are fetched and written before the next segment is dispatched.
One segment = one chunk (segment_chunks = 1, the most host round trips). The context is `--history` random latents
teacher-forced into the memory bank (not timed), the decoder warmed on them once and copied for every run. A
warm-up run of 2 chunks compiles everything first; each timed run is timed from the end of its prefill (nothing
dispatched yet) to the last chunk's frames on the host, divided by its chunks: the pipeline's fill and drain are
inside the window (one chunk's host work is never hidden), so more chunks per run come closer to the steady
state. (Until 2026-12-05 the window ran from the first chunk's frames to the last's, which in the pipelined order
could hold less device work than chunks, so it overstated the pipelined order's speed.) `benchmarks/rollout.py`
times the DiT's chunk step alone (the issue's 2.0 s goal); this one adds what a user of the CLI also waits for.

Geometry as benchmarks/rollout.py (Wan2.1-1.3B with DecMem memory and conditioning, 352x640, bf16, 20 UniPC steps,
CFG 5.0) with the real Wan2.1 VAE config in bf16 (random weights).

Usage:
  python benchmarks/rollout_e2e.py                  # GPU: 56 latents of history, 6 chunks per run, 2 rounds
  python benchmarks/rollout_e2e.py --small          # CPU smoke run: tiny DiT and VAE, seconds
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import guarded, jax_info, jax_peak_gb, write_record  # noqa: E402
from benchmarks.rollout import GEOMETRY, build_model, model_config  # noqa: E402
from benchmarks.vae import make_jax_model as make_vae, make_params as vae_params  # noqa: E402
from decmem_jax.format import FRAMES_PER_LATENT  # noqa: E402
from decmem_jax.models.vae import get_vae_config  # noqa: E402
from decmem_jax.rollout import engine  # noqa: E402
from decmem_jax.rollout import generate as generate_lib  # noqa: E402

ORDERS = ("pipelined", "sequential")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--history", type=int, default=None, help="context latents in the memory bank (default 56; 4 "
                                                                 "with --small)")
    p.add_argument("--chunks", type=int, default=6, help="chunks per timed run (default 6)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each running both orders (default 2)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 20; 2 with --small)")
    p.add_argument("--guidance", type=float, default=5.0, help="action CFG scale")
    p.add_argument("--sgm-backend", default="auto", help="MemoryConfig.backend (auto: mosaic_gpu on an H100/H200)")
    p.add_argument("--no-mp4", action="store_true", help="do not encode the frames (host work: fetch + uint8 only)")
    p.add_argument("--small", action="store_true", help="tiny DiT and VAE on the CPU: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="output (default $OUT/rollout_e2e.json or out/rollout_e2e.json)")
    args = p.parse_args(argv)
    if args.chunks < 1 or args.rounds < 1:
        p.error("--chunks and --rounds must be >= 1")
    geo = GEOMETRY["small" if args.small else "full"]
    if args.history is None:
        args.history = geo["chunk"] if args.small else 56
    if args.history < 1:
        p.error("--history must be >= 1 (the decoder is warmed on the context)")
    args.steps = args.steps or geo["steps"]
    args.attention, args.mesh = None, None  # rollout.model_config reads both (one device: cuDNN attention on a GPU)
    if args.json is None:
        out = os.environ.get("OUT")
        args.json = str(pathlib.Path(out) / "rollout_e2e.json") if out else "out/rollout_e2e.json"
    return args


def mp4_writer(enabled: bool):
    """(a function writing uint8 frames [T, H, W, 3] to an mp4 in a temporary directory, a closer, what it is)."""
    if enabled:
        try:
            from decmem_jax import video

            tmp = tempfile.TemporaryDirectory()
            # As the rollout CLI writes: encoded on a worker thread.
            writer = video.BackgroundWriter(video.VideoWriter(pathlib.Path(tmp.name) / "e2e.mp4", fps=16))

            def close():
                writer.__exit__(None, None, None)
                tmp.cleanup()
            return writer.write, close, "mp4 (libx264 via av, on a worker thread)"
        except ImportError as e:
            print(f"# mp4 encoding unavailable ({e}); the host work is the fetch and the uint8 conversion only")
    return (lambda frames: None), (lambda: None), "none (fetch + uint8 only)"


def run_order(order, dit, vae, context, decoder, text, actions, settings, segment_fn, args, write, chunks):
    """Seconds per chunk of one run of `chunks` chunks (prefill excluded), the segments' own figures, the frames."""
    geo = GEOMETRY["small" if args.small else "full"]
    frames_per_chunk = geo["chunk"] * FRAMES_PER_LATENT
    segments = generate_lib.generate(
        dit, vae, latents=context, actions=actions, poses=np.zeros(actions.shape[:2] + (5,), np.float32), text=text,
        seeds=[args.seed], num_frames=chunks * frames_per_chunk, chunk=geo["chunk"], segment_chunks=1,
        segment_fn=segment_fn, decoder=decoder, pipeline=order == "pipelined",
        capacity=args.history + max(args.chunks, 2) * geo["chunk"])  # same cache shape in the warm-up: no recompile
    next(segments)  # the memory bank (prefill, awaited by `generate`), untimed
    t0, seconds, kept = time.perf_counter(), [], []
    for segment in segments:
        write(segment.frames[0])
        seconds.append(segment.seconds)
        kept.append(segment.frames[0])
    return (time.perf_counter() - t0) / chunks, seconds, np.concatenate(kept)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    geo = GEOMETRY["small" if args.small else "full"]
    record = {"command": [sys.executable, "benchmarks/rollout_e2e.py", *argv], "args": vars(args), "jax": jax_info(),
              "rows": []}
    cfg = model_config("decmem", args)
    t0 = time.perf_counter()
    print(f"building the DiT ({geo['config']}) and the VAE with random weights ...", flush=True)
    graphdef, state = build_model(cfg, args.seed)
    dit = nnx.merge(graphdef, state)
    vcfg = get_vae_config("tiny" if args.small else "wan2.1-vae", dtype=geo["dtype"], param_dtype=geo["dtype"])
    vae = make_vae(vcfg, vae_params(vcfg, args.seed + 1))[2]
    print(f"    {time.perf_counter() - t0:.1f} s; warming the streaming decoder on the {args.history} context latents "
          "(compiles it) ...", flush=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed + 2)
    context = jnp.asarray(rng.standard_normal((1, args.history, *geo["hw"], cfg.in_channels)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((1, geo["text_rows"], cfg.text_dim)), jnp.float32)
    frames = (args.history - 1) * FRAMES_PER_LATENT + 1 + max(args.chunks, 2) * geo["chunk"] * FRAMES_PER_LATENT
    actions = rng.integers(0, 2, (1, frames, 8)).astype(np.int32)
    settings = engine.SamplerSettings(steps=args.steps, guidance=args.guidance)
    segment_fn = engine.make_segment_fn(settings)
    decoder = jax.block_until_ready(generate_lib.warm_decoder(vae, context, piece=geo["chunk"])[0])
    record["warm_decoder_s"] = round(time.perf_counter() - t0, 1)
    print(f"    {record['warm_decoder_s']} s", flush=True)
    write, close, sink = mp4_writer(not args.no_mp4)
    record["setup"] = {"config": geo["config"], "latent_hw": geo["hw"], "chunk": geo["chunk"], "dtype": geo["dtype"],
                       "vae": "tiny" if args.small else "wan2.1-vae", "sink": sink, "segment_chunks": 1,
                       "sgm_backend": cfg.memory.backend, "weights": "random"}
    print(f"rollout e2e: {geo['config']} + VAE {record['setup']['vae']} ({geo['dtype']}), history {args.history}, "
          f"{args.chunks} chunks per run, {args.steps} steps, sink: {sink}", flush=True)
    outputs = {}
    try:
        print("--- warm-up: 2 chunks, pipelined (compiles the chunk and decoder steps; untimed) ...", flush=True)
        t0 = time.perf_counter()
        run_order("pipelined", dit, vae, context, decoder, text, actions, settings, segment_fn, args,
                  lambda frames: None, 2)
        record["warmup_s"] = round(time.perf_counter() - t0, 1)
        print(f"    {record['warmup_s']} s", flush=True)
        for r in range(args.rounds):
            for order in (ORDERS if r % 2 == 0 else ORDERS[::-1]):
                def one(order=order):
                    s, segs, got = run_order(order, dit, vae, context, decoder, text, actions, settings, segment_fn,
                                             args, write, args.chunks)
                    outputs.setdefault(order, got)
                    return {"status": "ok", "s_per_chunk": round(s, 4), "segment_s": [round(x, 4) for x in segs]}
                print(f"--- {order}, round {r}: {args.chunks} chunks ...", flush=True)
                row = {"order": order, "round": r, **guarded(one)}
                print(f"    {row}", flush=True)
                record["rows"].append(row)
                write_record(args.json, record)
    finally:
        close()
    frames_per_chunk = geo["chunk"] * FRAMES_PER_LATENT
    summary = {}
    for order in ORDERS:
        ok = [row["s_per_chunk"] for row in record["rows"] if row["order"] == order and row.get("status") == "ok"]
        if ok:
            med = statistics.median(ok)
            summary[order] = {"s_per_chunk": med, "fps": round(frames_per_chunk / med, 3), "runs": ok}
    if len(outputs) == 2:  # the same chunks either way: only the order of the work differs
        diff = outputs["pipelined"].astype(int) - outputs["sequential"].astype(int)
        summary["max_frame_diff"] = int(np.abs(diff).max())
    record["summary"], record["peak_gb"] = summary, jax_peak_gb()
    print(f"\n{'order':12} {'s/chunk':>9} {'FPS':>7} {'ratio':>7}")
    for order in ORDERS:
        if order in summary:
            ratio = summary[order]["s_per_chunk"] / summary["sequential"]["s_per_chunk"] if "sequential" in summary \
                else float("nan")
            print(f"{order:12} {summary[order]['s_per_chunk']:>9.3f} {summary[order]['fps']:>7.2f} {ratio:>7.3f}")
    print(f"# ratio = s/chunk over the sequential order's (the peer), same run; frames identical up to "
          f"{summary.get('max_frame_diff')} levels; sink: {sink}")
    write_record(args.json, record)
    return record


if __name__ == "__main__":
    main()
