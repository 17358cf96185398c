"""Plan sweeps of benchmarks/sgm_kernel.py (--sweep): the Mosaic GPU SGM forward under alternative StreamPlans and
the backward under alternative dq plans and dk/dv variants, each checked against the automatic plan's result, then
timed together in interleaved rounds (a GPU's speed drifts during a run by more than the differences a sweep looks
for: on 2026-12-04 one plan timed three times one after another spread over 16%)."""

from __future__ import annotations

import dataclasses
import statistics

import jax

from benchmarks.common import guarded, jax_block, sample_ms
from benchmarks.sgm_peers import ms_of as _ms
from benchmarks.sgm_peers import rel
from pallas_kernels.sgm import mosaic_gpu as mg

# forward plan variants timed by --sweep (StreamPlan field overrides; {} = the automatic plan)
SWEEP = {
    "vsa": [{}, dict(width=128), dict(consumers=3, share=1), dict(stages=1), dict(overlap=True)],
    "decmem": [{}, dict(splits=1), dict(splits=2), dict(splits=3), dict(box=64), dict(width=128, splits=2),
               dict(consumers=2, share=1, box=64, width=64, splits=1),  # = the first (e792bb1) kernel
               dict(sched=True), dict(sched=True, splits=2),
               dict(overlap=True), dict(overlap=True, splits=2),  # QKᵀ of step t+1 beside P·V of step t
               dict(overlap=True, width=128, splits=2),  # wider steps; may spill (3 consumers at 152 registers)
               dict(overlap=True, unroll=True),  # two steps a loop body: each step's P in its own registers
               dict(overlap=True, rowsum=False),  # row sums on the CUDA cores (the default: P·ones, tensor cores)
               dict(splits=4), dict(splits=6)],  # fuller last wave (the automatic 3 leaves 6.5 waves), more to merge
    "decmem_cfg": [{}, dict(splits=2), dict(splits=3), dict(sched=True), {}, dict(overlap=True),
                   dict(overlap=True, splits=3), dict(overlap=True, unroll=True),  # {} twice: the run's drift
                   dict(overlap=True, rowsum=False)],
    "decmem_train": [{}, {}, dict(overlap=True), dict(overlap=True, unroll=True), dict(overlap=True, rowsum=False)],
}
# backward variants timed by --sweep (the whole backward is timed): dq plan overrides; q_boxes=True, the dk/dv kernel
# streaming only the 147 query rows in use as packed 32-row boxes instead of whole q tiles (the cotangent is zero
# past them either way); k_tails=True, the 19-key tails of the key blocks through the transposed tail kernel instead
# of full 64-key tiles. All variants must give the same gradients (up to fp32 summation order).
# dkv_share=True, a dk/dv CTA's two tiles of one key block on one query stream. dkv_overlap=True / overlap=True (a dq
# plan field), the dk/dv / dq consumers' wgmmas in flight during their own exp2 and dS arithmetic.
PACKED = dict(q_boxes=True, k_tails=True)
SHARED = dict(PACKED, dkv_share=True)
# each backward kernel's intra-consumer overlap alone, then both (on top of the case's defaults)
OVERLAPS = (dict(dkv_overlap=True), dict(overlap=True), dict(overlap=True, dkv_overlap=True))
# dq with 2 consumers on their own lists (232 registers each instead of 3 x 152 on one stream): room for the overlap's
# second logits tile, which spilled at 152 (2026-12-05, H100: +58%); plain and overlapped, then the default again
DQ_OWN2 = (dict(consumers=2, share=1), dict(consumers=2, share=1, overlap=True), {})
SWEEP_DQ = {
    "vsa": [],
    "decmem": [{}, dict(q_boxes=True), dict(k_tails=True), PACKED, SHARED, dict(dkv_share=True),
               dict(consumers=2, share=1), {}, PACKED, SHARED, *OVERLAPS, {}, *DQ_OWN2],
    "decmem_cfg": [{}, PACKED, SHARED, {}, PACKED, SHARED, *OVERLAPS, {}],
    "decmem_train": [{}, PACKED, SHARED, {}, PACKED, SHARED, *OVERLAPS, {}, *DQ_OWN2],
}
DKV_SWITCHES = ("q_boxes", "k_tails", "dkv_share", "dkv_overlap")  # sgm_backward_mgpu arguments, not dq plan fields



def interleaved(fns, a, args):
    """ms per call of each fn (rows of stats), timed in `args.rounds` rounds that visit every fn in turn, so that a
    drift of the GPU's speed during the sweep falls on all plans alike; a sample is `args.inner` calls back to back
    (one host sync), `args.repeats` samples per fn and round."""
    for f in fns:
        for _ in range(max(args.warmup, 1)):
            jax_block(f(*a))
    samples = [[] for _ in fns]
    for _ in range(args.rounds):
        for i, f in enumerate(fns):
            for _ in range(args.repeats):
                samples[i].append(sample_ms(lambda f=f: f(*a), jax_block, args.inner)[1])
    return [{"status": "ok", "median_ms": statistics.median(x), "min_ms": min(x), "runs_ms": x,
             "round_medians_ms": [statistics.median(x[r * args.repeats:(r + 1) * args.repeats])
                                  for r in range(args.rounds)]} for x in samples]


def _sweep(label, name, plans, a, check, args, extra=None):
    """Builds and checks each plan (check(plan overrides) -> (row, fn); a failed check leaves fn None), then times
    the ones that passed together (`interleaved`) and prints one line each."""
    rows, fns = [], []
    for over in plans:
        try:
            row, f = check(over)
        except Exception as e:  # noqa: BLE001 -- a plan that does not build is reported, not fatal
            row, f = {"plan_overrides": over, "status": f"failed: {type(e).__name__}: {str(e)[:300]}"}, None
        rows.append(row)
        fns.append(f)
    timed_rows = [r for r, f in zip(rows, fns) if f is not None]
    res = guarded(lambda: {"rows": interleaved([f for f in fns if f is not None], a, args)})
    for r, stats in zip(timed_rows, res.get("rows") or [res] * len(timed_rows)):  # or: the timing's error, on all
        r.update(stats)
        if extra and _ms(r):
            r.update(extra(r))
    for row in rows:
        p = row.get("plan", {})
        fields = ("consumers", "share", "box", "width", "stages", "splits", "sched", "overlap")
        desc = " ".join(f"{k}={p.get(k)}" for k in fields)
        desc += "".join(f" {n}={row[n]}" for n in DKV_SWITCHES if n in row)
        ms = _ms(row)
        spread = "/".join(f"{x:.3f}" for x in row.get("round_medians_ms", []))
        print(f"  sweep {label}{name:7} {desc:62} {f'{ms:.3f} ms' if ms else row.get('status', '?')[:60]:>12} "
              f"(rounds {spread})", flush=True)
    return rows


def sweep_case(name, c, ref_out, args, *, tol, flops):
    """Forward under each plan of SWEEP[name]: checked against the automatic plan's (oracle-checked) output, then
    timed directly (not through sgm_attention), all plans interleaved. tol: the forward's error bound (relative to
    the max); flops: the case's effective forward FLOPs, for TFLOP/s. Returns rows for the JSON."""
    g = dict(block_q=c["bq"], block_kv=c["bkv"])
    a = (c["q"], c["k"], c["v"], c["idx"], c["cnt"], c["lens"])
    picks = pick(SWEEP[name], args.sweep_fwd)

    def check(over):
        row = {"plan_overrides": over}
        row["plan"] = dataclasses.asdict(mg.forward_plan(c["q"].shape, c["bq"], c["bkv"], c["q"].dtype, plan=over))
        f = jax.jit(lambda *x, over=tuple(sorted(over.items())): mg.sgm_forward_mgpu(*x, **g, plan=over,
                                                                            interpret=args.interpret)[0])
        row["rel_err_vs_auto"] = err = rel(f(*a), ref_out)
        if not err <= tol:
            row["status"] = f"mismatch vs the automatic plan: {err:.2e}"
            return row, None
        return row, f
    return _sweep("", name, picks, a, check, args, extra=lambda r: {"eff_tflops": flops / _ms(r) / 1e9})


def sweep_dq(name, c, out, lse, cot, args, *, tol):
    """The backward under each dq plan of SWEEP_DQ[name], checked against the first plan's dq, then timed (all
    plans interleaved). tol: the gradients' error bound."""
    g = dict(block_q=c["bq"], block_kv=c["bkv"], interpret=args.interpret)
    a = (c["q"], c["k"], c["v"], out, lse, cot, c["idx"], c["cnt"], c["lens"])
    ref = {}

    def check(over):
        row = {"dq_plan_overrides": over}
        over = dict(over)
        dkv = {n: over.pop(n, None) for n in DKV_SWITCHES}
        row["plan"] = dataclasses.asdict(mg.dq_plan(c["q"].shape, c["bq"], c["bkv"], c["q"].dtype, plan=over))
        defaults = dict(q_boxes=mg.Q_BOXES, k_tails=mg.K_TAILS, dkv_share=mg.DKV_SHARE, dkv_overlap=mg.DKV_OVERLAP)
        row.update({n: defaults[n] if dkv[n] is None else dkv[n] for n in DKV_SWITCHES})
        f = jax.jit(lambda *x, over=tuple(sorted(over.items())): mg.sgm_backward_mgpu(
            *x, **g, q_rows=c.get("q_rows"), **dkv, dq_plan_overrides=over))
        grads = f(*a)
        ref.setdefault("grads", grads)
        errs = [rel(x, y) for x, y in zip(grads, ref["grads"])]
        row["dq_rel_err_vs_auto"], row["dkv_rel_err_vs_auto"] = errs[0], max(errs[1:])
        if not max(errs) <= tol:
            row["status"] = f"mismatch vs the automatic plan: {max(errs):.2e}"
            return row, None
        return row, f
    return _sweep("dq ", name, pick(SWEEP_DQ[name], args.sweep_bwd), a, check, args)


def pick(plans, indices):
    """The plans at the comma-separated `indices` (None: all)."""
    return plans if indices is None else [plans[int(i)] for i in indices.split(",") if i]
