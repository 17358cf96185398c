#!/usr/bin/env python
"""Wan2.1 DiT forward pass: this JAX port vs diffusers/PyTorch on the same device, with the same random weights.

Cases (real 1.3B config, bf16 compute, weights stored in bf16 on both sides):
  bidir  832x480 video: latents [1, 21, 60, 104, 16] -> 32,760 tokens, one bidirectional forward.
  chunk  352x640 video: one chunk of 4 latent frames (4 x 880 = 3,520 tokens) against a KV cache holding 56
         committed frames (49,280 cached tokens): JAX `WanDiT.forward_chunk`; torch: diffusers with the KV-cache
         processor of `benchmarks/wan_torch_cache.py` on every attn1 (Self-Forcing's inference scheme).
Text context [1, 512, 4096] for both. Before timing, outputs are compared: rel err = max|jax - torch| / max|torch|.

Memory: JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of the GPU; it is set to 0.6 here (before jax is imported)
unless already set, so the torch caching allocator gets the other ~40% (about 32 GB on an 80 GB H100). Peaks seen
on an H100: torch 4.2 GB (bidir) and 12 GB (chunk: 2.8 GB weights + 9.7 GB KV cache + activations); JAX 4.2 GB for
bidir with cudnn, under 29 GB for everything else. The JAX `xla` attention backend materialises the
[12, 32760, 32760] float32 scores of the bidir case (51.5 GB), which cannot fit: it is reported as OOM (XLA's
autotuner logs the failed allocations first; TF_CPP_MIN_LOG_LEVEL=3 quietens it).

Usage:
  python benchmarks/dit_forward.py                          # GPU: both cases, JAX cudnn + xla vs torch
  python benchmarks/dit_forward.py --small --attention xla  # CPU smoke run: tiny config, fp32, seconds
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import guarded, jax_block, jax_info, jax_peak_gb, timed, write_record  # noqa: E402
from decmem_jax.models.config import DiTConfig, get_config  # noqa: E402
from decmem_jax.models.dit import WanDiT  # noqa: E402

# Geometry in latent frames and latent pixels (the patch grid is H/2 x W/2).
CASES = {
    "full": {"bidir": dict(frames=21, hw=(60, 104)), "chunk": dict(frames=4, cached=56, capacity=60, hw=(44, 80))},
    "small": {"bidir": dict(frames=5, hw=(8, 8)), "chunk": dict(frames=2, cached=4, capacity=6, hw=(8, 8))},
}
TIMESTEP = 937.5  # one timestep for every frame (Self-Forcing's second denoising step)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="bidir,chunk", help="comma list of: bidir, chunk")
    p.add_argument("--attention", default="cudnn,mosaic,xla", help="comma list of JAX attention backends to time")
    p.add_argument("--residual", default="float32",
                   help="comma list of DiTConfig.residual_dtype values to time (float32 = original Wan, "
                        "compute = bf16 residual like diffusers)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first one compiles)")
    p.add_argument("--config", default=None, help="DiT preset (default wan2.1-t2v-1.3b; tiny with --small)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="compute and weight dtype on both sides (default bfloat16; float32 with --small)")
    p.add_argument("--small", action="store_true", help="tiny shapes that run on a CPU in seconds")
    p.add_argument("--no-torch", action="store_true", help="JAX only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="output path (default $OUT/dit_forward.json or out/dit_forward.json)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, trace one more JAX call per case into DIR and print device time per kernel")
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    args.attention = [a for a in args.attention.split(",") if a]
    for c in args.cases:
        if c not in CASES["full"]:
            p.error(f"unknown case {c!r}; expected bidir and/or chunk")
    for a in args.attention:
        if a not in ("cudnn", "mosaic", "xla"):
            p.error(f"unknown JAX attention backend {a!r}; expected cudnn, mosaic and/or xla")
    args.config = args.config or ("tiny" if args.small else "wan2.1-t2v-1.3b")
    args.dtype = args.dtype or ("float32" if args.small else "bfloat16")
    if args.json is None:
        out_dir = os.environ.get("OUT")
        args.json = str(pathlib.Path(out_dir) / "dit_forward.json") if out_dir else "out/dit_forward.json"
    return args


# ----------------------------------------------------------------------------------------------------------------
# FLOP model. Matmul FLOPs only (2 per multiply-add); norms, RoPE, softmax and elementwise work are ignored.
#   self-attention    L * 4 * B * H * Sq * Skv * Dh                 (QK^T and PV; Skv = cached + chunk tokens)
#   cross-attention   L * 4 * B * H * Sq * Ltext * Dh
#   block linears     L * 2 * B * (Sq * (6 D^2 + 2 D Dffn) + Ltext * 2 D^2)   (self q,k,v,o + cross q,o + FFN on
#                     the video tokens; cross k,v on the text rows)
#   embed / head      2 * B * (Sq * (P Cin D + D P Cout) + Ltext * (Dtext D + D^2))   (P = patch volume)
# i.e. roughly "attention 4*B*H*Sq*Skv*D + linear layers 2*params*tokens".
# ----------------------------------------------------------------------------------------------------------------
def flops(cfg: DiTConfig, b: int, sq: int, skv: int) -> dict:
    d, L, h, dh, lt = cfg.dim, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.text_len
    patch = int(np.prod(cfg.patch_size))
    attn = L * 4 * b * h * sq * skv * dh + L * 4 * b * h * sq * lt * dh
    linear = L * 2 * b * (sq * (6 * d * d + 2 * d * cfg.ffn_dim) + lt * 2 * d * d)
    linear += 2 * b * (sq * (patch * cfg.in_channels * d + d * patch * cfg.out_channels) + lt * (cfg.text_dim * d + d * d))
    return {"attention": attn, "linear": linear, "total": attn + linear}


# ---------------------------------------------------------------- JAX side
def make_jax_model(cfg: DiTConfig, seed: int):
    """Random WanDiT parameter state, filled leaf by leaf (cheaper to compile than the module's own init): kernels
    N(0, 1/fan_in), modulation tables N(0, 1/dim) (as WanDiT inits them), and, unlike a zero/one init that would hide
    layout bugs, norm scales 1 + 0.1 N(0, 1) and biases 0.02 N(0, 1)."""
    abstract = nnx.state(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(seed))))
    flat = nnx.to_flat_state(abstract)
    specs = [([str(p) for p in path], var.get_value().shape, var.get_value().dtype) for path, var in flat]

    @jax.jit
    def fill(key):
        sizes = [int(np.prod(shape)) for _, shape, _ in specs]
        pool = jax.random.normal(key, (sum(sizes),), jnp.float32)  # one RNG call: compiles far faster than many
        offsets = np.cumsum([0] + sizes)
        values = []
        for i, (names, shape, dtype) in enumerate(specs):
            noise = pool[offsets[i]:offsets[i + 1]].reshape(shape)
            if names[-1] == "kernel":
                noise = noise / np.sqrt(int(np.prod(shape[1 if names[0] == "blocks" else 0:-1])))
            elif names[-1] == "modulation":
                noise = noise / np.sqrt(cfg.dim)
            elif names[-1] == "scale":
                noise = 1.0 + 0.1 * noise
            elif names[-1] == "bias":
                noise = 0.02 * noise
            else:
                raise ValueError(f"no init rule for parameter {'/'.join(names)}")
            values.append(noise.astype(dtype))
        return values

    for (_, var), value in zip(flat, fill(jax.random.key(seed))):
        var.set_value(value)
    return nnx.from_flat_state(flat)


def graphdef_for(cfg: DiTConfig):
    return nnx.split(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))[0]


# ---------------------------------------------------------------- cases
def run_case(name, geo, cfg, args, graphdefs, state, torch_side):
    rng = np.random.default_rng(args.seed + (0 if name == "bidir" else 1))
    b, (hh, ww), f = 1, geo["hw"], geo["frames"]
    tpf = (hh // cfg.patch_size[1]) * (ww // cfg.patch_size[2])
    sq = f * tpf
    skv = sq + geo.get("cached", 0) * tpf
    latents = rng.standard_normal((b, f, hh, ww, cfg.in_channels), dtype=np.float32)
    context = rng.standard_normal((b, cfg.text_len, cfg.text_dim), dtype=np.float32)
    fl = flops(cfg, b, sq, skv)
    res = {"tokens": sq, "kv_tokens": skv, "tokens_per_frame": tpf, "flops": fl,
           "shapes": {"latents": list(latents.shape), "context": list(context.shape)}, "jax": {}, "torch": None}
    if name == "chunk":
        res["shapes"].update(cached_frames=geo["cached"], cache_capacity_frames=geo["capacity"],
                             cache_kv=[cfg.num_layers, b, geo["capacity"] * tpf, cfg.num_heads, cfg.head_dim])

    x_j, ctx_j = jnp.asarray(latents), jnp.asarray(context)
    cache = None
    if name == "chunk":
        model0 = nnx.merge(next(iter(graphdefs.values())) if graphdefs else graphdef_for(cfg), state)
        abstract = jax.eval_shape(lambda: model0.init_cache(b, geo["capacity"], geo["hw"]))
        kk, kv = jax.random.split(jax.random.key(args.seed + 7))
        # N(0, 1) like RMS-normed keys; one layer per RNG call (the whole cache has more than 2^31 elements).
        layer_shape = abstract.k.shape[1:]
        rand = jax.jit(lambda k: jax.vmap(lambda kl: jax.random.normal(kl, layer_shape, abstract.k.dtype))(
            jax.random.split(k, cfg.num_layers)))
        cache = abstract.replace(k=rand(kk), v=rand(kv), length=jnp.int32(geo["cached"]))
        del model0
    t_j = jnp.full((b, f) if name == "chunk" else (b,), TIMESTEP, jnp.float32)

    outputs = {}
    for backend, gd in graphdefs.items():

        def bench(gd=gd):
            if name == "bidir":
                fn = jax.jit(lambda st, x, t, c: nnx.merge(gd, st)(x, t, c))
                call = lambda: fn(state, x_j, t_j, ctx_j)  # noqa: E731
            else:
                fn = jax.jit(lambda st, x, t, c, kvc: nnx.merge(gd, st).forward_chunk(x, t, c, kvc))
                call = lambda: fn(state, x_j, t_j, ctx_j, cache)  # noqa: E731
            out, stats = timed(call, jax_block, args.warmup, args.repeats)
            outputs[backend] = np.asarray(out.astype(jnp.float32))
            if args.profile:
                trace_dir = pathlib.Path(args.profile) / f"{name}_{backend}"
                with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
                    jax_block(call())
                from benchmarks.trace_summary import summarise
                print(f"--- profile {name} / jax {backend} ---\n{summarise(trace_dir)}", flush=True)
            return {"status": "ok", **stats, "nan": bool(np.isnan(outputs[backend]).any())}

        res["jax"][backend] = guarded(bench)
        res["jax"][backend]["peak_gb_so_far"] = jax_peak_gb()

    if torch_side is not None:
        res["torch"], ref = torch_side.run(name, geo, cfg, latents, context, cache, args)
        if ref is not None:
            scale = float(np.nanmax(np.abs(ref)))
            for backend, out in outputs.items():
                res["jax"][backend]["rel_err"] = float(np.nanmax(np.abs(out - ref)) / scale) if scale else float("nan")
    del cache, x_j, ctx_j
    gc.collect()
    return res


class TorchSide:
    """diffusers WanTransformer3DModel with the JAX weights, on the GPU when there is one."""

    def __init__(self, cfg: DiTConfig, flat_params: dict, dtype: str):
        import torch

        from benchmarks import wan_torch_cache as wtc

        self.torch, self.wtc = torch, wtc
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, dtype)
        self.model = wtc.build_diffusers(cfg, self.device, self.dtype)
        wtc.load_jax_params(self.model, flat_params, cfg)

    def sync(self, out):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        return out

    def run(self, name, geo, cfg, latents, context, jax_cache, args):
        torch, wtc, model = self.torch, self.wtc, self.model
        x = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 4, 1, 2, 3))).to(self.device, self.dtype)
        ctx = torch.from_numpy(context).to(self.device, self.dtype)
        t = torch.full((latents.shape[0],), TIMESTEP, dtype=torch.float32, device=self.device)
        old, holder = None, {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def bench():
            nonlocal old
            with torch.no_grad():
                if name == "chunk":
                    layers = range(cfg.num_layers)
                    cache = wtc.TorchKVCache([wtc.jax_to_torch(jax_cache.k[i], self.device) for i in layers],
                                             [wtc.jax_to_torch(jax_cache.v[i], self.device) for i in layers],
                                             jax_cache.tokens_per_frame, int(jax_cache.length))
                    cache.prepare_chunk(model, geo["frames"], (x.shape[3] // 2, x.shape[4] // 2))
                    old = wtc.install_cache(model, cache)
                call = lambda: model(x, t, ctx, return_dict=False)[0]  # noqa: E731
                out, stats = timed(call, self.sync, args.warmup, args.repeats)
                holder["out"] = out.float().cpu().numpy().transpose(0, 2, 3, 4, 1)
            peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None
            return {"status": "ok", **stats, "nan": bool(np.isnan(holder["out"]).any()), "peak_gb": peak}

        try:
            res = guarded(bench)
        finally:
            if old is not None:
                wtc.restore(model, old)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return res, holder.get("out")

    def info(self, cfg, cases):
        torch = self.torch
        info = {"device": torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu",
                "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                "rope_table_dtype": str(self.model.rope.freqs_cos.dtype)}
        try:
            import diffusers
            info["diffusers"] = diffusers.__version__
        except Exception:  # noqa: BLE001
            pass
        info["sdpa"] = {name: self.wtc.sdpa_info(self.device, self.dtype, cfg.num_heads, cfg.head_dim, c["tokens"],
                                                 c["kv_tokens"]) for name, c in cases.items()}
        return info


def fmt_ms(r):
    if r is None:
        return "-"
    return f"{r['median_ms']:.2f}" if r.get("status") == "ok" else r.get("status", "?")


def print_table(results):
    hdr = (f"{'case':6} {'tokens q/kv':>13} {'JAX variant':18} {'JAX ms':>9} {'torch ms':>9} {'JAX/torch':>9} "
           f"{'rel err':>9} {'JAX TF/s':>9} {'torch TF/s':>10} {'TFLOP':>8}")
    print(hdr + "\n" + "-" * len(hdr))
    for name, c in results.items():
        tf = c["flops"]["total"] / 1e12
        tr = c["torch"]
        t_ok = tr is not None and tr.get("status") == "ok"
        for backend, jr in (c["jax"] or {"-": None}).items():
            j_ok = jr is not None and jr.get("status") == "ok"
            ratio = f"{jr['median_ms'] / tr['median_ms']:.3f}" if j_ok and t_ok else "-"
            err = f"{jr['rel_err']:.2e}" if j_ok and "rel_err" in jr else "-"
            if (j_ok and jr["nan"]) or (t_ok and tr["nan"]):
                err += " NaN!"
            jtf = f"{tf / jr['median_ms'] * 1e3:.1f}" if j_ok else "-"
            ttf = f"{tf / tr['median_ms'] * 1e3:.1f}" if t_ok else "-"
            print(f"{name:6} {c['tokens']:>6}/{c['kv_tokens']:<6} {backend:18} {fmt_ms(jr):>9} {fmt_ms(tr):>9} "
                  f"{ratio:>9} {err:>9} {jtf:>9} {ttf:>10} {tf:>8.3f}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    gpu_only = [a for a in args.attention if a in ("cudnn", "mosaic")]
    if jax.default_backend() != "gpu" and gpu_only:
        print(f"note: JAX platform is {jax.default_backend()!r}; skipping the GPU attention backends {gpu_only}")
        args.attention = [a for a in args.attention if a not in gpu_only]
    cfg = get_config(args.config, dtype=args.dtype, param_dtype=args.dtype, attention="xla").for_inference()
    geos = {c: CASES["small" if args.small else "full"][c] for c in args.cases}

    t0 = time.perf_counter()
    # One JAX variant per (attention backend, residual dtype); labels like "cudnn" or "cudnn/res=compute".
    graphdefs = {a if r == "float32" else f"{a}/res={r}": graphdef_for(cfg.replace(attention=a, residual_dtype=r))
                 for a in args.attention for r in args.residual.split(",")}
    state = make_jax_model(cfg, args.seed)
    jax.block_until_ready(state)
    print(f"JAX model ready ({time.perf_counter() - t0:.1f} s): {args.config}, {args.dtype}, "
          f"{sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state)) / 1e9:.3f} B params")
    torch_side = None
    if not args.no_torch:
        t0 = time.perf_counter()
        flat = {tuple(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}
        torch_side = TorchSide(cfg, flat, args.dtype)
        del flat
        print(f"torch model ready ({time.perf_counter() - t0:.1f} s) on {torch_side.device}")

    results = {}
    for name, geo in geos.items():
        print(f"--- case {name} ...", flush=True)
        results[name] = run_case(name, geo, cfg, args, graphdefs, state, torch_side)
    print()
    print_table(results)

    record = {"command": [sys.executable, *sys.argv] if argv is None else ["dit_forward.main", *argv],
              "args": {k: v for k, v in vars(args).items()}, "config": json.loads(cfg.to_json()),
              "timestep": TIMESTEP, "jax": jax_info(), "cases": results}
    if torch_side is not None:
        record["torch"] = torch_side.info(cfg, results)
        print(f"torch SDPA: {record['torch']['sdpa']}")
    write_record(args.json, record)
    return record


if __name__ == "__main__":
    main()
