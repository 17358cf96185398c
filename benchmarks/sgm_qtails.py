"""The SGM forwards that skip the padding rows of query blocks against the padded forward, same run: packed query
tails (`mosaic_gpu.forward_packed`) and the transposed tail consumer (`mosaic_gpu.forward_tail`, variant `tail_t`).

Geometry: the rollout's CFG-folded history call (48 query blocks of 192 slots, 147 in use, against 360 key blocks of
147/146 valid keys, top-80, 12 heads, D 128, bf16). The packed forward's cost depends on how many key blocks three
neighbouring query blocks select in common, so the lists are drawn with a pool of `--shared` blocks common to each
group of three (0: independent random lists; the rollout benchmark's real lists are near 70: three neighbours of a
frame select 107 distinct blocks of 240; the tail consumer does not depend on it). Every case first checks each
variant's output against the padded kernel on the rows in use (and that the padding rows are 0 with LSE -inf), then
times them all (median of `--repeats` samples of `--inner` back-to-back calls). `--plans` also times the packed
forward under plan overrides of its whole-tile part (e.g. `overlap=1,width=64;box=64,sched=1`), to tune it.

  python3 benchmarks/sgm_qtails.py                     # H100/H200
  python3 benchmarks/sgm_qtails.py --small --interpret # CPU smoke run in the Mosaic GPU interpreter (seconds)
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import guarded, jax_info, timed, write_record  # noqa: E402
from pallas_kernels import interpreter  # noqa: E402

GEOMETRY = {"full": dict(B=1, H=12, D=128, NQ=48, NK=360, K=80, BQ=192, rows=147, lens=(147, 147, 147, 147, 146, 146)),
            "small": dict(B=1, H=1, D=64, NQ=6, NK=12, K=4, BQ=192, rows=147, lens=(147, 147, 146))}


# StreamPlan overrides
FIELDS = ("width", "box", "consumers", "share", "splits", "stages", "sched", "overlap", "unroll", "rowsum")
FLAGS = ("sched", "overlap", "unroll", "rowsum")  # the bool fields


def parse_plans(text):
    """'width=64;box=64,sched=1' -> [((width, 64), (box, 64)), ((sched, True),)] (ints; FLAGS as bools)."""
    plans = []
    for spec in filter(None, text.split(",")):
        items = []
        for kv in spec.split(";"):
            key, _, value = kv.partition("=")
            if key not in FIELDS or not value.isdigit():
                raise ValueError(f"--plans: bad entry {kv!r} (expected field=int with field in {', '.join(FIELDS)})")
            items.append((key, bool(int(value)) if key in FLAGS else int(value)))
        plans.append(tuple(items))
    return plans


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", default="0,50,70", help="comma list: key blocks shared by each group of 3 query blocks")
    p.add_argument("--plans", default="", help="comma list of plan overrides for the packed forward's whole tiles, "
                                               "fields joined by ';' (e.g. width=64;box=64,sched=1)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--small", action="store_true", help="toy geometry (with --interpret: a CPU smoke run)")
    p.add_argument("--interpret", action="store_true", help="run the kernels in the Mosaic GPU interpreter")
    p.add_argument("--json", default=None, help="output (default $OUT/sgm_qtails.json or out/sgm_qtails.json)")
    args = p.parse_args(argv)
    try:
        args.shared = [int(s) for s in args.shared.split(",") if s]
        args.plans = parse_plans(args.plans)
    except ValueError as e:
        p.error(str(e))
    k = GEOMETRY["small" if args.small else "full"]["K"]
    if not args.shared or min(args.shared) < 0 or max(args.shared) > k:
        p.error(f"--shared values must lie in [0, top-k = {k}]")
    if args.repeats < 1 or args.inner < 1:
        p.error("--repeats and --inner must be >= 1")
    if args.json is None:
        out = os.environ.get("OUT")
        args.json = str(pathlib.Path(out) / "sgm_qtails.json") if out else "out/sgm_qtails.json"
    return args


def make_inputs(g, shared, seed=0):
    r = np.random.default_rng(seed)
    qkv = [jnp.asarray(r.normal(0.0, 1.0, (g["B"], n * g["BQ"], g["H"], g["D"])), jnp.bfloat16)
           for n in (g["NQ"], g["NK"], g["NK"])]
    idx = np.zeros((g["B"], g["H"], g["NQ"], g["K"]), np.int64)
    for b, h, grp in np.ndindex(g["B"], g["H"], g["NQ"] // 3):
        pool = r.choice(g["NK"], g["K"], replace=False)
        rest = np.setdiff1d(np.arange(g["NK"]), pool)
        for j in range(3):
            own = r.choice(rest, g["K"] - shared, replace=False)
            idx[b, h, 3 * grp + j] = np.sort(np.concatenate([r.choice(pool, shared, replace=False), own]))
    cnt = jnp.full(idx.shape[:3], g["K"], jnp.int32)
    lens = jnp.asarray(np.tile(np.asarray(g["lens"]), g["NK"] // len(g["lens"]))[None].repeat(g["B"], 0), jnp.int32)
    return (*qkv, jnp.asarray(idx, jnp.int32), cnt, lens)


def run_case(g, shared, plans, args):
    from pallas_kernels.sgm.lists import union_lists
    from pallas_kernels.sgm.mosaic_gpu import sgm_forward_mgpu

    inputs = make_inputs(g, shared)
    union = float(np.asarray(union_lists(inputs[3], inputs[4], 3)[1]).mean())
    kw = dict(block_q=g["BQ"], block_kv=g["BQ"], interpret=args.interpret)
    padded = jax.jit(functools.partial(sgm_forward_mgpu, q_tail_t=False, **kw))
    packed = functools.partial(sgm_forward_mgpu, q_rows=g["rows"], q_tails=True, q_tail_t=False, **kw)
    variants = {"packed": jax.jit(packed),
                "tail_t": jax.jit(functools.partial(sgm_forward_mgpu, q_rows=g["rows"], q_tail_t=True, **kw))}
    for plan in plans:
        name = "packed[" + ";".join(f"{k}={int(v)}" for k, v in plan) + "]"
        variants[name] = jax.jit(functools.partial(packed, plan=plan))
    keep = (np.arange(g["NQ"] * g["BQ"]) % g["BQ"]) < g["rows"]
    sync = jax.block_until_ready
    ref, t_ref = timed(lambda: padded(*inputs), sync, 2, args.repeats, args.inner)
    ref_o = np.asarray(ref[0], np.float32)[:, keep]
    row = {"shared": shared, "mean_union": union, "padded_ms": t_ref["median_ms"], "variants": {}}
    for name, f in variants.items():
        def one(f=f):
            out, t = timed(lambda: f(*inputs), sync, 2, args.repeats, args.inner)
            o, lse = np.asarray(out[0], np.float32), np.asarray(out[1])
            err = float(np.abs(o[:, keep] - ref_o).max() / np.abs(ref_o).max())
            pad_ok = bool((o[:, ~keep] == 0).all() and np.isneginf(lse[..., ~keep]).all())
            if err > 2e-2 or not pad_ok:
                raise AssertionError(f"{name}: rows in use differ from the padded kernel by {err:.2e} of the max "
                                     f"(bound 2e-2) or padding rows not 0/-inf ({pad_ok})")
            return {"status": "ok", "ms": t["median_ms"], "ratio": t["median_ms"] / t_ref["median_ms"], "err": err}
        row["variants"][name] = guarded(one)
    return row


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.interpret:  # before JAX's first computation: the flag the interpreter needs on few cores
        interpreter.enable()
    g = GEOMETRY["small" if args.small else "full"]
    rows = [run_case(g, s, args.plans, args) for s in args.shared]
    print(f"\n{'shared':>7} {'union':>7} {'padded ms':>10}  variant: ms (packed / padded, err)")
    for r in rows:
        cells = "  ".join(f"{n}: {v['ms']:.3f} ({v['ratio']:.3f}, {v['err']:.1e})" if v.get("status") == "ok"
                          else f"{n}: {v.get('status')}" for n, v in r["variants"].items())
        print(f"{r['shared']:>7} {r['mean_union']:>7.1f} {r['padded_ms']:>10.3f}  {cells}")
    print("# ratio < 1: faster than the padded forward; union = key blocks a packed tail tile walks (of 3 x top-k)")
    record = {"command": [sys.executable, *sys.argv], "args": {k: v for k, v in vars(args).items()},
              "geometry": g, "jax": jax_info(), "rows": rows}
    write_record(args.json, record)
    return record


if __name__ == "__main__":
    main()
