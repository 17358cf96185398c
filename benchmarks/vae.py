#!/usr/bin/env python
"""Wan2.1 VAE: this JAX port vs diffusers' AutoencoderKLWan (PyTorch) on the same device, with the same random weights.

Cases (real `wan2.1-vae` config, float32 by default as Wan runs its VAE; B=1, 352x640):
  encode  81 frames -> 21 latents: whole-clip jitted `WanVAE.encode` vs diffusers `encode(x).latent_dist.mean`
          (diffusers runs the encoder 1 frame, then 4 at a time, with its per-conv cache); the torch mean is
          normalised with the same constants, rel err = max|jax - torch| / max|torch|.
  decode  21 latents -> 81 frames: whole-clip jitted `WanVAE.decode` vs diffusers `decode(z_raw).sample` (one latent
          frame at a time internally), z_raw = latents * std + mean.
  encode_chunked / decode_chunked  the same clips through our streaming steps (frame 0, then 4 frames / C latents
          per jitted step; outputs concatenated on device): the same chunking diffusers uses internally, and the
          path to use for long clips. The whole-sequence `encode`/`decode` hold every frame's full-resolution
          activations at once (they ran out of a 36 GB cap at 81 frames of 352x640 in bf16 on an H100) and run last.
  stream  150 latents -> 600 frames with `vae_stream.stream_decode(vae, latents, chunk=C)`; every yielded chunk is
          copied to host (np.asarray, as a video writer would) and dropped. Timed once after a warm-up pass on a few
          latents (compiles every chunk shape). Bounded memory: JAX's peak_bytes_in_use is process-wide and
          monotonic, so the stream case runs FIRST (before the other cases, whatever --cases says), decodes 38
          latents (150 frames), reads the peak, then decodes all 150 latents (600 frames) and reads it again: the
          two must be about equal. Torch peer: diffusers `decode` of the same 38 and then 150 latents (it loops over
          latent frames but returns the whole video; the timed run includes its copy to host), with
          torch.cuda.reset_peak_memory_stats() before each and max_memory_allocated() after; OOM is reported.
          Its rel err compares the 38-latent outputs.
Goal: JAX time <= 0.8x torch for every case, and a flat JAX peak for the stream.

Memory: both frameworks share one GPU. XLA_PYTHON_CLIENT_MEM_FRACTION is set to 0.45 here (before jax is imported)
unless already set: the cap of JAX's BFC allocator (~36 GB of an 80 GB H100). XLA_PYTHON_CLIENT_PREALLOCATE defaults
to false here, so JAX grows its pool on demand up to that cap instead of reserving it up front; the torch caching
allocator can use everything JAX has not taken (at least the other 55%), and peak_bytes_in_use is still JAX's own
peak of live buffers (XLA's conv autotuning scratch included; `peak_gb_before` in the JSON is the peak after the
stream's warm-up). XLA's memory analysis (on CPU) puts the whole-clip encode and decode at ~26 GB of temporaries in
fp32, under the cap; the stream cache is ~2.1 GB. OOM on either side is reported, not raised.

Precision: with a float32 compute dtype our VAE always asks for full float32 convolutions (Precision.HIGHEST, no
TF32), so the default `--precision highest` also turns TF32 off in torch (cudnn/matmul allow_tf32 = False): both sides
then compute the same float32 function, as Wan's fp32 VAE intends. `--precision default` leaves torch on its TF32
default (an unequal comparison, for reference only). `--dtype bfloat16` compares the bf16 fast paths.

Usage:
  python benchmarks/vae.py                      # GPU: encode, decode, stream (fp32)
  python benchmarks/vae.py --small              # CPU smoke run: tiny config, small shapes, seconds
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

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
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import guarded, jax_block, jax_info, jax_peak_gb, timed, write_record  # noqa: E402
from decmem_jax.convert.vae_keymap import iter_export_vae  # noqa: E402
from decmem_jax.format import frames_for_latents  # noqa: E402
from decmem_jax.models.vae import VAEConfig, WanVAE, get_vae_config  # noqa: E402

# Pixel sizes (H, W); latents are H/8 x W/8. Stream: `first` latents are decoded before `latents` (memory check).
CASES = {
    "full": {"encode": dict(frames=81, hw=(352, 640)), "decode": dict(latents=21, hw=(352, 640)),
             "stream": dict(first=38, latents=150, hw=(352, 640))},
    "small": {"encode": dict(frames=9, hw=(32, 48)), "decode": dict(latents=3, hw=(32, 48)),
              "stream": dict(first=2, latents=5, hw=(32, 32))},
}
# stream first (JAX's peak counter only grows), then the chunked whole-clip cases, and the whole-sequence ones last
# (at 81 frames of 352x640 they need tens of GB and may OOM; see run_whole).
ORDER = ("stream", "encode_chunked", "decode_chunked", "encode", "decode")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(ORDER), help=f"comma list of: {', '.join(ORDER)}")
    p.add_argument("--repeats", type=int, default=5, help="timed runs for encode/decode (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first, the first compiles (default 2; 1 "
                   "with --small)")
    p.add_argument("--stream-chunk", type=int, default=1, help="latent frames per stream_decode step")
    p.add_argument("--config", default=None, help="VAE preset (default wan2.1-vae; tiny with --small)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute and weight dtype on both sides")
    p.add_argument("--precision", choices=("default", "highest"), default="highest",
                   help="float32 precision: highest = no TF32 on either side (our fp32 VAE never uses TF32); "
                        "default = torch's TF32 default")
    p.add_argument("--small", action="store_true", help="tiny config and shapes that run on a CPU in seconds")
    p.add_argument("--no-torch", action="store_true", help="JAX only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="output path (default $OUT/vae.json or out/vae.json)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, trace one more JAX call per case into DIR and print device time per kernel")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in ORDER:
            p.error(f"unknown case {c!r}; expected some of {', '.join(ORDER)}")
    args.cases = [c for c in ORDER if c in cases]  # stream first, see the docstring
    args.config = args.config or ("tiny" if args.small else "wan2.1-vae")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 2)
    if args.json is None:
        out_dir = os.environ.get("OUT")
        args.json = str(pathlib.Path(out_dir) / "vae.json") if out_dir else "out/vae.json"
    return args


# ---------------------------------------------------------------- models
def make_params(cfg: VAEConfig, seed: int) -> dict:
    """Random flat params {path: float32 array} (rounded to bf16 values when param_dtype is bf16, so both sides hold
    identical weights): kernels N(0, 1/fan_in), RMS-norm gammas 1 + 0.2 N(0, 1), biases 0.1 N(0, 1)."""
    abstract = nnx.state(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(seed)
    flat = {}
    for path, var in nnx.to_flat_state(abstract):
        names, shape = tuple(str(p) for p in path), tuple(var.get_value().shape)
        noise = rng.standard_normal(shape, dtype=np.float32)
        if names[-1] == "kernel":
            v = noise / np.float32(np.sqrt(np.prod(shape[:-1])))
        elif names[-1] == "gamma":
            v = 1.0 + 0.2 * noise
        elif names[-1] == "bias":
            v = 0.1 * noise
        else:
            raise ValueError(f"no init rule for parameter {'/'.join(names)}")
        if cfg.param_dtype == "bfloat16":
            v = v.astype(ml_dtypes.bfloat16).astype(np.float32)
        flat[names] = v
    return flat


def make_jax_model(cfg: VAEConfig, flat: dict):
    """(graphdef, state, module) with `flat` loaded."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
    fs = nnx.to_flat_state(state)
    for path, var in fs:
        var.set_value(jnp.asarray(flat[tuple(str(p) for p in path)], cfg.weight_dtype))
    state = nnx.from_flat_state(fs)
    return graphdef, state, nnx.merge(graphdef, state)


def rel_err(y, r):
    y, r = np.asarray(y, np.float64), np.asarray(r, np.float64)
    scale = np.abs(r).max()
    return float(np.abs(y - r).max() / scale) if scale else float("nan")


class TorchSide:
    """diffusers AutoencoderKLWan with the JAX weights (iter_export_vae -> load_state_dict(strict=True))."""

    def __init__(self, cfg: VAEConfig, flat: dict, dtype: str, precision: str):
        import torch
        from diffusers import AutoencoderKLWan

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, dtype)
        if precision == "highest":
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        model = AutoencoderKLWan(
            base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
            attn_scales=[], temperal_downsample=list(cfg.temporal_downsample), dropout=0.0,
            latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std), in_channels=cfg.in_channels,
            out_channels=cfg.out_channels).eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in iter_export_vae(flat, cfg, "diffusers")},
                              strict=True)
        model.to(self.device)
        self.model = model if dtype == "float32" else model.to(self.dtype)

    def sync(self, out):
        return (self.torch.cuda.synchronize(), out)[1] if self.cuda else out

    def tensor(self, x: np.ndarray):  # [B, T, H, W, C] -> [B, C, T, H, W]
        return self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))).to(self.device, self.dtype)

    @staticmethod
    def numpy(t):
        return t.float().cpu().numpy().transpose(0, 2, 3, 4, 1)

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.empty_cache(), self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        return round(self.torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def timed_call(self, fn, args, holder):
        """Median-timed fn() -> tensor; its output (channels-last numpy) goes to holder["out"]."""
        def bench():
            self.reset_peak()
            with self.torch.no_grad():
                out, stats = timed(fn, self.sync, args.warmup, args.repeats)
                holder["out"] = self.numpy(out)
            return {"status": "ok", **stats, "peak_gb": self.peak_gb(), "nan": bool(np.isnan(holder["out"]).any())}
        try:
            return guarded(bench)
        finally:
            self.reset_peak()

    def info(self):
        torch, info = self.torch, {}
        info["device"] = torch.cuda.get_device_name(0) if self.cuda else "cpu"
        info.update(torch=torch.__version__, cudnn=torch.backends.cudnn.version() if self.cuda else None,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        info["diffusers"] = __import__("diffusers").__version__
        return info


# ---------------------------------------------------------------- cases
def profile(args, name, call):
    trace_dir = pathlib.Path(args.profile) / name
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        call()
    from benchmarks.trace_summary import summarise
    print(f"--- profile {name} / jax ---\n{summarise(trace_dir)}", flush=True)


def chunked_call(op, cfg, vae, x, decode_chunk):
    """A call that encodes/decodes the whole clip x with the streaming steps (what diffusers does internally: frame 0,
    then 4 frames / `decode_chunk` latents at a time), returning the concatenated output on device."""
    from decmem_jax.models import vae_stream as vs

    b, t, h, w = x.shape[:4]
    if op == "encode":
        first, step = vs.encode_steps(vae)
        template, size = vs.init_encode_state(vae, b, (h, w)), 4
    else:
        first, step = vs.decode_steps(vae)
        template, size = vs.init_decode_state(vae, b, (h, w)), decode_chunk
    if (t - 1) % size:
        raise ValueError(f"{op}: {t - 1} frames after the first do not split into chunks of {size}")

    def call():
        st = jax.tree.map(jnp.zeros_like, template)  # the steps donate their state: start from fresh zeros
        st, out = first(st, x[:, :1])
        outs = [out]
        for i in range(1, t, size):
            st, out = step(st, x[:, i:i + size])
            outs.append(out)
        return jnp.concatenate(outs, axis=1)

    return call


def run_whole(name, geo, cfg, args, jax_model, torch_side):
    """encode or decode of one whole clip, median of args.repeats on each side. `encode`/`decode` time the
    whole-sequence formulation (one XLA program; activations for every frame at once, so it needs a lot of memory at
    81 frames of 352x640); `encode_chunked`/`decode_chunked` time the streaming steps over the same clip."""
    graphdef, state, _ = jax_model
    op, chunked = name.split("_")[0], name.endswith("_chunked")
    rng = np.random.default_rng(args.seed + (1 if op == "encode" else 2))
    (hh, ww), sf, tf = geo["hw"], cfg.spatial_factor, cfg.temporal_factor
    mean, std = np.asarray(cfg.latents_mean, np.float32), np.asarray(cfg.latents_std, np.float32)
    if op == "encode":
        frames = geo["frames"]
        x = rng.uniform(-1.0, 1.0, (1, frames, hh, ww, cfg.in_channels)).astype(np.float32)
        out_shape = (1, 1 + (frames - 1) // tf, hh // sf, ww // sf, cfg.z_dim)
    else:
        frames = 1 + tf * (geo["latents"] - 1)
        x = rng.standard_normal((1, geo["latents"], hh // sf, ww // sf, cfg.z_dim)).astype(np.float32)
        out_shape = (1, frames, hh, ww, cfg.out_channels)
    res = {"shapes": {"input": list(x.shape), "output": list(out_shape)}, "frames": frames, "jax": None, "torch": None}
    holder = {}

    def bench():
        xj = jnp.asarray(x)
        if chunked:
            call = chunked_call(op, cfg, nnx.merge(graphdef, state), xj, args.stream_chunk)
        else:
            fn = jax.jit(lambda st, v: getattr(nnx.merge(graphdef, st), op)(v))
            call = lambda: fn(state, xj)  # noqa: E731
        out, stats = timed(call, jax_block, args.warmup, args.repeats)
        holder["out"] = np.asarray(out)
        del out
        if args.profile:
            profile(args, name, lambda: jax_block(call()))
        return {"status": "ok", **stats, "nan": bool(np.isnan(holder["out"]).any())}

    res["jax"] = guarded(bench)
    res["jax"]["peak_gb_so_far"] = jax_peak_gb()
    if torch_side is not None:
        tref = {}
        model = torch_side.model
        if op == "encode":
            xt = torch_side.tensor(x)
            res["torch"] = torch_side.timed_call(lambda: model.encode(xt).latent_dist.mean, args, tref)
            if "out" in tref:
                tref["out"] = (tref["out"] - mean) / std  # normalise like WanVAE.encode
        else:
            zt = torch_side.tensor(x * std + mean)
            res["torch"] = torch_side.timed_call(lambda: model.decode(zt).sample, args, tref)
        if "out" in holder and "out" in tref:
            res["jax"]["rel_err"] = rel_err(holder["out"], tref["out"])
    return res


def run_stream(geo, cfg, args, jax_model, torch_side):
    """Streaming decode of geo["latents"] latents, after one of geo["first"] (peak memory read after each)."""
    _, _, vae = jax_model
    (hh, ww), sf, tf, chunk = geo["hw"], cfg.spatial_factor, cfg.temporal_factor, args.stream_chunk
    n_first, n_all = geo["first"], geo["latents"]
    rng = np.random.default_rng(args.seed + 3)
    z = rng.standard_normal((1, n_all, hh // sf, ww // sf, cfg.z_dim)).astype(np.float32)
    frames = {n: 1 + tf * (n - 1) for n in (n_first, n_all)}
    res = {"shapes": {"latents": list(z.shape), "output": [1, frames[n_all], hh, ww, cfg.out_channels]},
           "chunk": chunk, "first_latents": n_first, "latents": n_all, "frames": frames[n_all],
           "jax": None, "torch": None}
    kept = {}
    from decmem_jax.models.vae_stream import stream_decode

    def consume(zj, keep=False):
        """Decodes zj chunk by chunk, copying each chunk to host; returns the number of frames (and keeps them)."""
        n, parts = 0, []
        for piece in stream_decode(vae, zj, chunk=chunk):
            host = np.asarray(piece)
            n += host.shape[1]
            if keep:
                parts.append(host)
        if keep:
            kept["out"] = np.concatenate(parts, axis=1)
        return n

    def bench():
        z_all = jnp.asarray(z)
        z_first, z_warm = z_all[:, :n_first], z_all[:, :min(n_all, 1 + chunk + 1)]  # warm-up: first, step, tail
        jax_block((z_first, z_warm))
        t0 = time.perf_counter()
        consume(z_warm)
        out = {"status": "ok", "warmup_ms": (time.perf_counter() - t0) * 1e3,
               "peak_gb_before": jax_peak_gb(), "note": "peak_gb is JAX's process-wide peak so far (monotonic)"}
        for key, zj, keep in (("first", z_first, True), ("all", z_all, False)):
            t0 = time.perf_counter()
            n = consume(zj, keep)
            ms = (time.perf_counter() - t0) * 1e3
            out[key] = {"latents": int(zj.shape[1]), "frames": n, "ms": ms, "frames_per_s": n / ms * 1e3,
                        "peak_gb": jax_peak_gb()}
        out["nan"] = bool(np.isnan(kept["out"]).any())
        if args.profile:
            profile(args, "stream", lambda: consume(z_warm))
        return out

    res["jax"] = guarded(bench)
    if torch_side is not None:
        torch, model = torch_side.torch, torch_side.model
        mean, std = np.asarray(cfg.latents_mean, np.float32), np.asarray(cfg.latents_std, np.float32)

        def tbench():
            out = {"status": "ok", "note": "diffusers decode of the whole latent sequence (frame by frame "
                                           "internally), including the copy of the video to host"}
            zt = torch_side.tensor(z * std + mean)
            with torch.no_grad():
                torch_side.sync(model.decode(zt[:, :, :2]).sample)  # warm-up (cuDNN handles, kernels)
                for key, n in (("first", n_first), ("all", n_all)):
                    torch_side.reset_peak()
                    t0 = time.perf_counter()
                    video = torch_side.numpy(torch_side.sync(model.decode(zt[:, :, :n]).sample))
                    ms = (time.perf_counter() - t0) * 1e3
                    out[key] = {"latents": n, "frames": int(video.shape[1]), "ms": ms,
                                "frames_per_s": video.shape[1] / ms * 1e3, "peak_gb": torch_side.peak_gb()}
                    if key == "first":
                        kept["ref"] = video
                    del video
            out["nan"] = bool(np.isnan(kept["ref"]).any())
            return out

        try:
            res["torch"] = guarded(tbench)
        finally:
            torch_side.reset_peak()
        if "out" in kept and "ref" in kept:
            res["jax"]["rel_err"] = rel_err(kept["out"], kept["ref"])
    return res


# ---------------------------------------------------------------- report
def rows(results):
    """(case, shape, jax result, torch result, frames) per table row; jax/torch results have ms and peak."""
    for name, c in results.items():
        j, t = c["jax"] or {}, c["torch"] or {}
        if name == "stream":
            for key in ("first", "all"):
                jr = dict(j.get(key, {}), status=j.get("status"), rel_err=j.get("rel_err") if key == "first" else None)
                tr = dict(t.get(key, {}), status=t.get("status")) if t else None
                n = c["first_latents"] if key == "first" else c["latents"]
                yield f"stream@{n}", f"{n} lat C={c['chunk']}", jr, tr, frames_for_latents(n)
        else:
            n, h, w = c["shapes"]["input"][1:4]
            shape = f"{n} {'fr' if name.startswith('encode') else 'lat'} {h}x{w}"
            jr = dict(j, ms=j.get("median_ms"), peak_gb=j.get("peak_gb_so_far"))
            tr = dict(t, ms=t.get("median_ms")) if t else None
            yield name, shape, jr, tr, c["frames"]


def print_table(results):
    hdr = (f"{'case':11} {'shape':16} {'JAX ms':>10} {'torch ms':>10} {'JAX/torch':>9} {'JAX fr/s':>9} "
           f"{'torch fr/s':>10} {'rel err':>9} {'JAX peak GB':>11} {'torch peak GB':>13}")
    print(hdr + "\n" + "-" * len(hdr))
    for name, shape, jr, tr, frames in rows(results):
        j_ok = jr.get("status") == "ok" and jr.get("ms") is not None
        t_ok = tr is not None and tr.get("status") == "ok" and tr.get("ms") is not None

        def cell(r, ok):
            return f"{r['ms']:.1f}" if ok else (r.get("status") or "-") if r else "-"

        def gb(r):
            return f"{r['peak_gb']:.2f}" if r and r.get("peak_gb") is not None else "-"

        ratio = f"{jr['ms'] / tr['ms']:.3f}" if j_ok and t_ok else "-"
        err = f"{jr['rel_err']:.2e}" if jr.get("rel_err") is not None else "-"
        if jr.get("nan") or (tr or {}).get("nan"):
            err += " NaN!"
        jfps = f"{frames / jr['ms'] * 1e3:.1f}" if j_ok else "-"
        tfps = f"{frames / tr['ms'] * 1e3:.1f}" if t_ok else "-"
        print(f"{name:11} {shape:16} {cell(jr, j_ok):>10} {cell(tr, t_ok):>10} {ratio:>9} {jfps:>9} {tfps:>10} "
              f"{err:>9} {gb(jr):>11} {gb(tr):>13}")
    if "stream" in results:
        c = results["stream"]
        print(f"JAX peak GB: JAX's process-wide (monotonic) peak so far. stream: read after decoding "
              f"{c['first_latents']} latents, then after all {c['latents']}, before the whole-clip cases; rel err on "
              f"the {c['first_latents']}-latent output vs diffusers")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
    cfg = get_vae_config(args.config, dtype=args.dtype, param_dtype=args.dtype)
    geos = {c: CASES["small" if args.small else "full"][c.split("_")[0]] for c in args.cases}

    t0 = time.perf_counter()
    flat = make_params(cfg, args.seed)
    jax_model = make_jax_model(cfg, flat)
    jax_block(jax_model[1])
    print(f"JAX model ready ({time.perf_counter() - t0:.1f} s): {args.config}, {args.dtype}, "
          f"{sum(v.size for v in flat.values()) / 1e6:.1f} M params, JAX in use {jax_peak_gb()} GB")
    torch_side = None
    if not args.no_torch:
        t0 = time.perf_counter()
        torch_side = TorchSide(cfg, flat, args.dtype, args.precision)
        print(f"torch model ready ({time.perf_counter() - t0:.1f} s) on {torch_side.device}")
    del flat

    results = {}
    for name, geo in geos.items():
        print(f"--- case {name} ...", flush=True)
        t0 = time.perf_counter()
        if name == "stream":
            results[name] = run_stream(geo, cfg, args, jax_model, torch_side)
        else:
            results[name] = run_whole(name, geo, cfg, args, jax_model, torch_side)
        gc.collect()
        print(f"    done in {time.perf_counter() - t0:.1f} s", flush=True)
    print()
    print_table(results)

    info = jax_info()
    info["XLA_PYTHON_CLIENT_PREALLOCATE"] = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
    info["default_matmul_precision"] = jax.config.jax_default_matmul_precision
    record = {"command": [sys.executable, *sys.argv] if argv is None else ["vae.main", *argv],
              "args": vars(args), "config": json.loads(cfg.to_json()), "jax": info, "cases": results,
              "goal": "JAX ms <= 0.8 x torch ms; flat JAX peak over the stream"}
    if torch_side is not None:
        record["torch"] = torch_side.info()
    write_record(args.json, record)
    return record


if __name__ == "__main__":
    main()
