#!/usr/bin/env python
"""SGM block-sparse attention: the Mosaic GPU kernel (pallas_kernels/sgm/mosaic_gpu*.py) on hardware -- correctness
first, then speed against cuDNN dense attention and the block-sparse peers (vsa's Triton kernel, cuDNN frontend's
block-sparse attention, PyTorch FlexAttention), measured in the same run.

1. Checks (always first; any failure prints what failed, by how much, against which bound, and exits 1):
   fwd + dq/dk/dv of the kernel vs fp32 oracles on N(0, 3²) inputs: small cases (count 0, empty / partial / full
   key blocks, Tq != Tk, B > 1, bf16 and fp16, D 64 and 128, blocks 64 / 128 / 192), every block listed = dense
   attention, a bitwise-determinism check of the backward, `sgm_attention(backend="mosaic_gpu")` under jax.grad,
   and a spot check at each benchmark geometry (head 0, full sequence) against the gather reference.
   Bounds: forward 1e-2 (bf16) / 2e-3 (fp16), gradients 3e-2 / 4e-3 (max |err| / max |ref|; tests/test_sgm_kernels.py
   explains them).
2. Cases (bf16, D 128, H 12, B 1, random sorted top-k lists):
   vsa     S 49,152 as 768 blocks of 64 tokens, top-k 76 of 768 (90% sparse), q and kv the same length.
   decmem  3,520 query tokens in 24 blocks of 192 slots (147/145 valid) against 200 latents of history
           (1,200 key blocks of 192 slots, same valid counts), top-k 80.
   decmem_cfg  the rollout's history call: 48 query blocks (both CFG branches) against the same 1,200.
   decmem_train  a training step's call: 720 query blocks (a 60-latent clip's clean and noisy copies) against the
           same 720 blocks, top-k 80: long reverse lists, as the training backward sees them (not in the default
           --cases: its cuDNN dense peer takes ~0.2 s per forward).
   The decmem cases pass q_rows=147 as the model does (the 45 padding rows of a query block get no cotangent, so dk/dv
   kernel may skip them: `q_boxes`; the peers, which have no such notion, process them).
   Timed: forward, and forward+backward (jax.vjp through sgm_attention); backward = difference. Every sample (ours,
   cuDNN, the peers) is --inner calls back to back under one host sync, reported per call: the device's time, not
   the host's round trip per call (before 2026-12-04 one call per sync, which added ~0.2-0.3 ms to each of ours).
   Effective TFLOP/s counts only work on valid keys: fwd = 4·B·H·D·Σ_query blocks block_q·(valid keys listed),
   bwd = 2.5× fwd (the JSON also has the padded work the kernel issues, and the valid-query-token work).
   cuDNN: jax.nn.dot_product_attention(implementation="cudnn") on the dense problem of the same q, k, v (dense
   FLOPs). vsa: `vsa/block_sparse_attn_triton.py` loaded by file path under torch with the same lists at 64-token
   granularity (a 192-slot block = 3 cubes), compared against our output before it is timed; "vsa: not installed"
   when the package is missing. vsa needs Tq = Tk: in the decmem case its queries are zero-padded to Tk with empty
   lists and the time of those empty q tiles (timed alone) is subtracted ("net", favourable to vsa). cudnn_bsa: cuDNN
   frontend's block-sparse attention (CuTe DSL) with the same 64-token lists, in our layout. flex: PyTorch
   FlexAttention (torch.compile) with a BlockMask of the same lists at 64-token granularity, its FLASH backend if the
   flash package is installed, else TRITON (benchmarks/sgm_peers.py; every attempt's outcome is in the JSON).
3. --sweep (benchmarks/sgm_sweep.py): the forward under alternative kernel plans (SWEEP; mosaic_gpu_fwd.StreamPlan),
   each checked against the automatic plan's output and timed, and the backward under alternative dq plans
   (SWEEP_DQ), so a tuning run needs one process. The plans of a sweep are timed together in --rounds rounds that
   visit each in turn, a sample being --inner calls under one host sync.

Usage:
  python3 benchmarks/sgm_kernel.py                         # H100/H200: checks, then both cases
  python3 benchmarks/sgm_kernel.py --check-only            # hardware correctness checks only
  python3 benchmarks/sgm_kernel.py --small --interpret     # CPU smoke run in the Mosaic GPU interpreter
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time
import traceback

# JAX preallocates this fraction of the GPU; the rest is left to torch for the vsa peer (as in dit_forward.py).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import guarded, jax_block, jax_info, timed, write_record  # noqa: E402
from benchmarks.sgm_peers import bench_cudnn_bsa, bench_flex, bench_vsa, rel  # noqa: E402
from benchmarks.sgm_peers import ms_of as _ms  # noqa: E402
from benchmarks.sgm_sweep import SWEEP, SWEEP_DQ, pick, sweep_case, sweep_dq  # noqa: E402
from pallas_kernels import interpreter  # noqa: E402
from pallas_kernels.sgm import api  # noqa: E402
from pallas_kernels.sgm import mosaic_gpu as mg  # noqa: E402
from pallas_kernels.sgm.reference import (dense_masked_reference, mask_padding_rows, sgm_reference,  # noqa: E402
                                          sgm_reference_bwd)

BF16, F16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)
FWD_TOL = {BF16: 1e-2, F16: 2e-3}
GRAD_TOL = {BF16: 3e-2, F16: 4e-3}
DECMEM_LENS = [147] * 5 + [145]  # valid tokens of the 6 blocks of an 880-token latent frame
# name -> geometry; heads, batch, head dim shared: H 12, B 1, D 128
CASES = {
    "full": {"vsa": dict(nq=768, nk=768, bq=64, bkv=64, topk=76, decmem=False),
             "decmem": dict(nq=24, nk=1200, bq=192, bkv=192, topk=80, decmem=True),
             # the rollout's history call: both CFG branches folded into the query blocks of one batch-1 cache
             "decmem_cfg": dict(nq=48, nk=1200, bq=192, bkv=192, topk=80, decmem=True),
             # a stage-3 training step's call: the teacher-forcing sequence of a 60-latent clip (clean and noisy
             # copies, 120 frames of 6 blocks) against itself; each key block is listed by ~80 query blocks (by ~1.6
             # in decmem), so the backward's reverse lists are long, as in training
             "decmem_train": dict(nq=720, nk=720, bq=192, bkv=192, topk=80, decmem=True)},
    "small": {"vsa": dict(nq=4, nk=4, bq=64, bkv=64, topk=2, decmem=False),
              "decmem": dict(nq=1, nk=6, bq=192, bkv=192, topk=3, decmem=True),
              "decmem_cfg": dict(nq=2, nk=6, bq=192, bkv=192, topk=3, decmem=True),
              "decmem_train": dict(nq=4, nk=4, bq=192, bkv=192, topk=3, decmem=True)},
}

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="vsa,decmem", help="comma list of: vsa, decmem, decmem_cfg, decmem_train")
    p.add_argument("--small", action="store_true", help="tiny shapes (with --interpret: a CPU smoke run)")
    p.add_argument("--interpret", action="store_true", help="run the kernel in the Mosaic GPU interpreter (CPU)")
    p.add_argument("--check-only", action="store_true", help="run the hardware correctness checks and stop")
    p.add_argument("--skip-checks", action="store_true",
                   help="time without the correctness checks (only after a passing --check-only run on this build)")
    p.add_argument("--heads", type=int, default=None, help="heads (default 12; 1 with --small)")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="dtype of the timed cases")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first one compiles)")
    p.add_argument("--no-vsa", action="store_true", help="skip the vsa Triton peer")
    p.add_argument("--no-flex", action="store_true", help="skip the PyTorch FlexAttention peer")
    p.add_argument("--no-cudnn-bsa", action="store_true", help="skip cuDNN frontend's block-sparse attention peer")
    p.add_argument("--stages", type=int, default=None,
                   help="override the dk/dv kernel's ring depth (tuning; default mosaic_gpu.default_stages: 2 at "
                        "D 128); the forward and dq kernels size their rings from their plans (--sweep times "
                        "alternatives)")
    p.add_argument("--sweep-cases", default=None,
                   help="with --sweep: comma list of cases to sweep (default: all timed cases)")
    p.add_argument("--sweep-fwd", default=None, help="with --sweep: indices into SWEEP[case] to time (default all)")
    p.add_argument("--sweep-bwd", default=None,
                   help="with --sweep: indices into SWEEP_DQ[case] to time (default all; '' for none: a forward-only "
                        "tuning run)")
    p.add_argument("--sweep", action="store_true",
                   help="also time the forward under alternative kernel plans (SWEEP), each checked against the "
                        "default plan's output first")
    p.add_argument("--rounds", type=int, default=3, help="with --sweep: rounds over all plans (interleaved timing)")
    p.add_argument("--inner", type=int, default=10,
                   help="calls per timed sample, back to back with one host sync at the end, for every timing (ours, "
                        "cuDNN, the peers, the sweep): a ~1 ms call timed alone also pays a host round trip of "
                        "~0.2-0.3 ms (measured on an H200) that a model, calling it inside a jit, never pays")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="output path (default $OUT/sgm_kernel.json or out/sgm_kernel.json)")
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    for c in args.cases:
        if c not in CASES["full"]:
            p.error(f"unknown case {c!r}; expected vsa and/or decmem")
    args.heads = args.heads or (1 if args.small else 12)
    swept = args.cases if args.sweep_cases is None else [c for c in args.sweep_cases.split(",") if c]
    for flag, table, given in (("--sweep-fwd", SWEEP, args.sweep_fwd), ("--sweep-bwd", SWEEP_DQ, args.sweep_bwd)):
        try:  # bad indices fail here, not after the checks and timings that come before the sweep
            for c in swept:
                pick(table[c], given)
        except (ValueError, IndexError, KeyError):
            p.error(f"{flag} {given!r}: expected comma-separated indices into the plan list of each swept case "
                    f"({', '.join(f'{c}: {len(table[c])} plans' for c in swept)})")
    if args.json is None:
        out_dir = os.environ.get("OUT")
        args.json = str(pathlib.Path(out_dir) / "sgm_kernel.json") if out_dir else "out/sgm_kernel.json"
    return args


# ---------------------------------------------------------------------------------------------- inputs and lists


def make_lists(rng, b, h, nq, nk, topk, counts=None):
    """Random ascending duplicate-free lists [B, H, Nq, K]; counts default to K."""
    idx = np.sort(np.argsort(rng.random((b, h, nq, nk)), axis=-1)[..., :topk], axis=-1).astype(np.int32)
    cnt = np.full((b, h, nq), topk, np.int32) if counts is None else counts.astype(np.int32)
    return idx, cnt


def make_case(seed, *, b, h, d, nq, nk, bq, bkv, topk, dtype, sigma=3.0, decmem=False, random_counts=False):
    """q, k, v ~ N(0, sigma²) in dtype, lists, key lengths (DecMem: 147/145 per latent; else random incl. empty,
    full and partial blocks when random_counts, else full) and the valid query rows per query block."""
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(0, sigma, (b, nq * bq, h, d)), dtype)
    k = jnp.asarray(r.normal(0, sigma, (b, nk * bkv, h, d)), dtype)
    v = jnp.asarray(r.normal(0, sigma, (b, nk * bkv, h, d)), dtype)
    counts = None
    if random_counts:
        counts = r.integers(0, topk + 1, (b, h, nq))
        counts.reshape(-1)[:2] = [0, topk]
    idx, cnt = make_lists(r, b, h, nq, nk, topk, counts)
    if decmem:
        lens = np.resize(np.asarray(DECMEM_LENS, np.int32), (b, nk))
        q_valid = np.resize(np.asarray(DECMEM_LENS), nq)
    elif random_counts:
        lens = r.integers(1, bkv + 1, (b, nk)).astype(np.int32)
        lens[0, 0], lens[0, 1], lens[-1, -1] = 0, bkv, bkv // 2 + 1
        q_valid = np.full(nq, bq)
    else:
        lens, q_valid = np.full((b, nk), bkv, np.int32), np.full(nq, bq)
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    # DecMem's query blocks hold at most 147 tokens: the model passes q_rows (the padded rows' cotangent is zero)
    q_rows = max(DECMEM_LENS) if decmem else None
    return dict(q=q, k=k, v=v, idx=i32(idx), cnt=i32(cnt), lens=i32(lens), bq=bq, bkv=bkv, q_valid=q_valid,
                q_rows=q_rows)


def flop_counts(c):
    """Effective (valid keys × all query rows), issued (the forward plan's key steps × all rows) and valid-token
    forward FLOPs."""
    idx, cnt, lens = (np.asarray(c[n]) for n in ("idx", "cnt", "lens"))
    b, h, nq, kk = idx.shape
    d = c["q"].shape[-1]
    listed = np.arange(kk) < cnt[..., None]
    sel = np.take_along_axis(np.broadcast_to(lens[:, None, None, :], (b, h, nq, lens.shape[1])), idx, -1) * listed
    keys = sel.sum(-1)  # [B, H, Nq]
    plan = mg.forward_plan(c["q"].shape, c["bq"], c["bkv"], c["q"].dtype)  # key rows the forward issues: whole
    boxes = np.ceil(sel / plan.box).sum(-1)  # boxes of the listed blocks, grouped into steps of `width` rows
    issued = np.ceil(boxes / plan.nbox) * plan.width
    fwd = 4.0 * d * c["bq"] * keys.sum()
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd, "fwd_issued": 4.0 * d * c["bq"] * issued.sum(),
            "fwd_valid_tokens": 4.0 * d * float((keys * c["q_valid"][None, None, :]).sum()),
            "dense_fwd": 4.0 * b * h * d * c["q"].shape[1] * c["k"].shape[1]}


# ------------------------------------------------------------------------------------------------------- checks


def kernel_fns(interpret):
    return (functools.partial(mg.sgm_forward_mgpu, interpret=interpret),
            functools.partial(mg.sgm_backward_mgpu, interpret=interpret))


def check_case(name, c, interpret, oracle="dense", determinism=False, packed=None):
    """Kernel fwd + grads vs an fp32 oracle on the same (16-bit-valued) inputs (packed: the dk/dv kernel's packed
    query boxes, key tails and shared query streams on or off; None: the defaults, mosaic_gpu.Q_BOXES, K_TAILS and
    DKV_SHARE)."""
    fwd, bwd = kernel_fns(interpret)
    bwd = functools.partial(bwd, q_boxes=packed, k_tails=packed, dkv_share=packed)
    dt = jnp.dtype(c["q"].dtype)
    g = dict(block_q=c["bq"], block_kv=c["bkv"])
    lst = (c["idx"], c["cnt"], c["lens"])
    out, lse = fwd(c["q"], c["k"], c["v"], *lst, **g)
    cot = jnp.asarray(np.random.default_rng(7).normal(size=out.shape), dt)
    rows = {} if c.get("q_rows") is None else {"q_rows": c["q_rows"]}  # past them the cotangent is taken as zero
    grads = bwd(c["q"], c["k"], c["v"], out, lse, cot, *lst, **g, **rows)
    f32 = [c[n].astype(F32) for n in ("q", "k", "v")]
    if oracle == "dense":
        ref_out, vjp = jax.vjp(lambda q, k, v: dense_masked_reference(q, k, v, *lst, **g), *f32)
        ref_grads = vjp(mask_padding_rows(cot.astype(F32), c["bq"], c.get("q_rows")))
        _, ref_lse = dense_masked_reference(*f32, *lst, **g, return_lse=True)
    else:  # gather oracle + its explicit backward: memory O(Nq·K·block_kv), fits the benchmark geometries
        ref_out, ref_lse = sgm_reference(*f32, *lst, **g)
        ref_grads = sgm_reference_bwd(*f32, *lst, ref_out, ref_lse, cot.astype(F32), **g, **rows)
    errs = {"out": rel(out, ref_out)}
    errs.update({n: rel(x, w) for n, x, w in zip(("dq", "dk", "dv"), grads, ref_grads)})
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    fin = np.isfinite(ref_lse)
    lse_ok = bool(np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)) and np.isfinite(lse[fin]).all())
    scale = max(float(np.abs(ref_lse[fin]).max(initial=0.0)), 1.0)
    errs["lse"] = float(np.max(np.abs(lse[fin] - ref_lse[fin]), initial=0.0)) / scale
    tols = {"out": FWD_TOL[dt], "lse": FWD_TOL[dt], "dq": GRAD_TOL[dt], "dk": GRAD_TOL[dt], "dv": GRAD_TOL[dt]}
    finite = all(np.isfinite(np.asarray(x, np.float32)).all() for x in (out, *grads))
    bad = [f"{n} rel err {errs[n]:.3e} > {tols[n]:.0e}" for n in tols if not errs[n] <= tols[n]]
    if not lse_ok:
        bad.append("LSE −inf pattern or finiteness differs from the oracle")
    if not finite:
        bad.append("non-finite values in out/dq/dk/dv")
    if determinism:
        again = bwd(c["q"], c["k"], c["v"], out, lse, cot, *lst, **g, **rows)
        same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(grads, again))
        errs["bitwise_repeat"] = same
        if not same:
            bad.append("backward is not bitwise reproducible")
    return {"name": name, "dtype": dt.name, "shape": {"q": list(c["q"].shape), "k": list(c["k"].shape),
            "K": int(c["idx"].shape[-1]), "block_q": c["bq"], "block_kv": c["bkv"]}, "errors": errs,
            "tolerances": tols, "ok": not bad, "failures": bad}


def check_api():
    """sgm_attention(backend="mosaic_gpu") and jax.grad through its custom VJP (hardware only: the registered
    backend is for the GPU platform)."""
    c = make_case(60, b=1, h=2, d=128, nq=2, nk=3, bq=64, bkv=64, topk=2, dtype=BF16, random_counts=True)
    lst, g = (c["idx"], c["cnt"], c["lens"]), dict(block_q=c["bq"], block_kv=c["bkv"])
    entry = api.resolve_sgm_backend("auto")
    loss = lambda q, k, v, name: jnp.sum(api.sgm_attention(q, k, v, *lst, **g, backend=name).astype(F32) ** 2)
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(c["q"], c["k"], c["v"], "mosaic_gpu")
    f32 = [c[n].astype(F32) for n in ("q", "k", "v")]
    want = jax.grad(lambda q, k, v: jnp.sum(dense_masked_reference(q, k, v, *lst, **g) ** 2), argnums=(0, 1, 2))(*f32)
    # d(sum out²)/dθ also carries the bf16 rounding of `out` itself: bound doubled
    errs = {n: rel(x, w) for n, x, w in zip(("dq", "dk", "dv"), got, want)}
    bad = [f"{n} rel err {e:.3e} > {2 * GRAD_TOL[BF16]:.0e}" for n, e in errs.items() if not e <= 2 * GRAD_TOL[BF16]]
    if entry.name != "mosaic_gpu":
        bad.append(f"backend 'auto' resolved to {entry.name!r}, expected 'mosaic_gpu'")
    return {"name": "sgm_attention(backend='mosaic_gpu') + jax.grad", "errors": errs, "ok": not bad, "failures": bad}


def run_checks(args):
    small = [
        ("vsa-like bf16 D128 64/64 B2", dict(b=2, h=2, d=128, nq=6, nk=9, bq=64, bkv=64, topk=4, dtype=BF16), True),
        ("decmem-like fp16 D128 192/192", dict(b=1, h=2, d=128, nq=3, nk=8, bq=192, bkv=192, topk=4, dtype=F16,
                                               decmem=True), False),
        ("D64 bf16 128/64", dict(b=1, h=3, d=64, nq=3, nk=7, bq=128, bkv=64, topk=3, dtype=BF16), False),
    ]
    if args.interpret:  # the interpreter is slow: only the geometry spot checks (tests/ cover the rest)
        small = []
    results = []
    for i, (name, geo, det) in enumerate(small):
        results.append(guarded_check(name, lambda: check_case(name, make_case(100 + i, random_counts=True, **geo),
                                                               args.interpret, determinism=det)))
        if geo.get("decmem"):  # the same with dk/dv on packed query boxes (q_rows = 147) and key tails
            label = f"{name}, packed"
            results.append(guarded_check(label, lambda: check_case(
                label, make_case(100 + i, random_counts=True, **geo), args.interpret, determinism=True, packed=True)))
    if not args.interpret:  # (both covered by tests/test_sgm_kernels.py in the interpreter)
        dense = make_case(200, b=1, h=2, d=128, nq=4, nk=4, bq=64, bkv=64, topk=4, dtype=BF16)
        results.append(guarded_check("all blocks listed = dense",
                                     lambda: check_case("all blocks listed = dense", dense, False)))
        results.append(guarded_check("api", check_api))
    for name in args.cases:
        geo = CASES["small" if args.small else "full"][name]
        label = f"{name} geometry, head 0"
        c = make_case(300, b=1, h=1, d=128, dtype=BF16, **geo)
        results.append(guarded_check(label, lambda: check_case(label, c, args.interpret, oracle="gather")))
        if c["q_rows"] is not None:
            results.append(guarded_check(f"{label}, packed", lambda: check_case(
                f"{label}, packed", c, args.interpret, oracle="gather", packed=True)))
    return results


def guarded_check(name, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- a crash is a failed check, reported with its traceback
        traceback.print_exc()
        return {"name": name, "ok": False, "failures": [f"raised {type(e).__name__}: {str(e)[:400]}"]}


def print_checks(results):
    print(f"{'check':46} {'result':6} {'out':>9} {'lse':>9} {'dq':>9} {'dk':>9} {'dv':>9}")
    for r in results:
        e = r.get("errors", {})
        cells = [f"{e[n]:.2e}" if isinstance(e.get(n), float) else "-" for n in ("out", "lse", "dq", "dk", "dv")]
        print(f"{r['name'][:46]:46} {'ok' if r['ok'] else 'FAIL':6} " + " ".join(f"{x:>9}" for x in cells))
        for f in r.get("failures", []):
            print(f"    FAILED: {f}")


# ------------------------------------------------------------------------------------------------------ timing


def time_jax(fn, args, warmup, repeats, inner):
    def run():
        out, stats = timed(lambda: fn(*args), jax_block, warmup, repeats, inner)
        return {"status": "ok", **stats}
    return guarded(run)


def bench_ours(c, name, cot, args):
    """Through sgm_attention as a model calls it; the lists are arguments, so building the step and reverse lists
    (XLA, inside the jitted call) is timed too instead of being constant-folded."""
    g = dict(block_q=c["bq"], block_kv=c["bkv"], q_rows=c.get("q_rows"))
    attn = lambda q, k, v, *lst: api.sgm_attention(q, k, v, *lst, **g, backend=name)
    f = jax.jit(attn)
    fb = jax.jit(lambda q, k, v, *lst: jax.vjp(lambda *x: attn(*x, *lst), q, k, v)[1](cot))
    a = (c["q"], c["k"], c["v"], c["idx"], c["cnt"], c["lens"])
    return {"fwd": time_jax(f, a, args.warmup, args.repeats, args.inner),
            "fwd_bwd": time_jax(fb, a, args.warmup, args.repeats, args.inner)}


def bench_cudnn(c, cot, args):
    attn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
    f = jax.jit(attn)
    fb = jax.jit(lambda q, k, v: jax.vjp(attn, q, k, v)[1](cot))
    qkv = (c["q"], c["k"], c["v"])
    return {"fwd": time_jax(f, qkv, args.warmup, args.repeats, args.inner),
            "fwd_bwd": time_jax(fb, qkv, args.warmup, args.repeats, args.inner)}


def run_case(name, geo, args, backend):
    dt = jnp.dtype(args.dtype)
    c = make_case(args.seed, b=1, h=args.heads, d=128, dtype=dt, sigma=1.0, **geo)
    fl = flop_counts(c)
    cot = jnp.asarray(np.random.default_rng(args.seed + 1).normal(size=c["q"].shape), dt)
    res = {"shapes": {"q": list(c["q"].shape), "k": list(c["k"].shape), "block_q": c["bq"], "block_kv": c["bkv"],
                      "topk": geo["topk"]}, "flops": fl, "dtype": dt.name}
    res["mosaic_gpu"] = bench_ours(c, backend, cot, args)
    ours_out = None
    if res["mosaic_gpu"]["fwd"]["status"] == "ok":
        lst = (c["idx"], c["cnt"], c["lens"])
        ours_out = api.sgm_attention(c["q"], c["k"], c["v"], *lst, block_q=c["bq"], block_kv=c["bkv"],
                                     backend=backend)
    if jax.default_backend() == "gpu":
        res["cudnn"] = bench_cudnn(c, cot, args)
    else:
        res["cudnn"] = {"fwd": {"status": "skipped (needs a GPU)"}, "fwd_bwd": {"status": "skipped (needs a GPU)"}}
    for peer, bench in (("vsa", bench_vsa), ("cudnn_bsa", bench_cudnn_bsa), ("flex", bench_flex)):
        res[peer] = bench(c, ours_out, cot, args) if ours_out is not None else {"status": "skipped (ours failed)"}
    if args.sweep and ours_out is not None and (args.sweep_cases is None or name in args.sweep_cases.split(",")):
        tol = FWD_TOL[jnp.dtype(c["q"].dtype)]
        res["sweep"] = sweep_case(name, c, ours_out, args, tol=tol, flops=flop_counts(c)["fwd"])
        if pick(SWEEP_DQ[name], args.sweep_bwd):
            out, lse = mg.sgm_forward_mgpu(c["q"], c["k"], c["v"], c["idx"], c["cnt"], c["lens"], block_q=c["bq"],
                                           block_kv=c["bkv"], interpret=args.interpret)
            res["sweep_dq"] = sweep_dq(name, c, out, lse, cot, args, tol=GRAD_TOL[jnp.dtype(c["q"].dtype)])
    for peer in ("mosaic_gpu", "cudnn", "vsa", "cudnn_bsa", "flex"):  # backward alone = (fwd+bwd) − fwd, same run
        f, fb = _ms(res[peer].get("fwd")), _ms(res[peer].get("fwd_bwd"))
        if f and fb:
            res[peer]["bwd_ms_derived"] = fb - f
    return res


def print_table(results):
    hdr = (f"{'case':7} {'pass':8} {'ours ms':>9} {'eff TF/s':>9} {'cuDNN ms':>9} {'cuDNN TF/s':>10} "
           f"{'speedup':>8} {'TF/s ratio':>10} {'vsa/ours':>9} {'cudnn_bsa/ours':>14} {'flex/ours':>9}")
    print(hdr + "\n" + "-" * len(hdr))
    for name, c in results.items():
        fl = c["flops"]
        for p, key, flops in (("fwd", "fwd", fl["fwd"]), ("fwd+bwd", "fwd_bwd", fl["fwd_bwd"])):
            ours, cud = _ms(c["mosaic_gpu"][key]), _ms(c["cudnn"][key])
            vsa, bsa, flex = (_ms(c[x].get(key)) if c[x].get("status") == "ok" else None
                              for x in ("vsa", "cudnn_bsa", "flex"))
            dense = fl["dense_fwd"] * (1.0 if key == "fwd" else 3.5)
            tf = lambda f, ms: f"{f / ms / 1e9:.1f}" if ms else "-"
            ratio = lambda a, b, fmt="{:.2f}": fmt.format(a / b) if a and b else "-"
            row = [f"{ours:.3f}" if ours else c["mosaic_gpu"][key].get("status", "?")[:9], tf(flops, ours),
                   f"{cud:.3f}" if cud else "-", tf(dense, cud), ratio(cud, ours),
                   ratio(flops / ours if ours else None, dense / cud if cud else None),
                   ratio(vsa, ours), ratio(bsa, ours), ratio(flex, ours)]
            print(f"{name:7} {p:8} " + " ".join(f"{x:>{w}}" for x, w in zip(row, (9, 9, 9, 10, 8, 10, 9, 14, 9))))
            peers = {x: y for x, y in (("vsa", vsa), ("cudnn_bsa", bsa), ("flex", flex)) if y}
            if peers:
                print(f"{'':17} peer ms: " + ", ".join(f"{x} {y:.3f}" for x, y in peers.items()))
        valid = fl.get("fwd_valid_tokens", fl["fwd"]) / fl["fwd"]
        if valid < 1.0:  # padded query rows (DecMem: 147 of 192) are counted as work above
            print(f"{'':7} on valid query tokens only ({valid:.3f} of the effective FLOPs) the TF/s ratios are "
                  f"{valid:.3f}x the ones above")
        if c["vsa"].get("q_padded_to"):
            print(f"{'':7} vsa: queries zero-padded to Tk = {c['vsa']['q_padded_to']} (vsa needs Tq = Tk); its ms are "
                  "net of the empty q tiles' time (timed separately, subtracted)")
        for peer in ("vsa", "cudnn_bsa", "flex"):
            st = str(c[peer].get("status"))
            if st != "ok":
                print(f"{'':7} {st if st.startswith(peer) else peer + ': ' + st}")
            for key, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):  # a timing that failed (traceback: JSON)
                t = c[peer].get(key)
                if st == "ok" and isinstance(t, dict) and t.get("status") != "ok":
                    print(f"{'':7} {peer} {label}: {t.get('status')}: {t.get('error', '')}")
        if c["flex"].get("status") == "ok":
            print(f"{'':7} flex: backend {c['flex']['backend']} (attempts: {c['flex']['attempts']})")
    print("speedup = cuDNN dense ms / ours ms; TF/s ratio = ours effective / cuDNN dense; peer/ours = peer ms / ours ms"
          " (> 1: ours faster). Effective TF/s counts valid keys only (bwd = 2.5x fwd) against every query row.")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.interpret:  # before JAX's first computation: the flag the interpreter needs on few cores
        interpreter.enable()
    platform = jax.default_backend()
    if not args.interpret and platform != "gpu":
        print(f"error: the Mosaic GPU kernel needs an sm_90 GPU, JAX platform is {platform!r}; on a CPU use "
              "--small --interpret", file=sys.stderr)
        return 2
    if args.stages is not None:  # every entry point (sgm_attention included) takes its default from here
        mg.default_stages = lambda head_dim: args.stages
    info = jax_info()
    print(f"device: {info['device']} ({platform}), jax {info['jax']}, cudnn {info.get('cudnn')}; "
          f"{'INTERPRET mode: timings meaningless' if args.interpret else 'compiled'}", flush=True)
    record = {"command": [sys.executable, *sys.argv] if argv is None else ["sgm_kernel.main", *argv],
              "args": vars(args), "jax": info}
    t0 = time.perf_counter()
    checks = [] if args.skip_checks else run_checks(args)
    if args.skip_checks:
        print("WARNING: --skip-checks: correctness checks NOT run in this process", flush=True)
    record["checks"] = checks
    print(f"--- correctness checks ({time.perf_counter() - t0:.1f} s)")
    print_checks(checks)
    failed = [c["name"] for c in checks if not c["ok"]]
    if failed:
        print(f"\nCHECKS FAILED: {failed}; see the FAILED lines above (error = max|kernel - oracle| / max|oracle|). "
              "Not benchmarking.", file=sys.stderr)
        write_record(args.json, record)
        return 1
    if args.check_only:
        write_record(args.json, record)
        print("all checks passed")
        return 0

    backend = "mosaic_gpu"
    if args.interpret:  # the registered backend is GPU-only; run the same adapters in the interpreter
        backend = "mosaic_gpu_interpret"
        e = api._REGISTRY["mosaic_gpu"]
        api.register_backend(backend, functools.partial(mg._api_fwd, interpret=True),
                             functools.partial(mg._api_bwd, interpret=True), tile=e.tile, head_dims=e.head_dims,
                             dtypes=e.dtypes)
    geos = CASES["small" if args.small else "full"]
    results = {}
    try:
        for name in args.cases:
            print(f"--- case {name} ...", flush=True)
            results[name] = run_case(name, geos[name], args, backend)
    finally:
        if args.interpret:
            api._REGISTRY.pop(backend, None)
    print()
    print_table(results)
    record["cases"] = results
    write_record(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
