#!/usr/bin/env python
"""Rollout throughput: seconds per generated chunk of DecMem (SGM + ALM against a block-major cache) vs dense causal
attention over the whole committed history, at several history lengths, with random weights.

One case = one variant at one history length H (latent frames already committed):
  geometry  real Wan2.1-1.3B config, 352x640 video -> latents 44x80 -> 880 tokens per latent frame; bf16 compute and
            bf16 weight storage (param_dtype=bfloat16 to save memory; the checkpoint ships fp32 weights); conditioning
            on (ConditioningConfig.from_dit) so both variants run classifier-free guidance.
  decmem    memory=MemoryConfig(blocks_per_frame=6, block_slots=192, top_k=80, window=8, backend=--sgm-backend):
            BlockKVCache (6 blocks x 192 slots per frame: 1152 slots for 880 tokens, padding zero).
  dense     memory=None: token-major KVCache, cuDNN attention over every committed token + the chunk
            (attention_with_history).
  cache     capacity H + 4 latents, batch 1 (the cond/uncond CFG branches share one history). It is NOT prefilled by
            running H latents of forwards: random N(0, 1) bf16 keys/values are written straight into the cache arrays
            (block-major through BlockLayout.to_blocks, so padding slots are zero; pooled keys by pool_blocks on those
            keys) and `length` is set to H.
  step      `engine.chunk_step` (jitted, cache donated): 20 UniPC steps with guidance 5.0, each ONE batch-2 forward
            (cond + uncond) over a 4-latent chunk (3,520 query tokens per branch) against the batch-1 cache, then the
            commit pass (batch 1, t = 0) that writes the chunk into the cache. After every call `length` is reset to
            H, so every timed chunk starts from exactly H latents of history.
Reported: s/chunk (median of --repeats after --warmup untimed calls; compile time separately), FPS = 16 frames
(4 latents x 4 frames) / (s/chunk), peak GPU memory (allocator peak of the process), cache size, XLA's planned
temp memory of the compiled step, and DecMem/dense at each H. The paper reports 4.14 s per chunk and 3.65 FPS
(16 / 4.14 = 3.86 FPS; 3.65 FPS is 4.38 s per 16 frames: the two numbers do not describe the same measurement,
perhaps FPS includes other per-chunk work such as the VAE decode). This benchmark times the DiT work only.

Memory (30 layers, K + V in bf16): dense 162 MB (0.151 GiB) per latent frame (880 tokens), DecMem 212 MB
(0.198 GiB) per latent frame (1152 slots) + 1.1 MB pooled keys; weights 2.8 GB (2.6 GiB) in bf16. Cache at
H = 56/100/150/200 (capacity H + 4): dense 9.1/15.7/23.3/30.8 GiB, DecMem 11.9/20.6/30.5/40.3 GiB. XLA:CPU plans
21.2 GiB of temporaries for the DecMem step with the reference SGM at every H (the gathers below), so the DecMem
H = 200 case needs about 40.3 + 2.6 + 21 = 64 GiB; the "XLA temp GB" column shows the GPU's plan. JAX preallocates
XLA_PYTHON_CLIENT_MEM_FRACTION of the GPU; it is set to 0.92 here (before jax is imported; 73 GiB of an 80 GB H100)
unless already set.

What limits the reference SGM (`--sgm-backend reference`, the default): pallas_kernels/sgm/reference.py gathers the
k·P selected keys (and values) of every query block: with the two CFG branches folded into the query blocks that is
[1, 12 heads, 48 query blocks, 80·192 keys, 128] per tensor -- ~1.1 GB per branch in bf16, and the reference holds it
in fp32 (4.5 GB each for K and V), plus [1, 12, 48, 192, 15360] fp32 logits (6.8 GB), per layer call, with fp32
HIGHEST-precision matmuls. So its cost does not grow with the history (it is bound by k, not H), but it is slow and
memory-heavy in absolute terms. The kernels issue replaces it with the Mosaic GPU kernel (`--sgm-backend mosaic_gpu`,
or `auto` on an H100/H200), which reads the selected blocks where they lie in the cache.

Isolation: by default (except with --small) every case runs in its own child process, so the peak memory of a case
is its own (JAX's allocator peak cannot be reset) and each 30-43 GB cache is alone on the GPU; the parent never
touches the GPU. --no-isolate runs everything in this process (then "peak GB" is the peak so far). The JSON is
rewritten after every case, so a run cut short keeps the finished cases.

Usage:
  python benchmarks/rollout.py                                   # GPU: decmem + dense at H = 56, 100, 150, 200
  python benchmarks/rollout.py --variants dense --history 56,200  # a subset (one device command is limited to 10 min)
  python benchmarks/rollout.py --sgm-backend mosaic_gpu          # DecMem with the SGM kernel
  python benchmarks/rollout.py --small                            # CPU smoke run: tiny config, fp32, seconds
  python benchmarks/rollout.py --variants decmem --history 56 --xla-options ";xla_gpu_triton_gemm_any=true"
                                      # XLA's defaults vs another compile-option set, interleaved in one process
  python benchmarks/rollout.py --mesh data:2,tensor:2             # sharded (docs/parallel.md): 4 devices, xla
                                                                 # attention + reference SGM (what partitions)
  python benchmarks/rollout.py --variants decmem --sgm-backend mosaic_gpu \
      --memory blocks_per_frame=7,block_slots=128,top_k=93   # what-if: 7 blocks of 126 tokens in 128 slots (almost
                                                             # no padding; not the paper's 6 x 147 in 192)

Each row also records the GPU's mean SM clock and power while it was timed (`gpu_clocks`, benchmarks/clocks.py):
an H100 runs this at its power cap, and machines of one kind differ by ~2%.

--mesh places the model, the cache and the CFG branches as the rollout CLI's rollout.mesh does
(decmem_jax.parallel.rollout.RolloutMesh); rows then carry the mesh, the cache's bytes on each device
("cache GB/dev" = the largest) and each mesh device's allocator peak. The default attention becomes xla with --mesh.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402  (importing jax does not touch the GPU; the parent of isolated runs never does)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.clocks import ClockLog, describe as describe_clocks  # noqa: E402
from benchmarks.common import (check_xla_options, child_failure, guarded, jax_info, jax_peak_gb,  # noqa: E402
                               parse_fields, parse_xla_option_sets, run_child, write_record, xla_options_label)
from benchmarks.dit_forward import make_jax_model  # noqa: E402
from decmem_jax.format import FRAMES_PER_LATENT  # noqa: E402
from decmem_jax.models import memory as mem  # noqa: E402
from decmem_jax.models.conditioning import ConditioningConfig  # noqa: E402
from decmem_jax.models.config import LINEAR_LAYOUTS, MemoryConfig, get_config  # noqa: E402
from decmem_jax.models.dit import WanDiT  # noqa: E402
from decmem_jax.parallel.rollout import MeshSpecError, RolloutMesh, parse_mesh  # noqa: E402
from decmem_jax.rollout import engine  # noqa: E402

VARIANTS = ("decmem", "dense")
SGM_BACKENDS = ("reference", "auto", "mosaic_gpu")
PAPER = {"s_per_chunk": 4.14, "fps": 3.65}
GEOMETRY = {
    # latent grid (latent pixels; patches are 2x2), chunk latents, text rows, memory settings, defaults
    "full": dict(config="wan2.1-t2v-1.3b", hw=(44, 80), chunk=4, text_rows=512, dtype="bfloat16",
                 memory=dict(blocks_per_frame=6, block_slots=192, top_k=80, window=8),
                 steps=20, history="56,100,150,200"),
    "small": dict(config="tiny", hw=(8, 8), chunk=2, text_rows=16, dtype="float32",
                  memory=dict(blocks_per_frame=2, block_slots=64, top_k=4, window=4),
                  steps=2, history="4,8"),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="decmem,dense", help="comma list of: decmem, dense")
    p.add_argument("--history", default=None,
                   help="comma list of committed latent frames before the chunk (default 56,100,150,200; 4,8 with "
                        "--small)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per chunk (default 20; 2 with --small)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (1.0: no CFG, batch-1 forwards)")
    p.add_argument("--sgm-backend", default="reference", choices=SGM_BACKENDS, help="MemoryConfig.backend")
    p.add_argument("--attention", default=None, choices=("cudnn", "xla", "mosaic"),
                   help="dense attention backend (default cudnn on GPU, xla otherwise or with --mesh)")
    p.add_argument("--gelu", default=None, choices=("xla", "triton"),
                   help="the FFN's GELU (DiTConfig.gelu; default: the config's)")
    p.add_argument("--layer-unroll", type=int, default=None, metavar="N",
                   help="blocks per iteration of the layer scan (DiTConfig.layer_unroll; 1 = a loop, 30 = straight-"
                        "line code with each layer's weight slice at a constant index, no faster on an H100; "
                        "default: the config's)")
    p.add_argument("--linear-layout", default=None, choices=LINEAR_LAYOUTS,
                   help="output layout of the DiT's Linear layers (DiTConfig.linear_layout; row_major pins it, xla "
                        "lets XLA choose); default auto, which an inference config resolves to xla "
                        "(DiTConfig.for_inference), as the rollout CLI runs")
    p.add_argument("--memory", default="", metavar="K=V,...",
                   help="MemoryConfig overrides for a what-if geometry of the decmem variant, e.g. blocks_per_frame=7,"
                        "block_slots=128,top_k=93 (blocks of 126 tokens that fill two 64-row tiles, about the same "
                        "retrieved tokens); default the paper's 6 blocks of 147 tokens in 192 slots, top-80")
    p.add_argument("--mesh", default="", help="device mesh of the DiT, e.g. data:2,tensor:2 (data: CFG branches, "
                   "tensor: heads and their cache); default one device")
    p.add_argument("--repeats", type=int, default=2, help="timed chunk steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed chunk steps first (after compilation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="tiny config on the CPU: a smoke run of seconds")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one child process per case (default: on, off with --small)")
    p.add_argument("--json", default=None, help="output path (default $OUT/rollout.json or out/rollout.json)")
    p.add_argument("--dump", default=None, metavar="DIR",
                   help="write each case's generated chunk (x0 of the last timed call, float32 .npy) under DIR, to "
                        "compare two versions of the code on the same seeds")
    p.add_argument("--xla-options", default=None, metavar="SETS",
                   help="compare XLA compile-option sets in one run: sets separated by ';', each a comma list of "
                        "name=value (an empty set = XLA's defaults), e.g. ';xla_gpu_triton_gemm_any=true'. Each case "
                        "compiles its step once per set and times the sets interleaved, call by call; the first set "
                        "is the row's result and the peer of the others (ratio), and each set's chunk is compared "
                        "with the first's")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after the timed chunks, trace one more chunk step per case under DIR and print (and store "
                        "in the JSON) where its device time goes: attention, GEMMs, fusions, copies, top kernels")
    args = p.parse_args(argv)
    geo = GEOMETRY["small" if args.small else "full"]
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; expected decmem and/or dense")
    args.history = [int(h) for h in (args.history or geo["history"]).split(",") if h]
    if not args.history or min(args.history) < 0:
        p.error("--history needs non-negative latent counts")
    args.steps = args.steps or geo["steps"]
    args.memory_overrides = parse_fields(args.memory, "--memory")
    allowed = {f.name for f in dataclasses.fields(MemoryConfig)} - {"backend"}  # the backend is --sgm-backend's
    unknown = sorted(set(args.memory_overrides) - allowed)
    if unknown:
        p.error(f"--memory: {', '.join(unknown)} not among the MemoryConfig fields it sets "
                f"({', '.join(sorted(allowed))})")
    try:
        args.xla_option_sets = parse_xla_option_sets(args.xla_options)
    except ValueError as e:
        p.error(str(e))
    try:  # the syntax here; devices, heads and backends in the case (the parent of isolated runs has no devices)
        parse_mesh(args.mesh, option="--mesh")
    except MeshSpecError as e:
        p.error(str(e))
    if args.layer_unroll is not None and args.layer_unroll < 1:
        p.error(f"--layer-unroll must be >= 1 (blocks per iteration of the layer scan), got {args.layer_unroll}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.isolate is None:
        args.isolate = not args.small
    if args.json is None:
        out_dir = os.environ.get("OUT")
        args.json = str(pathlib.Path(out_dir) / "rollout.json") if out_dir else "out/rollout.json"
    return args


# ---------------------------------------------------------------- model and cache
def model_config(variant: str, args):
    geo = GEOMETRY["small" if args.small else "full"]
    attention = args.attention or ("cudnn" if jax.default_backend() == "gpu" and not args.mesh else "xla")
    base = get_config(geo["config"], dtype=geo["dtype"], param_dtype=geo["dtype"], attention=attention,
                      **({"gelu": args.gelu} if getattr(args, "gelu", None) else {}),  # rollout_e2e has neither
                      **({"layer_unroll": args.layer_unroll} if getattr(args, "layer_unroll", None) is not None
                         else {}),
                      **({"linear_layout": args.linear_layout} if getattr(args, "linear_layout", None) else {}))
    fields = {**geo["memory"], **getattr(args, "memory_overrides", {})}  # rollout_e2e has no --memory
    memory = MemoryConfig(**fields, backend=args.sgm_backend) if variant == "decmem" else None
    return base.replace(memory=memory, conditioning=ConditioningConfig.from_dit(base)).for_inference()


def build_model(cfg, seed: int):
    """WanDiT with random weights filled on the device (dit_forward.make_jax_model: no fp32 init of the module)."""
    graphdef = nnx.split(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))[0]
    state = make_jax_model(cfg, seed)
    jax.block_until_ready(state)
    return graphdef, state


def random_cache(model, cfg, capacity: int, hw, history: int, seed: int):
    """A cache of `capacity` latents holding random N(0, 1) keys/values in every slot, `length` = history.

    One layer per iteration of a lax.map (bounded temporaries; a layer is < 2^31 elements for the RNG). Block-major
    caches get their keys through BlockLayout.to_blocks (zero padding slots) and exact pooled keys."""
    abstract = jax.eval_shape(lambda: model.init_cache(1, capacity, hw))
    tpf, dtype = abstract.tokens_per_frame, abstract.k.dtype
    tokens = (1, capacity * tpf, cfg.num_heads, cfg.head_dim)
    layout = None
    if cfg.memory is not None:
        layout = mem.BlockLayout.create(tpf, cfg.memory.blocks_per_frame, cfg.memory.block_slots)
        lengths = layout.block_lengths(capacity)

    @jax.jit
    def fill(key):
        def layer(k):
            k1, k2 = jax.random.split(k)
            keys, values = jax.random.normal(k1, tokens, dtype), jax.random.normal(k2, tokens, dtype)
            if layout is None:
                return keys, values
            kb, vb = layout.to_blocks(keys), layout.to_blocks(values)
            return kb, vb, mem.pool_blocks(kb, lengths, layout.slots)

        return jax.lax.map(layer, jax.random.split(key, cfg.num_layers))

    arrays = fill(jax.random.key(seed))
    length = jax.device_put(jnp.int32(history), jax.devices()[0])
    if layout is None:
        cache = abstract.replace(k=arrays[0], v=arrays[1], length=length)
    else:
        cache = abstract.replace(k=arrays[0], v=arrays[1], pool=arrays[2], length=length)
    for leaf, ref in zip(jax.tree.leaves(cache), jax.tree.leaves(abstract)):
        assert leaf.shape == ref.shape and leaf.dtype == ref.dtype, (leaf.shape, ref.shape, leaf.dtype, ref.dtype)
    return jax.block_until_ready(cache)


def keys_per_query(cfg, history: int, chunk: int, tpf: int) -> int:
    """Keys a query token attends to: dense = every committed token + its chunk; DecMem = ALM window (history part +
    chunk) + the valid tokens of the top-k selected blocks (may overlap the window; counted as the kernel does)."""
    if cfg.memory is None:
        return (history + chunk) * tpf
    m = cfg.memory
    layout = mem.BlockLayout.create(tpf, m.blocks_per_frame, m.block_slots)
    alm = (min(history, m.window - chunk) + chunk) * tpf
    k = min(m.top_k, (history + chunk) * m.blocks_per_frame)
    return int(alm + round(k * layout.lengths.mean()))


def device_peaks_gb(devices):
    """Allocator peak of each device in GB (GPU statistics; None where unavailable, e.g. on the CPU)."""
    try:
        return {str(d): round(d.memory_stats()["peak_bytes_in_use"] / 2**30, 2) for d in devices}
    except Exception:  # noqa: BLE001
        return None


def memory_analysis_gb(compiled):
    try:
        ma = compiled.memory_analysis()
        return {name: round(getattr(ma, f"{name}_size_in_bytes") / 2**30, 3)
                for name in ("argument", "output", "alias", "temp") if hasattr(ma, f"{name}_size_in_bytes")}
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------- one case
def run_case(variant: str, history: int, args, model_cache: dict):
    geo = GEOMETRY["small" if args.small else "full"]
    cfg = model_config(variant, args)
    chunk, hw = geo["chunk"], geo["hw"]
    capacity = history + chunk
    tpf = (hw[0] // cfg.patch_size[1]) * (hw[1] // cfg.patch_size[2])
    row = {"variant": variant, "history": history, "capacity": capacity, "chunk": chunk, "steps": args.steps,
           "tokens_per_frame": tpf, "keys_per_query": keys_per_query(cfg, history, chunk, tpf),
           "attention": cfg.attention, "gelu": cfg.gelu, "layer_unroll": cfg.layer_unroll,
           "linear_layout": "row_major" if cfg.row_major_linear else "xla",  # "auto" resolved
           "sgm_backend": cfg.memory.backend if cfg.memory else None,
           "memory": {k: getattr(cfg.memory, k) for k in ("blocks_per_frame", "block_slots", "top_k", "window")}
           if cfg.memory else None}
    settings = engine.SamplerSettings(steps=args.steps, guidance=args.guidance)
    cfg_on = settings.uses_cfg(True)
    shard = RolloutMesh.from_spec(args.mesh, cfg, guidance=args.guidance, option="--mesh")  # raises before work
    row["mesh"] = dict(shard.mesh.shape) if shard else None
    row["forwards_per_chunk"] = f"{args.steps} x batch {2 if cfg_on else 1} + commit x batch 1"

    def bench():
        check_xla_options(args.xla_option_sets)  # an unknown option fails here, in seconds
        t0 = time.perf_counter()
        if variant not in model_cache:
            model_cache.clear()
            gc.collect()
            model_cache[variant] = build_model(cfg, args.seed)
        graphdef, state = model_cache[variant]
        model = nnx.merge(graphdef, state)
        if shard is not None:  # parameters by PARAM_RULES (the model cache keeps the one-device copy)
            shard.shard_model(model)
            state = nnx.state(model)
        row["model_s"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        cache = random_cache(model, cfg, capacity, hw, history, args.seed + 1 + history)
        if shard is not None:
            cache = jax.block_until_ready(shard.place_cache(cache))
            per_device = shard.cache_bytes_per_device(cache)
            row["cache_gb_per_device"] = {d: round(b / 2**30, 3) for d, b in per_device.items()}
        row["cache_gb"] = round(sum(x.nbytes for x in jax.tree.leaves(cache)) / 2**30, 3)
        row["cache_s"] = round(time.perf_counter() - t0, 2)
        del model

        rng = np.random.default_rng(args.seed + 2)
        noise = engine.chunk_noise(args.seed, 0, (1, chunk, *hw, cfg.in_channels))
        context = jnp.asarray(rng.standard_normal((1, geo["text_rows"], cfg.text_dim)), jnp.float32)
        cond = jnp.asarray(0.5 * rng.standard_normal((1, chunk, cfg.dim)), jnp.float32)
        if shard is not None:
            noise, context, cond = shard.replicate((noise, context, cond))

        def put_length(n):
            return shard.replicate(jnp.int32(n)) if shard else jax.device_put(jnp.int32(n), jax.devices()[0])

        def step(state, cache, noise, context, cond):
            return engine.chunk_step(nnx.merge(graphdef, state), cache, noise, context, cond, settings, shard=shard)

        lowered = jax.jit(step, donate_argnums=(1,)).lower(state, cache, noise, context, cond)
        executables, compile_s = [], []
        for options in args.xla_option_sets:  # one executable per compile-option set (usually just XLA's defaults)
            t0 = time.perf_counter()
            executables.append(lowered.compile(compiler_options=options or None))
            compile_s.append(round(time.perf_counter() - t0, 2))
        compiled = executables[0]
        row["compile_s"] = compile_s[0]
        row["xla_memory_gb"] = memory_analysis_gb(compiled)

        holder = {"cache": cache}
        del cache

        def call(exe=compiled):
            x0, new = exe(state, holder.pop("cache"), noise, context, cond)
            # Back to `history` committed latents: the next call recomputes the same chunk from the same history
            # (the commit just rewrote slots [history, history + chunk)).
            holder["cache"] = new.replace(length=put_length(history))
            return jax.block_until_ready((x0, new.length))

        runs = [[] for _ in executables]
        last = [None] * len(executables)
        clocks = ClockLog()
        try:
            for i in range(args.warmup + args.repeats):
                if i == args.warmup:
                    clocks.start()
                for j, exe in enumerate(executables):  # the sets interleaved: drifts of the GPU hit them alike
                    t0 = time.perf_counter()
                    last[j], new_length = call(exe)
                    dt = time.perf_counter() - t0
                    if i == 0 and j == 0:
                        row["first_call_s"] = round(dt, 4)
                    if i == 0 and int(new_length) != history + chunk:
                        raise RuntimeError(f"commit did not advance the cache: length {int(new_length)}, "
                                           f"expected {history + chunk}")
                    if i >= args.warmup:
                        runs[j].append(dt)
        finally:  # never leave nvidia-smi running
            row["gpu_clocks"] = clocks.stop()
        x0 = last[0]
        if args.xla_options is not None:
            ref = np.asarray(x0, np.float32)
            scale = float(np.abs(ref).max()) or 1.0
            row["xla_options"] = [
                {"options": opts, "label": xla_options_label(opts), "compile_s": cs,
                 "runs_s": [round(r, 4) for r in rs], "s_per_chunk": round(statistics.median(rs), 4),
                 "ratio": round(statistics.median(rs) / statistics.median(runs[0]), 4),
                 "x0_max_diff_rel": float(np.abs(np.asarray(out, np.float32) - ref).max() / scale)}
                for opts, cs, rs, out in zip(args.xla_option_sets, compile_s, runs, last)]
        runs = runs[0]
        del last, executables
        row["nan"] = bool(not np.isfinite(np.asarray(x0, np.float32)).all())
        if args.dump:
            pathlib.Path(args.dump).mkdir(parents=True, exist_ok=True)
            np.save(pathlib.Path(args.dump) / f"{variant}_{history}.npy", np.asarray(x0, np.float32))
        if args.profile:
            from benchmarks.trace_summary import summarise

            trace_dir = pathlib.Path(args.profile) / f"{variant}_{history}"
            with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
                call()
            row["profile"] = summarise(trace_dir, top=30)
            print(f"--- profile: one chunk step of {variant} at history {history} ---\n{row['profile']}", flush=True)
        holder.clear()
        del compiled
        s = statistics.median(runs)
        return {"status": "ok", "runs_s": [round(r, 4) for r in runs], "s_per_chunk": round(s, 4),
                "fps": round(chunk * FRAMES_PER_LATENT / s, 3)}

    row.update(guarded(bench))
    row["peak_gb"] = jax_peak_gb()
    if shard is not None:
        row["peak_gb_per_device"] = device_peaks_gb(shard.mesh.devices.flat)
    gc.collect()
    return row


def child_args(args) -> list[str]:
    """The options a case's child process (`--isolate`) needs to run the case as the parent was asked to: every
    option but the case list (--variants, --history), the isolation and the output."""
    common = ["--steps", str(args.steps), "--guidance", str(args.guidance), "--sgm-backend", args.sgm_backend,
              "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.attention:
        common += ["--attention", args.attention]
    if args.gelu:
        common += ["--gelu", args.gelu]
    if args.layer_unroll is not None:
        common += ["--layer-unroll", str(args.layer_unroll)]
    if args.linear_layout:
        common += ["--linear-layout", args.linear_layout]
    if args.memory:
        common += ["--memory", args.memory]
    if args.mesh:
        common += ["--mesh", args.mesh]
    if args.small:
        common.append("--small")
    if args.profile:
        common += ["--profile", args.profile]
    if args.dump:
        common += ["--dump", args.dump]
    if args.xla_options is not None:
        common += ["--xla-options", args.xla_options]
    return common


def run_isolated(variant: str, history: int, args, argv_common):
    """The case in a child process (fresh GPU allocator): its own peak memory, nothing else on the device."""
    record, code = run_child(pathlib.Path(__file__).resolve(), [*argv_common, "--variants", variant, "--history",
                                                               str(history), "--no-isolate"], cwd=ROOT)
    if record is not None:
        return record["rows"][0], record.get("jax")
    return {"variant": variant, "history": history, **child_failure(code)}, None


# ---------------------------------------------------------------- report
def ratio_of(rows, row):
    if row["variant"] != "decmem" or row.get("status") != "ok":
        return None
    dense = next((r for r in rows if r["variant"] == "dense" and r["history"] == row["history"]
                  and r.get("status") == "ok"), None)
    return None if dense is None else round(row["s_per_chunk"] / dense["s_per_chunk"], 3)


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows, args):
    hdr = (f"{'variant':8} {'history':>7} {'keys/query':>10} {'s/chunk':>9} {'FPS':>7} {'peak GB':>8} "
           f"{'cache GB':>9} {'cache GB/dev':>12} {'XLA temp GB':>11} {'compile s':>9} {'DecMem/dense':>12}")
    print(hdr + "\n" + "-" * len(hdr))
    for r in sorted(rows, key=lambda r: (r["history"], r["variant"])):
        ok = r.get("status") == "ok"
        temp = (r.get("xla_memory_gb") or {}).get("temp")
        per_dev = max((r.get("cache_gb_per_device") or {}).values(), default=r.get("cache_gb"))
        s = fmt(r["s_per_chunk"], ".3f") if ok else r.get("status", "?")
        if ok and r.get("nan"):
            s += " NaN!"
        print(f"{r['variant']:8} {r['history']:>7} {fmt(r.get('keys_per_query'), 'd'):>10} {s:>9} "
              f"{fmt(r.get('fps') if ok else None, '.2f'):>7} {fmt(r.get('peak_gb'), '.2f'):>8} "
              f"{fmt(r.get('cache_gb'), '.2f'):>9} {fmt(per_dev, '.2f'):>12} {fmt(temp, '.2f'):>11} "
              f"{fmt(r.get('compile_s'), '.1f'):>9} "
              f"{fmt(ratio_of(rows, r), '.3f'):>12}")
    print(f"# paper (DecMem, as reported): {PAPER['s_per_chunk']} s/chunk, {PAPER['fps']} FPS "
          f"(16 frames / {PAPER['s_per_chunk']} s = {16 / PAPER['s_per_chunk']:.2f} FPS)")
    for r in rows:
        if r.get("status") not in ("ok", None):
            print(f"# {r['variant']} H={r['history']}: {r['status']}: {r.get('error', '')}")
        elif r.get("gpu_clocks"):
            print(f"# {r['variant']} H={r['history']}: {describe_clocks(r['gpu_clocks'])}")
    ab = [r for r in rows if r.get("xla_options")]
    if ab:
        print(f"\n{'variant':8} {'history':>7} {'s/chunk':>9} {'ratio':>7} {'x0 diff':>9} {'compile s':>9}  "
              "XLA options")
        for r in ab:
            for o in r["xla_options"]:
                print(f"{r['variant']:8} {r['history']:>7} {o['s_per_chunk']:>9.3f} {o['ratio']:>7.3f} "
                      f"{o['x0_max_diff_rel']:>9.1e} {o['compile_s']:>9.1f}  {o['label']}")
        print("# ratio = s/chunk over the first set's, timed interleaved in the same process; x0 diff = max |x0 - "
              "the first set's x0| / max |x0| of the generated chunk (bf16: up to ~1e-2 is rounding)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    geo = GEOMETRY["small" if args.small else "full"]
    if args.small and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # CPU smoke run: XLA:CPU's LLVM passes are most of the compile time of the tiny step (about 2x faster
        # without them). Only effective if no JAX backend exists yet (fresh process; children inherit it).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    cases = [(v, h) for v in args.variants for h in args.history]
    record = {"command": [sys.executable, "benchmarks/rollout.py", *argv],
              "args": vars(args), "paper": PAPER,
              "setup": {"config": geo["config"], "latent_hw": geo["hw"], "chunk": geo["chunk"],
                        "frames_per_chunk": geo["chunk"] * FRAMES_PER_LATENT, "dtype": geo["dtype"],
                        "param_dtype": geo["dtype"], "memory": geo["memory"], "guidance": args.guidance,
                        "solver": "unipc", "cache_batch": 1, "weights": "random",
                        "cache_fill": "random N(0,1) keys/values written directly, length set to H",
                        "isolated": args.isolate,
                        "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")},
              "jax": None, "rows": []}
    print(f"rollout benchmark: {geo['config']} ({geo['dtype']} compute and weights), latents {geo['hw']}, "
          f"chunk {geo['chunk']}, {args.steps} steps, guidance {args.guidance}, SGM backend {args.sgm_backend}; "
          f"cases {cases}", flush=True)

    common = child_args(args)

    model_cache: dict = {}
    for variant, history in cases:
        t0 = time.perf_counter()
        print(f"--- {variant}, history {history} ...", flush=True)
        if args.isolate:
            row, info = run_isolated(variant, history, args, common)
            record["jax"] = record["jax"] or info
        else:
            row = run_case(variant, history, args, model_cache)
            record["jax"] = record["jax"] or jax_info()
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"    {json.dumps(row)}", flush=True)
        record["rows"].append(row)
        write_record(args.json, record)
    model_cache.clear()
    for r in record["rows"]:
        r["decmem_over_dense"] = ratio_of(record["rows"], r)
    print()
    print_table(record["rows"], args)
    write_record(args.json, record)
    return record


if __name__ == "__main__":
    main()
