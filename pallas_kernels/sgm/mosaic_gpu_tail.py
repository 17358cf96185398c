"""Mosaic GPU (sm_90a) dk/dv of key-block tails, in the transposed orientation.

The dk/dv kernel (`mosaic_gpu_bwd.dkv_call`) puts keys on the M side of its wgmmas, 64 rows a tile. A block whose
last non-empty 64-row tile holds at most 32 valid keys (DecMem: 147 = 64 + 64 + 19) would pay a full tile for them.
This kernel takes such tails instead, with the keys on the N side, 32 columns:

    S  = q·K_tailᵀ        [64 queries × 32 keys]       P  = exp2(c·S − lse2)
    dP = dO·V_tailᵀ       [64 × 32]                    dS = P ∘ (dP − Δ)
    dV_tailᵀ += dOᵀ·P     [D × 32]  (M = D)            dK_tailᵀ += qᵀ·dS  [D × 32]

P and dS are staged in SMEM (a wgmma's B operand), and dOᵀ, qᵀ are transposed views of the q/dO ring slots (A
operands), so every SMEM operand uses the 64 B swizzle of the 32-column tiles (wgmma needs one swizzle for A and B).
Per step this is half the tensor-core work of a 64-key tile. The query side is the dk/dv kernel's (`QStream`: the
reverse lists, whole q tiles or packed 32-row boxes). 2 consumers, one key block each, + 1 producer.

Outputs are transposed tails `[B, H, Nk, D, 32]`: `mosaic_gpu.sgm_backward_mgpu` writes them into dk, dv at the tail
rows (the dk/dv kernel skips those tiles and writes zeros there). Deterministic: fixed order, no atomics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sgm import mosaic_gpu_fwd as fwd
from pallas_kernels.sgm.mosaic_gpu_bwd import _COMMON, QStream
from pallas_kernels.sgm.mosaic_gpu_fwd import (CONSUMER_REGS, LOG2E, TILE, interpret_params, mask_tail, mma,
                                               store_out, tiled_smem)

TAIL = 32  # key rows of a tail: the N of its wgmmas
SWIZZLE = 64  # bytes: 32 16-bit columns


def tail_plan(lens):
    """Per key block `[B, Nk]` (valid keys first): (first row of its last non-empty 64-row tile within the block,
    valid keys in that tile, whether the tail kernel takes it: 1..32 valid keys)."""
    last = jnp.maximum((lens + TILE - 1) // TILE - 1, 0)
    valid = lens - last * TILE
    return last * TILE, valid, (lens > 0) & (valid <= TAIL)


def mma_acc_smem(acc, a, b, interpret):
    """acc + a @ b with both operands SMEM refs (a possibly a transposed view), accumulated in fp32. The GPU
    interpreter of jax 0.11.2 cannot accumulate into an initialised WGMMA accumulator (`mosaic_gpu_fwd.mma_acc`), so
    there a fresh product is added instead (same operands, fp32)."""
    if interpret:
        return acc + mma(a, b, acc.shape)

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(body)(plgpu.ACC.init(acc))


def dkv_tail_call(q, k, v, do, lse2, delta, rev, tail_row, tail_valid, tboxes, *, block_q, scale, stages,
                  interpret, q_rows=None):
    """(dk_t, dv_t) `[B, H, Nk, D, 32]` in k.dtype: dKᵀ and dVᵀ of every key block's tail (rows tail_row[b, kb] ..
    + 32 of the flat Tk axis, tail_valid[b, kb] of them valid; int32 `[B, Nk]`), zeros for a block with no step.
    tboxes int32 `[B, H, Nk]`: q boxes per key block (reverse count × `query_boxes(block_q, q_rows)[1]`, 0 for a
    block the kernel does not take). rev, lse2, delta, q_rows: as for `mosaic_gpu_bwd.dkv_call`."""
    B, Tq, H, D = q.shape
    Nk = rev.shape[2]
    dt = k.dtype
    S = stages
    qs = QStream(block_q, q_rows, stages, D, dt, swizzle=SWIZZLE)
    c_log2 = float(scale) * LOG2E
    row_vec = plgpu.Layout.WGMMA.reduce(1)

    def sgm_dkv_tail(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rev_ref, row_ref, valid_ref, n_ref,
                     dk_ref, dv_ref, k_smem, v_smem, kv_bar, p_smem, ds_smem, out_smem, *rings):
        q_smem, do_smem, lse_smem, delta_smem, q_rdy, do_rdy, lse_rdy, delta_rdy, q_done, do_done = rings
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        pair, wg = lax.axis_index("pair"), lax.axis_index("wg")

        def block_of(c):  # key block of consumer c, whether it exists
            kb = pair * 2 + c
            return jnp.minimum(kb, Nk - 1), kb < Nk

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(CONSUMER_REGS[2], action="increase")
            kb, active = block_of(wg)

            @pl.when(active)
            def _():
                k_tail, v_tail = k_smem.at[wg], v_smem.at[wg]
                nb = n_ref[b, h, kb]
                n = qs.steps(nb)
                rows_k = pl.ds(pl.multiple_of(row_ref[b, kb], TAIL), TAIL)

                @pl.when(n > 0)
                def _():
                    plgpu.copy_gmem_to_smem(k_ref.at[b, rows_k, h], k_tail, kv_bar.at[wg * 2])
                    plgpu.copy_gmem_to_smem(v_ref.at[b, rows_k, h], v_tail, kv_bar.at[wg * 2 + 1])
                    plgpu.barrier_wait(kv_bar.at[wg * 2])
                    plgpu.barrier_wait(kv_bar.at[wg * 2 + 1])

                kval = valid_ref[b, kb]
                p_stage, ds_stage = p_smem.at[wg], ds_smem.at[wg]

                def step(t, carry):
                    dkt, dvt = carry
                    bi = wg * S + lax.rem(t, S)
                    q_slot, do_slot = q_smem.at[bi], do_smem.at[bi]
                    plgpu.barrier_wait(q_rdy.at[bi])
                    plgpu.barrier_wait(lse_rdy.at[bi])
                    s = mma(q_slot, k_tail.transpose((1, 0)), (TILE, TAIL))  # [queries, keys]
                    s, c = fwd.prescaled(s, c_log2, fwd.FOLD_SCALE_BWD)
                    s = mask_tail(s, kval, axis=1)
                    if qs.nbox > 1:  # the unused box of a half step holds a real (repeated) box: masked out
                        s = mask_tail(s, qs.used_rows(t, nb), axis=0)
                    lse = plgpu.load(lse_smem.at[bi], layout=row_vec)
                    p = jnp.exp2(fwd.scaled_minus(s, c, lse))
                    plgpu.barrier_wait(do_rdy.at[bi])
                    plgpu.barrier_wait(delta_rdy.at[bi])
                    dp = mma(do_slot, v_tail.transpose((1, 0)), (TILE, TAIL))
                    delta = plgpu.load(delta_smem.at[bi], layout=row_vec)
                    ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                    p_stage[...] = p.astype(dt)
                    ds_stage[...] = ds.astype(dt)
                    plgpu.commit_smem()  # the staged P and dS are read by the wgmmas below (async proxy)
                    dvt = mma_acc_smem(dvt, do_slot.transpose((1, 0)), p_stage, interpret)  # [D, keys]
                    plgpu.barrier_arrive(do_done.at[bi])
                    dkt = mma_acc_smem(dkt, q_slot.transpose((1, 0)), ds_stage, interpret)
                    plgpu.barrier_arrive(q_done.at[bi])
                    return dkt, dvt

                zeros = plgpu.layout_cast(jnp.full((D, TAIL), 0.0, jnp.float32), plgpu.Layout.WGMMA)
                dkt, dvt = lax.fori_loop(0, n, step, (zeros, zeros))
                store_out(((dkt * scale).astype(dt), out_smem.at[wg, 0], dk_ref.at[b, h, kb]),
                          (dvt.astype(dt), out_smem.at[wg, 1], dv_ref.at[b, h, kb]))

        @pl.when(wg == 2)
        def _producer():
            streams = []
            for c in range(2):
                kb, active = block_of(c)
                streams.append((kb, n_ref[b, h, kb], active))
            qs.producer(b, h, streams, rev_ref, (q_ref, lse_ref, do_ref, delta_ref), rings)

    out = jax.ShapeDtypeStruct((B, H, Nk, D, TAIL), dt)
    kernel = plgpu.kernel(
        sgm_dkv_tail,
        out_type=(out, out),
        scratch_types=[
            tiled_smem((2, TAIL, D), dt, SWIZZLE),  # K tails
            tiled_smem((2, TAIL, D), dt, SWIZZLE),  # V tails
            plgpu.Barrier(num_barriers=4),
            tiled_smem((2, TILE, TAIL), dt, SWIZZLE),  # staged P
            tiled_smem((2, TILE, TAIL), dt, SWIZZLE),  # staged dS
            tiled_smem((2, 2, D, TAIL), dt, SWIZZLE),  # dKᵀ, dVᵀ on their way out
            *qs.scratch(),
        ],
        grid=(H, -(-Nk // 2), B),
        grid_names=("heads", "pair", "batch"),
        interpret=interpret_params(interpret),
        **_COMMON,
    )
    return kernel(q, k, v, do, lse2, delta, rev, tail_row, tail_valid, tboxes)
