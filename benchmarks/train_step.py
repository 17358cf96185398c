#!/usr/bin/env python
"""One stage-3 (DecMem) teacher-forcing training step at Wan2.1-1.3B size on one accelerator: step time and MFU.

Synthetic inputs (N(0, 1) latents at 352x640 -> 44x80 latents, random actions/poses, zero text context), batch 1,
bf16 compute with fp32 master weights and AdamW state, the config's remat policy. The sweep runs clip lengths in
latent frames from small to large and stops at the first that does not fit (OOM): the last "ok" row is as many frames
as fit. The FLOP formula (decmem_jax.train.metrics) is printed with the results; MFU = train-step FLOPs / step time /
the chip's dense bf16 peak (activation recomputation is not counted).

No peer implementation exists for this step, so the table has no ratio column.

Usage:
  python benchmarks/train_step.py                                   # H100/H200: frames 8..60, remat save_sgm
  python benchmarks/train_step.py --frames 60 --remat full,save_sgm # one length, two remat policies
  python benchmarks/train_step.py --stage dense_long                # the dense block-causal stage instead
  python benchmarks/train_step.py --frames 60 --sgm-dkv tiles,packed,packed_shared  # SGM dk/dv kernel variants
  python benchmarks/train_step.py --small                           # CPU smoke run: tiny config, float32
  python benchmarks/train_step.py --frames 60 --xla-options ";xla_allow_excess_precision=false"  # XLA option A/B
  python benchmarks/train_step.py --frames 60 --model linear_layout=xla  # XLA's own GEMM output layouts (A/B)
  # A small model (the world-tiny geometry) at 64x64, batch 32, with a profile of where the step's time goes:
  python benchmarks/train_step.py --stage decmem --frames 60 --batch 32 --size 64x64 --remat none \
      --model dim=256,ffn_dim=768,num_heads=4,num_layers=8,text_dim=32,text_len=8 \
      --memory blocks_per_frame=1,block_slots=64,top_k=8,candidates=outside_window --profile /tmp/prof

`--model`/`--memory` override fields of the 1.3B config (models.config.DiTConfig / the run config's model.memory),
so the same command runs on older checkouts of the project (for before/after comparisons in one session). Each case
runs in a child process (`--isolate`, the default except with --small), so its "peak GB" is its own; this process
never touches the GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # training needs (nearly) the whole device

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from benchmarks.clocks import ClockLog, describe as describe_clocks  # noqa: E402
from benchmarks.common import (check_xla_options, child_failure, guarded, jax_block, jax_info,  # noqa: E402
                               jax_peak_gb, parse_fields, parse_xla_option_sets, run_child, timed, write_record,
                               xla_options_label)
from configs import common as configs_common  # noqa: E402
from decmem_jax.format import latent_size  # noqa: E402
from decmem_jax.models.config import REMAT_POLICIES  # noqa: E402
from decmem_jax.parallel import mesh as mesh_lib  # noqa: E402
from decmem_jax.run_config import dit_config  # noqa: E402
from decmem_jax.train import data as data_lib  # noqa: E402
from decmem_jax.train import loop  # noqa: E402
from decmem_jax.train import metrics as metrics_lib  # noqa: E402
from decmem_jax.train import state as state_lib  # noqa: E402


# --sgm-dkv variant -> (Q_BOXES, K_TAILS, DKV_SHARE, DKV_OVERLAP) of pallas_kernels.sgm.mosaic_gpu; "default" keeps
# the module's defaults
SGM_DKV = {"default": None, "tiles": (False, False, False, False), "q_boxes": (True, False, False, False),
           "k_tails": (False, True, False, False), "packed": (True, True, False, False),
           "shared": (False, False, True, False), "packed_shared": (True, True, True, False),
           "packed_shared_overlap": (True, True, True, True)}


def set_sgm_dkv(variant: str) -> None:
    """Sets the Mosaic GPU dk/dv switches for the steps traced after this call (read when the backward is traced)."""
    if SGM_DKV[variant] is None:
        return
    from pallas_kernels.sgm import mosaic_gpu

    mosaic_gpu.Q_BOXES, mosaic_gpu.K_TAILS, mosaic_gpu.DKV_SHARE, mosaic_gpu.DKV_OVERLAP = SGM_DKV[variant]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="decmem", choices=configs_common.STAGES)
    p.add_argument("--frames", default=None, help="comma list of clip lengths in latent frames (multiples of 4); "
                                                  "default 8,16,24,32,40,48,60 (8 with --small)")
    p.add_argument("--remat", default="save_sgm", help="comma list of DiTConfig.remat policies (default: the training "
                   "default, save_sgm)")
    p.add_argument("--attention", default="auto", help="DiTConfig.attention (dense self-attention, cross-attention)")
    p.add_argument("--sgm-backend", default="auto", help="MemoryConfig.backend for the DecMem stage")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--small", action="store_true", help="tiny config, float32, seconds on a CPU")
    p.add_argument("--size", default=None, help="frame size HxW in pixels (latents are /8); default 352x640")
    p.add_argument("--model", default="", help="DiTConfig overrides k=v,k=v (e.g. dim=256,num_layers=8)")
    p.add_argument("--memory", default="", help="model.memory overrides k=v,k=v (e.g. blocks_per_frame=1,top_k=8)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also capture a jax.profiler trace of 3 steps per case under DIR and print where the time goes")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="per-chip peak for MFU (default: by device kind)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each case in a child process, so its peak memory is its own (default: on, except with "
                        "--small); --no-isolate runs them all here (peak GB is then the peak so far)")
    p.add_argument("--sgm-dkv", default="default",
                   help="comma list of Mosaic GPU SGM dk/dv variants, each timed as its own case: default (the "
                        "kernel module's defaults), tiles (whole q tiles, no tail kernel), q_boxes, k_tails, packed "
                        "(both), shared (a CTA's two tiles of one key block on one query stream), packed_shared (all "
                        "three), packed_shared_overlap (and the consumers' wgmmas in flight during their "
                        "arithmetic); pallas_kernels/sgm/mosaic_gpu.py Q_BOXES / K_TAILS / DKV_SHARE / DKV_OVERLAP")
    p.add_argument("--xla-options", default=None, metavar="SETS",
                   help="XLA compile-option sets, each timed as its own case: sets separated by ';', each a comma "
                        "list of name=value (an empty set = XLA's defaults), e.g. ';xla_allow_excess_precision=false'")
    p.add_argument("--json", default=None, help="output path (default $OUT/train_step.json or out/train_step.json)")
    args = p.parse_args(argv)
    try:
        args.xla_option_sets = parse_xla_option_sets(args.xla_options)
    except ValueError as e:
        p.error(str(e))
    args.sgm_dkv = [v for v in args.sgm_dkv.split(",") if v]
    for v in args.sgm_dkv:
        if v not in SGM_DKV:
            p.error(f"--sgm-dkv {v!r}: expected a comma list of {', '.join(SGM_DKV)}")
    if args.isolate is None:
        args.isolate = not args.small
    if not args.isolate:  # this process runs the cases: check the XLA options now (isolated: each child does)
        try:
            check_xla_options(args.xla_option_sets)
        except ValueError as e:
            p.error(str(e))
    args.frames = [int(f) for f in (args.frames or ("8" if args.small else "8,16,24,32,40,48,60")).split(",") if f]
    args.remat = [r for r in args.remat.split(",") if r]
    for r in args.remat:
        if r not in REMAT_POLICIES:
            p.error(f"--remat {r!r}: expected a comma list of {', '.join(REMAT_POLICIES)}")
    args.model, args.memory = parse_fields(args.model, "--model"), parse_fields(args.memory, "--memory")
    if args.json is None:
        out_dir = os.environ.get("OUT")
        args.json = str(pathlib.Path(out_dir) / "train_step.json") if out_dir else "out/train_step.json"
    return args


def make_config(args, frames: int, remat: str):
    if args.small:
        from configs import train_tiny

        cfg = train_tiny.get_config(args.stage)
    else:
        cfg = configs_common.train_config(args.stage)
        cfg.model.attention = args.attention
    cfg.model.memory.backend = args.sgm_backend
    cfg.model.overrides.update(args.model)
    cfg.model.memory.update(args.memory)
    if args.size:
        cfg.data.size = tuple(int(v) for v in args.size.lower().split("x"))
    cfg.data.source = "synthetic"
    cfg.data.clip_latents = frames
    cfg.train.batch = args.batch
    cfg.train.remat = remat
    cfg.mesh.update(data=1, fsdp=1, tensor=1, context=1)
    return cfg


def run_case(args, frames: int, remat: str, sgm_dkv: str = "default", xla_options: dict | None = None) -> dict:
    xla_options = xla_options or {}  # checked by parse_args (this process's, or the isolated child's)
    set_sgm_dkv(sgm_dkv)
    cfg = make_config(args, frames, remat)
    mesh = mesh_lib.make_mesh(dict(cfg.mesh), jax.devices()[:1])
    setup = loop.build(cfg, mesh)
    hw = latent_size(cfg.data.size)
    host = next(data_lib.SyntheticBatches(args.batch, frames, hw, seed=0))
    setup.compile(loop.global_shapes(host, args.batch), compiler_options=xla_options)
    batch = data_lib.to_global(host, setup.batch_shardings)
    flops = metrics_lib.step_flops(setup.dit_cfg, batch=args.batch, frames=frames, hw=hw, chunk=int(cfg.train.chunk))
    res = {"frames": frames, "remat": remat, "sgm_dkv": sgm_dkv, "xla_options": xla_options_label(xla_options),
           "linear_layout": "row_major" if setup.dit_cfg.row_major_linear else "xla",  # "auto" resolved
           "tokens": flops["tokens_per_step"], "flops": {k: v for k, v in flops.items() if k != "formula"}}

    def bench():
        holder = {"state": setup.fresh_state()}

        def call():
            holder["state"], metrics = setup.step(holder["state"], batch, setup.context)
            return metrics["loss"]

        clocks = ClockLog()
        loss, stats = timed(call, jax_block, args.warmup, args.repeats, during=clocks)
        stats["gpu_clocks"] = clocks.summary()
        profile = {}
        if args.profile:
            from benchmarks.trace_summary import summarise

            trace_dir = pathlib.Path(args.profile) / f"{args.stage}_{frames}_{remat}_{sgm_dkv}"
            with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
                for _ in range(3):
                    jax_block(call())
            profile = {"profile": summarise(trace_dir, top=30)}
            print(f"--- profile: 3 steps of {args.stage}, {frames} latents, remat {remat} ---\n"
                  f"{profile['profile']}", flush=True)
        peak = metrics_lib.peak_flops(jax.devices()[0].device_kind, args.peak_tflops)
        sec = stats["median_ms"] / 1e3
        return {"status": "ok", **stats, **profile, "loss": float(loss),
                "tflops_per_s": flops["train_step"] / sec / 1e12,
                "mfu": metrics_lib.mfu(flops["train_step"], sec, peak, 1), "peak_flops": peak}

    res.update(guarded(bench))
    res["peak_gb"] = jax_peak_gb()  # the process's peak: this case's own when isolated
    # host memory: the offload_* policies' residuals live in pinned host buffers, which the device peak omits
    res["host_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res["isolated"] = bool(args.isolate)
    return res


def run_case_isolated(argv, frames: int, remat: str, sgm_dkv: str, xla_options: dict | None = None):
    """run_case in a child process: the same argv with one clip length, policy, dk/dv variant and XLA option set
    (argparse keeps an option's last value, so appending overrides them). Returns (row, the child's record or None).
    This process never touches the GPU (a preallocating parent would starve the children)."""
    label = xla_options_label(xla_options or {})
    one_set = "" if label == "defaults" else label
    record, code = run_child(pathlib.Path(__file__).resolve(), [*argv, "--frames", str(frames), "--remat", remat,
                                                                "--sgm-dkv", sgm_dkv, "--xla-options", one_set,
                                                                "--no-isolate"], cwd=ROOT)
    if record is not None and record.get("cases"):
        return {**record["cases"][0], "isolated": True}, record
    return {"frames": frames, "remat": remat, "sgm_dkv": sgm_dkv, "xla_options": label, **child_failure(code)}, None


def print_table(rows, dtype: str) -> None:
    hdr = (f"{'frames':>6} {'tokens':>8} {'remat':14} {'sgm dk/dv':9} {'dtype':8} {'step ms':>10} {'TFLOP':>8} "
           f"{'TF/s':>8} {'MFU':>7} {'peak GB':>8} {'host GB':>8}  XLA options")
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        ok = r.get("status") == "ok"
        tf = r.get("flops", {}).get("train_step", float("nan")) / 1e12
        ms = f"{r['median_ms']:.1f}" if ok else r.get("status", "?")
        tfs = f"{r['tflops_per_s']:.1f}" if ok else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if ok and r.get("mfu") is not None else "-"
        host = f"{r['host_peak_gb']:.1f}" if r.get("host_peak_gb") is not None else "-"
        print(f"{r['frames']:>6} {r.get('tokens', '-'):>8} {r['remat']:14} {r.get('sgm_dkv', 'default'):9} {dtype:8} "
              f"{ms:>10} {tf:>8.3g} {tfs:>8} {mfu:>7} {str(r.get('peak_gb')):>8} {host:>8}  "
              f"{r.get('xla_options', 'defaults')}"
              + (f"; linear layout {r['linear_layout']}" if r.get("linear_layout") else ""))
    for r in rows:
        if r.get("gpu_clocks"):
            print(f"# {r['frames']} frames, {r['remat']}: {describe_clocks(r['gpu_clocks'])}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    rows, child = [], None
    t0 = time.perf_counter()
    for remat in args.remat:
        for variant in args.sgm_dkv:
            for options in args.xla_option_sets:
                for frames in sorted(args.frames):
                    print(f"--- {args.stage}: {frames} latent frames, remat {remat}, SGM dk/dv {variant}, XLA options "
                          f"{xla_options_label(options)} ...", flush=True)
                    if args.isolate:
                        row, record = run_case_isolated(argv, frames, remat, variant, options)
                        child = child or record
                    else:
                        row = run_case(args, frames, remat, variant, options)
                    rows.append(row)
                    if row.get("status") != "ok":
                        print(f"    {row.get('status')}: {row.get('error', '')}; longer clips skipped")
                        break
    if args.isolate:  # what the children saw (this process has no devices)
        config, info, dtype = (child["config"], child["jax"], child["dtype"]) if child else (None, None, "?")
    else:
        dit_cfg = dit_config(make_config(args, args.frames[0], args.remat[0]))
        config, info = json.loads(dit_cfg.to_json()), jax_info()
        dtype = jax.numpy.dtype(dit_cfg.compute_dtype).name
    print()
    print_table(rows, dtype)
    print(f"\n{metrics_lib.FLOP_FORMULA}\n(total {time.perf_counter() - t0:.0f} s)")
    record = {"command": [sys.executable, "benchmarks/train_step.py", *argv], "args": vars(args), "config": config,
              "dtype": dtype, "flop_formula": metrics_lib.FLOP_FORMULA, "jax": info, "cases": rows}
    write_record(args.json, record)
    return record


if __name__ == "__main__":
    main()
