"""The forward consumer's overlapped step loop (`StreamPlan.overlap`), optionally with a lazy rescale
(`StreamPlan.lazy`).

Overlap (FlashAttention-3's intra-warpgroup pipelining): iteration t issues QKᵀ of step t, then P·V of step t − 1,
waits for the first only (`wait_n=1`) and runs step t's softmax while P·V is still on the tensor cores.

Lazy rescale (FlashAttention-4's conditional rescaling), why: by arithmetic from the H100 timings of the rollout's
geometry (docs/benchmarks.md, session 10) a CTA step takes 1.54 us where its tensor-core work alone takes ~0.84 us
and its CUDA-core work ~0.4-0.45 us: the two barely overlap. Every step rescales the [64, D] output accumulator by
exp2(m_old − m_new) (64 multiplies a thread, a quarter of the step's arithmetic) and must first wait for the P·V in
flight. Once the running max has settled it rarely moves; the lazy loop keeps each row's max stale until some row
of the tile sees logits more than `LAZY_TAU` (log2 units) above it, and only then raises every row's max to its
true value, waits for P·V and rescales. Between those steps P = exp2(s − m_stale) <= 2^LAZY_TAU (fine in bf16 and in
the fp32 sums), and since l and the accumulator are always relative to the same m, out = acc / l and
LSE = m·ln2 + ln l are exact, as in the plain loop. The decision is one warpgroup-uniform scalar per step (a
cross-warp max of the rows' growth, through SMEM), because the wgmma wait it guards must be executed by the whole
warpgroup. Without a rescale the V slot of step t − 1 is released one iteration later, after the next `wait_n=1`
(which leaves only the newest P·V in flight). Measured in the rollout on an H100: no faster (docs/benchmarks.md), so
the step is not bound by the rescale; off by default (`mosaic_gpu.FWD_LAZY`).

Unroll (`StreamPlan.unroll`), why: P of step t − 1 is the A operand of the P·V still in flight while step t's softmax
makes P of step t. As a loop-carried value both occupy the same registers, so ptxas must finish P·V before the new P
is written, and in the SASS of 2026-12-06 (H100) it placed that wait above most of the softmax: the overlap was
mostly lost. With two steps a loop body the step in the middle produces its P in registers of its own; only every
other step's P is carried. The odd step out (n − 1 odd) runs after the pairs under lax.cond. Same arithmetic and
barrier protocol as the one-step body. Timed on an H100: 21% slower, the second P spills at 152 registers
(`mosaic_gpu.FWD_UNROLL`, off).

Row sums on the tensor cores (`StreamPlan.rowsum`, on by default), why: with 64-key steps a consumer thread's
softmax is ~200 arithmetic instructions a step, 36 of them the row sum (32 adds and the quad shuffles); the step is
bound by instruction issue while the tensor pipe is ~60% busy (ncu, docs/benchmarks.md). Instead each step issues P
times a [width, 16] SMEM block of ones into a second [64, 16] fp32 accumulator just before its QKᵀ (so the QKᵀ wait
covers it); that accumulator is rescaled with the output one, and at the end every one of its columns holds the
row's l. l is then the sum of the *rounded* P, the values P·V multiplied, so out = acc / l normalises exactly what
was accumulated. The rescale costs 8 multiplies a thread a step where the reduction cost 36 instructions. Timed on
an H100 (2026-12-06): the rollout geometry's forward -2.5% (1.403 against 1.437 ms, 11 interleaved rounds), the
rollout -0.5%. A form that took a fresh accumulator each step (issued after QKᵀ, its row max added to l on the CUDA
cores) was right and 5.3% slower; an earlier in-place form lost all but the last step's sums (its code is gone, the
fault not isolated; a micro-kernel shows in-place accumulation across loop steps, rescaled or not, right on the
same GPU). The interpreter sums the rounded P on the CUDA cores.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sgm import mosaic_gpu_fwd as fwd
from pallas_kernels.sgm.mosaic_gpu_fwd import (ROWSUM_N, TILE, mask_boxes, online_softmax, row_vector, smem_dot,
                                               zeros_acc)

LAZY_TAU = 8.0  # log2 units: P stays <= 256 between rescales


def lazy_softmax(s, code, m_i, l_i, c_log2, plan, dt):
    """One step of the online softmax with a lazily raised max (m_i finite: not the first step). Returns (p, m, l,
    alpha, need): need is the warpgroup-uniform flag of a step that raised the max (then alpha < 1 somewhere and the
    accumulator must be rescaled); otherwise m = m_i and alpha = 1."""
    s, c = fwd.prescaled(s, c_log2, fwd.FOLD_SCALE)
    s = mask_boxes(s, code, plan.box, plan.nbox)
    m_true = jnp.maximum(m_i, s.max(axis=1) * c)
    need = jnp.max(m_true - m_i) > LAZY_TAU
    m_new = m_i + need.astype(jnp.float32) * (m_true - m_i)
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(fwd.scaled_minus(s, c, m_new))
    return p.astype(dt), m_new, l_i * alpha + p.sum(axis=1), alpha, need


def overlapped_steps(n, code_at, q_tile, ring, c_log2, plan, dt, d, interpret, row_groups=None, ones=None):
    """The forward's n >= 1 steps with QKᵀ and P·V in flight together. When P_{t−1}·V_{t−1} is added the
    accumulator holds the earlier steps rescaled to m_{t−1}, as in the plain loop, so the result is the plain
    loop's up to fp32 rounding (with plan.lazy: up to the rounding of a different max). Costs a second logits
    accumulator live beside P (registers). Returns (acc [64, d] fp32, m, l) as the plain loop does.

    On hardware the output accumulator is a WGMMA accumulator ref that the P·V wgmmas add into asynchronously. The
    GPU interpreter of jax 0.11.2 can neither store into accumulator refs nor take register operands (`mma_acc`), so
    there the output is a value carried through the loop and P·V a dot computed on the spot: same barrier protocol,
    same arithmetic, no overlap."""
    slot, k_smem, v_smem, k_rdy, v_rdy, k_done, v_done = ring
    f32 = jnp.float32
    lazy = plan.lazy and row_groups is None  # packed-tails rows may see no key in a step: exact max only
    rowsum = plan.rowsum

    def run(acc_o, acc_l=None):  # acc_o, acc_l: accumulator refs (hardware) or None (interpret)
        if rowsum and acc_o is not None:
            ones[...] = plgpu.layout_cast(jnp.full(ones.shape, 1.0, f32), plgpu.Layout.WGMMA).astype(dt)
            plgpu.commit_smem()  # visible to the wgmma (async proxy), every thread of the warpgroup past its store

        def add_row_sums(p, l_i):
            """(rowsum) Adds P's row sums: on hardware P·ones is issued into the [64, ROWSUM_N] accumulator,
            which is rescaled with the output one (every column holds the row's sum; l_i stays 0 until the end);
            the interpreter sums the rounded P on the CUDA cores."""
            if not rowsum:
                return l_i
            if acc_l is None:
                return l_i + p.astype(f32).sum(axis=1)
            plgpu.wgmma(acc_l, p, ones)
            return l_i

        def logits(t, p_prev=None, acc=None):
            """Issues QKᵀ of step t and then, given p_prev, P·V of step t − 1; waits for the QKᵀ (and everything
            issued before it) only. Returns the raw logits and (interpret mode) the updated output value."""
            def body(acc_s):
                bi = slot(t)
                plgpu.barrier_wait(k_rdy.at[bi])
                plgpu.wgmma(acc_s, q_tile, k_smem.at[bi].transpose((1, 0)))
                if p_prev is None:
                    return acc_s[...], acc
                bv = slot(t - 1)
                plgpu.barrier_wait(v_rdy.at[bv])
                if acc_o is None:
                    return acc_s[...], acc + smem_dot(p_prev, v_smem.at[bv])
                plgpu.wgmma(acc_o, p_prev, v_smem.at[bv])
                return plgpu.wgmma_accumulator_load(acc_s, wait_n=1), acc  # P·V may still run
            return pl.run_scoped(body, plgpu.ACC((TILE, plan.width), f32))

        acc = zeros_acc(d) if acc_o is None else None
        s, _ = logits(0)
        plgpu.barrier_arrive(k_done.at[slot(0)])
        p, m_i, l_i, _ = online_softmax(s, code_at(0), row_vector(-jnp.inf), row_vector(0.0), c_log2, plan, dt,
                                        row_groups, row_sum=not rowsum)

        def rescale(acc, alpha):
            scale = lambda x: x * lax.broadcast_in_dim(alpha, x.shape, [0])
            if acc_o is None:
                return scale(acc)
            plgpu.wgmma_wait(0)
            acc_o[...] = scale(acc_o[...])
            if acc_l is not None:
                acc_l[...] = scale(acc_l[...])
            return acc

        def step(t, carry):
            p, m_i, l_i, cd, acc, held = carry
            cd_next = code_at(t + 1)
            l_i = add_row_sums(p, l_i)  # P of step t − 1, before its P·V; rescaled with it below
            s, acc = logits(t, p, acc)
            plgpu.barrier_arrive(k_done.at[slot(t)])
            if not lazy:
                p, m_new, l_i, alpha = online_softmax(s, cd, m_i, l_i, c_log2, plan, dt, row_groups,
                                                      row_sum=not rowsum)
                acc = rescale(acc, alpha)
                plgpu.barrier_arrive(v_done.at[slot(t - 1)])
                return p, m_new, l_i, cd_next, acc, held
            # P·V of step t − 2 has landed (wait_n=1 above): release its V slot if the last step kept it
            pl.when(held)(lambda: plgpu.barrier_arrive(v_done.at[slot(t - 2)]))
            p, m_new, l_i, alpha, need = lazy_softmax(s, cd, m_i, l_i, c_log2, plan, dt)
            if acc_o is None:  # the value path: alpha is exactly 1 where no row's max was raised
                acc = rescale(acc, alpha)

            @pl.when(need)
            def _():  # a raised max: wait for P·V of step t − 1, rescale, release its V slot now
                if acc_o is not None:
                    rescale(None, alpha)
                plgpu.barrier_arrive(v_done.at[slot(t - 1)])
            return p, m_new, l_i, cd_next, acc, jnp.logical_not(need)

        carry = (p, m_i, l_i, code_at(1), acc, jnp.bool_(False))
        if plan.unroll:  # steps 1 .. n−1 two a body, then the odd one out
            carry = lax.fori_loop(0, (n - 1) // 2, lambda i, c: step(2 * i + 2, step(2 * i + 1, c)), carry)
            carry = lax.cond(lax.rem(n - 1, 2) == 1, lambda c: step(n - 1, c), lambda c: c, carry)
        else:
            carry = lax.fori_loop(1, n, step, carry)
        p, m_i, l_i, _, acc, held = carry
        bv = slot(n - 1)
        plgpu.barrier_wait(v_rdy.at[bv])
        l_i = add_row_sums(p, l_i)
        if acc_o is None:
            acc = acc + smem_dot(p, v_smem.at[bv])
        else:
            plgpu.wgmma(acc_o, p, v_smem.at[bv])
            acc = acc_o[...]  # waits for every P·V
        if lazy:  # the V slot of step n − 2, if the last iteration kept it
            pl.when(held)(lambda: plgpu.barrier_arrive(v_done.at[slot(n - 2)]))
        if acc_l is not None:
            l_i = acc_l[...].max(axis=1)  # every column holds the row's sum (the load above waited for it)
        plgpu.barrier_arrive(v_done.at[bv])
        return acc, m_i, l_i

    if interpret:
        return run(None)
    if rowsum:
        return pl.run_scoped(run, plgpu.ACC((TILE, d), f32), plgpu.ACC((TILE, ROWSUM_N), f32))
    return pl.run_scoped(run, plgpu.ACC((TILE, d), f32))
