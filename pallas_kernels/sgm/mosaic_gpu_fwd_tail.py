"""Mosaic GPU (sm_90a) SGM forward whose third consumer runs its query block's partial last q tile transposed.

DecMem's query blocks hold 147 queries in 192 slots: two whole 64-row q tiles and a third with 19 rows in use, which
the padded forward (`mosaic_gpu_fwd.forward_call`: 3 consumers, one per q tile, on the block's shared K/V stream)
pays in full: 23.6% of its tensor-core work. With a `TailConsumer`, consumers 0 and 1 run the whole tiles as there
and consumer 2 runs the block's tail (rows 128 .. q_rows − 1, at most 32) with the queries on the N side of its
wgmmas, on the same stream, as `mosaic_gpu_tail.py` does for the dk/dv of key tails:

    Sᵀ = K·Q_tailᵀ      [width keys × 32 queries]    online softmax down the columns (max and sum over the keys)
    Oᵀ = Oᵀ·α + Vᵀ·Pᵀ    [D × 32]                     Pᵀ staged in SMEM (a wgmma's B operand)

so a step costs the CTA 2.5 tiles of tensor-core work instead of 3. A wgmma takes one swizzle for its two SMEM
operands and the [width, 32] Pᵀ stage has 64 B rows, so the V ring uses the 64 B swizzle here (the K ring keeps
128 B; the whole tiles' P·V, P in registers, reads V in either). Pallas Mosaic GPU has no transpose of register
arrays, so Oᵀ and the tail's LSE go out as transposed tails, `[(splits,) B, H, Nq, D, 32]` and `[(splits,) B, H,
Nq, 32]`, which `mosaic_gpu.forward_tail` puts in place in XLA.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sgm.mosaic_gpu_fwd import (CONSUMER_REGS, LN2, SMEM_BUDGET, TILE, mask_boxes, mma, store_out,
                                               tiled_smem)
# TAIL (32): query rows of a block's tail, the N of the third consumer's wgmmas; SWIZZLE (64 B): the Pᵀ stage's,
# hence also the V ring's
from pallas_kernels.sgm.mosaic_gpu_tail import SWIZZLE, TAIL, mma_acc_smem


def q_tail_fits(q_rows, block_q):
    """Whether query blocks of block_q slots with q_rows queries suit a TailConsumer: 3 q tiles, the last holding
    1..32 queries."""
    return q_rows is not None and block_q == 3 * TILE and 2 * TILE < q_rows <= 2 * TILE + TAIL


def q_tail_plan(p, head_dim, itemsize):
    """The forward plan `p` (3 consumers on one shared stream, no ping-pong) with its ring made shallow enough for
    the tail's own SMEM (the Pᵀ stage, Oᵀ and the LSE on their way out)."""
    if p.consumers != 3 or p.share != 3 or p.sched:
        raise ValueError(f"SGM tail consumer: needs 3 consumers on one shared stream without ping-pong, got {p}")
    extra = p.width * TAIL * itemsize + head_dim * TAIL * itemsize + TAIL * 4
    fits = [s for s in range(1, p.stages + 1)
            if dataclasses.replace(p, stages=s).smem_bytes(head_dim, itemsize) + extra <= SMEM_BUDGET]
    if not fits:
        raise ValueError(f"SGM tail consumer: plan {p} does not fit SMEM with the tail's {extra} B")
    return dataclasses.replace(p, stages=fits[-1])


@dataclasses.dataclass(frozen=True)
class TailConsumer:
    """The last consumer's work in `forward_call(final=...)`: its q tile's first `TAIL` rows, transposed."""
    plan: object
    shape: tuple  # (B, H, Nq, D)
    dtype: object
    c_log2: float
    interpret: bool
    v_swizzle: int = SWIZZLE

    def out_types(self):
        B, H, nq, d = self.shape
        lead = (self.plan.splits,) if self.plan.splits > 1 else ()
        return (jax.ShapeDtypeStruct(lead + (B, H, nq, d, TAIL), self.dtype),
                jax.ShapeDtypeStruct(lead + (B, H, nq, TAIL), jnp.float32))

    def scratch(self):
        d, dt = self.shape[3], self.dtype
        return [tiled_smem((self.plan.width, TAIL), dt, SWIZZLE),  # Pᵀ [keys, queries]
                tiled_smem((d, TAIL), dt, SWIZZLE),  # Oᵀ on its way out
                plgpu.SMEM((TAIL,), jnp.float32)]  # the LSE on its way out

    def run(self, cta, q_ref, q_smem, q_bar, code_ref, ring, outs, scratch):
        """Consumer nc − 1 of a CTA (`forward_call`'s kernel): the tail of the CTA's query block."""
        p, dt, d = self.plan, self.dtype, self.shape[3]
        k_smem, v_smem, k_rdy, v_rdy, k_done, v_done = ring
        o_t_ref, lse_t_ref = outs
        p_stage, o_stage, lse_stage = scratch
        b, h, wg = cta.b, cta.h, p.consumers - 1
        last = code_ref.shape[-1] - 1
        col = plgpu.Layout.WGMMA.reduce(0)
        plgpu.set_max_registers(CONSUMER_REGS[p.consumers], action="increase")
        tile, active, qb = cta.tile_of(wg)

        @pl.when(active)
        def _():
            q_tile = q_smem.at[wg]
            t0, n = cta.span(qb)

            @pl.when(n > 0)
            def _():
                plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(tile * TILE, TILE), h], q_tile, q_bar.at[wg])
                plgpu.barrier_wait(q_bar.at[wg])

            q_tail = q_tile.at[pl.ds(0, TAIL)]

            def step(t, carry):
                acc, m_i, l_i = carry
                bi = lax.rem(t, p.stages)  # one stream: the slots 0 .. stages − 1
                plgpu.barrier_wait(k_rdy.at[bi])
                s = mma(k_smem.at[bi], q_tail.transpose((1, 0)), (p.width, TAIL))  # [keys, queries]
                plgpu.barrier_arrive(k_done.at[bi])
                code = code_ref[b, h, qb, jnp.minimum(t0 + t, last)]
                s = mask_boxes(s * self.c_log2, code, p.box, p.nbox, axis=0)
                m_new = jnp.maximum(m_i, s.max(axis=0))  # finite: every step has a valid key
                alpha = jnp.exp2(m_i - m_new)
                pt = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [1]))
                l_i = l_i * alpha + pt.sum(axis=0)
                p_stage[...] = pt.astype(dt)
                plgpu.commit_smem()  # the staged Pᵀ is read by the wgmma below (async proxy)
                plgpu.barrier_wait(v_rdy.at[bi])
                acc = mma_acc_smem(acc * lax.broadcast_in_dim(alpha, acc.shape, [1]), v_smem.at[bi].transpose((1, 0)),
                                   p_stage, self.interpret)  # [D, queries]
                plgpu.barrier_arrive(v_done.at[bi])
                return acc, m_new, l_i

            empty = (plgpu.layout_cast(jnp.full((d, TAIL), 0.0, jnp.float32), plgpu.Layout.WGMMA),
                     plgpu.layout_cast(jnp.full((TAIL,), -jnp.inf, jnp.float32), col),
                     plgpu.layout_cast(jnp.full((TAIL,), 0.0, jnp.float32), col))
            acc, m_i, l_i = lax.fori_loop(0, n, step, empty)
            has = l_i > 0.0  # false only without steps
            l_safe = jnp.where(has, l_i, 1.0)
            inv = jnp.where(has, 1.0 / l_safe, 0.0)
            store_out(((acc * lax.broadcast_in_dim(inv, acc.shape, [1])).astype(dt), o_stage,
                       cta.out(o_t_ref, b, h, qb)),
                      (jnp.where(has, m_i * LN2 + jnp.log(l_safe), -jnp.inf), lse_stage, cta.out(lse_t_ref, b, h, qb)))
