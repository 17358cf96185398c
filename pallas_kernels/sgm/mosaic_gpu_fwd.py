"""Mosaic GPU (sm_90a) SGM forward kernel and the helpers the backward kernels share (`mosaic_gpu_bwd.py`).

Design (kernels.md §5.3, option (a)): every CTA holds 3 warpgroups: 2 consumers, each owning one 64-row q tile with
its *own* step list and its own K/V ring in SMEM, plus 1 producer warpgroup that reads the step lists from GMEM and
issues the TMA loads of the selected 64-row key sub-tiles into both rings. Why (a) and not one CTA per query block with
3 consumers sharing one KV stream ((b), which would cut K/V traffic 3× for 192-slot DecMem blocks): (a) is the layout
of the measured prototype (478–486 TFLOP/s at 90% sparsity), works unchanged for 64-token VSA cubes and for any
block_q multiple of 64 (a 192-slot block is simply 3 tiles with the same list), and keeps 2 consumers per CTA with the
reference kernel's 232/40 register split; (b) needs 4 warpgroups (≈157 registers per consumer thread) and a different
CTA shape per block size. Consumers do not ping-pong on a schedule barrier: their step counts differ.

Steps: a "step" is one 64-row sub-tile of a selected key block that holds >= 1 valid key (`lists.subtile_steps`), so
empty blocks and the empty tail of a partial block cost nothing, and the -inf mask is applied (under `lax.cond`) only
on a partial step. Every step has a valid key, so after the first step the running max is finite and no NaN appears;
a tile with 0 steps writes O = 0 and LSE = −inf.

Barrier protocol per consumer ring slot: K-ready / V-ready (TMA arrival) and K-consumed / V-consumed (1 arrival, the
consumer). The producer walks t = 0 .. n+S−1: it waits for the consumption of step t−S before reusing its slot and,
past the end, still waits for the last S consumptions, so every barrier completion is observed exactly once (the GPU
interpreter checks this; on hardware it is harmless).

Numerics: QKᵀ takes the raw bf16/fp16 operands; the fp32 result gets ONE multiply by scale·log2(e); the online softmax
runs in base 2 in fp32; the LSE written out is natural-log (m·ln2 + ln l), the `sgm_attention` contract.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

TILE = 64  # rows of a q tile and of a key step; also the wgmma M
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Debug aid for a GPU run: apply the tail mask on every step instead of under lax.cond on partial steps only.
ALWAYS_MASK = os.environ.get("SGM_MGPU_ALWAYS_MASK", "0") == "1"
CONSUMER_REGS, PRODUCER_REGS = 232, 40  # as the reference FA3 kernel (2 consumer warpgroups + 1 producer)


def interpret_params(interpret):
    """`interpret` argument -> what plgpu.kernel takes: False, or GPU interpret-mode parameters (True -> defaults:
    uninitialised SMEM is NaN-filled and out-of-bounds reads raise)."""
    if interpret is None or interpret is False:
        return False
    if interpret is True:
        return plgpu.InterpretGPUParams()
    return interpret


def tiled_smem(shape, dtype):
    """SMEM buffer of 16-bit rows (last dim a multiple of 64) in the (8, 64)-tiled, 128 B-swizzled wgmma layout."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def mma(a, b, shape):
    """a @ b into a fresh fp32 accumulator (a: SMEM ref or registers, b: SMEM ref); waits for the wgmma."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def mma_acc(acc, a, b, interpret):
    """acc + a @ b with `a` in registers (bf16/fp16) and `b` an SMEM ref, accumulated in fp32.

    On hardware: one wgmma accumulating into the initialised accumulator (pl.run_state), as the reference kernel.
    The GPU interpreter of jax 0.11.2 supports neither pl.run_state over WGMMA accumulators (the discharged
    value-level `wgmma` has no CPU rule) nor register operands of wgmma (it expects an SMEM allocation), so interpret
    mode reads `b` from SMEM and uses an fp32-accumulating dot of the same operands. This is the only place where
    the interpreted kernels differ from the compiled ones; every barrier, TMA, SMEM-operand wgmma and all the
    softmax arithmetic run as on the GPU."""
    if interpret:
        b_val = b[...]
        # The interpreter models this plain load as a generic-proxy SMEM read, which the race detector orders before
        # the producer's next TMA (async proxy) write into the slot only across a proxy fence. The hardware path
        # reads `b` inside the wgmma (async proxy) and needs none.
        plgpu.commit_smem()
        return acc + lax.dot(a, b_val, preferred_element_type=jnp.float32)

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(body)(plgpu.ACC.init(acc))


def mask_tail(s, count, axis):
    """Logits past `count` along `axis` (1: key columns, 0: key rows of a transposed tile) -> −inf; skipped (via
    lax.cond) when the step is full, so full key blocks pay nothing."""
    def apply(x):
        pos = plgpu.broadcasted_iota(jnp.int32, x.shape, axis, layout=plgpu.Layout.WGMMA)
        return jnp.where(pos < count, x, -jnp.inf)
    if ALWAYS_MASK:
        return apply(s)
    return lax.cond(count < s.shape[axis], apply, lambda x: x, s)


def row_vector(value):
    """Per-row fp32 vector of a 64-row tile in the layout of a row reduction of a wgmma result."""
    return plgpu.layout_cast(jnp.full((TILE,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))


def zeros_acc(d):
    return plgpu.layout_cast(jnp.full((TILE, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)


def ring_producer(streams, counts, stages):
    """Producer loop feeding one SMEM ring per consumer (consumers c = 0, 1).

    streams: per consumer (address, copies): address(t) reads the GMEM list entry of step t (it must clamp t into
    the list's bounds: it is called for every t); copies is a list of (issue(addr, slot_index), consumed), issue
    starting the TMA copies of the step into ring slot `slot_index` and `consumed` being the barrier array the
    consumer arrives on when done with that slot. counts: per consumer its (traced) number of steps.
    For t in [0, max(count) + S): read step t's address first (the load's latency overlaps the wait), wait for the
    consumption of step t − S (slot reuse, or the final drain), then issue step t."""
    total = jnp.maximum(counts[0], counts[1]) + stages

    def step(t, carry):
        slot = lax.rem(t, stages)
        for c, ((address, copies), n) in enumerate(zip(streams, counts)):
            bi = c * stages + slot
            addr = address(t)
            reuse = jnp.logical_and(t >= stages, t - stages < n)
            for issue, consumed in copies:
                pl.when(reuse)(lambda consumed=consumed: plgpu.barrier_wait(consumed.at[bi]))
                pl.when(t < n)(lambda issue=issue: issue(addr, bi))
        return carry

    lax.fori_loop(0, total, step, 0)


def kv_producer(tile_of, n_ref, rows_ref, b, h, k, v, stages):
    """The producer warpgroup of the forward and dq kernels: streams the K and V rows listed for each consumer's q
    tile into its ring. k, v = (gmem ref, smem ring, ready barriers, consumed barriers)."""
    plgpu.set_max_registers(PRODUCER_REGS, action="decrease")
    streams, counts = [], []
    for c in range(2):
        _, active, qb = tile_of(c)
        counts.append(jnp.where(active, n_ref[b, h, qb], 0))
        issues = [(functools.partial(issue_rows, src, b, h, ring, ready), done) for src, ring, ready, done in (k, v)]
        streams.append((functools.partial(step_rows, rows_ref, b, h, qb), issues))
    ring_producer(streams, counts, stages)


def step_rows(rows_ref, b, h, qb, t):
    """Key rows of step t of query block qb (t clamped into the list: the producer reads before it knows t < n)."""
    t = jnp.minimum(t, rows_ref.shape[-1] - 1)
    return pl.ds(pl.multiple_of(rows_ref[b, h, qb, t], TILE), TILE)


def issue_rows(src_ref, b, h, ring, ready, rows, bi):
    """TMA of rows `rows` of head h of src [B, T, H, D] into ring slot bi."""
    plgpu.copy_gmem_to_smem(src_ref.at[b, rows, h], ring.at[bi], ready.at[bi])


def valid_at(valid_ref, b, h, qb, t):
    """Valid keys of step t (clamped into the list; used to prefetch the next step's count)."""
    return valid_ref[b, h, qb, jnp.minimum(t, valid_ref.shape[-1] - 1)]


def forward_call(q, k, v, rows, valid, nsteps, *, block_q, scale, stages, interpret):
    """Launches the forward kernel. rows/valid/nsteps: `lists.subtile_steps` with sub = 64. Returns (out, lse)."""
    B, Tq, H, D = q.shape
    dt = q.dtype
    nt, nqs, S = Tq // TILE, block_q // TILE, stages
    pairs = -(-nt // 2)
    c_log2 = float(scale) * LOG2E
    params = interpret_params(interpret)

    def sgm_fwd(q_ref, k_ref, v_ref, rows_ref, valid_ref, n_ref, o_ref, lse_ref,
                q_smem, k_smem, v_smem, lse_smem, q_bar, k_rdy, v_rdy, k_done, v_done):
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        pair, wg = lax.axis_index("pair"), lax.axis_index("wg")

        def tile_of(c):  # q tile of consumer c, whether it exists (odd tile counts), its query block
            tile = pair * 2 + c
            return tile, tile < nt, lax.div(jnp.minimum(tile, nt - 1), jnp.int32(nqs))

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(CONSUMER_REGS, action="increase")
            tile, active, qb = tile_of(wg)

            @pl.when(active)
            def _():
                q_tile = q_smem.at[wg]
                rows_q = pl.ds(tile * TILE, TILE)
                n = n_ref[b, h, qb]

                @pl.when(n > 0)  # a tile without steps only writes zeros
                def _():
                    plgpu.copy_gmem_to_smem(q_ref.at[b, rows_q, h], q_tile, q_bar.at[wg])
                    plgpu.barrier_wait(q_bar.at[wg])

                def step(t, carry):
                    acc, m_i, l_i, count = carry
                    count_next = valid_at(valid_ref, b, h, qb, t + 1)  # GMEM latency hidden behind this step
                    bi = wg * S + lax.rem(t, S)
                    plgpu.barrier_wait(k_rdy.at[bi])
                    s = mma(q_tile, k_smem.at[bi].transpose((1, 0)), (TILE, TILE))
                    plgpu.barrier_arrive(k_done.at[bi])
                    s = mask_tail(s * c_log2, count, axis=1)
                    m_new = jnp.maximum(m_i, s.max(axis=1))  # finite: every step has a valid key
                    alpha = jnp.exp2(m_i - m_new)
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                    l_i = l_i * alpha + p.sum(axis=1)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    plgpu.barrier_wait(v_rdy.at[bi])
                    acc = mma_acc(acc, p.astype(dt), v_smem.at[bi], interpret)
                    plgpu.barrier_arrive(v_done.at[bi])
                    return acc, m_new, l_i, count_next

                carry = (zeros_acc(D), row_vector(-jnp.inf), row_vector(0.0), valid_at(valid_ref, b, h, qb, 0))
                acc, m_i, l_i, _ = lax.fori_loop(0, n, step, carry)
                has = l_i > 0.0  # false only for a tile without steps
                l_safe = jnp.where(has, l_i, 1.0)
                inv = jnp.where(has, 1.0 / l_safe, 0.0)
                q_tile[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dt)
                lse_smem.at[wg][...] = jnp.where(has, m_i * LN2 + jnp.log(l_safe), -jnp.inf)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(q_tile, o_ref.at[b, rows_q, h])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows_q])
                plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            kv_producer(tile_of, n_ref, rows_ref, b, h, (k_ref, k_smem, k_rdy, k_done),
                        (v_ref, v_smem, v_rdy, v_done), S)

    f32 = jnp.float32
    kernel = plgpu.kernel(
        sgm_fwd,
        out_type=(jax.ShapeDtypeStruct(q.shape, dt), jax.ShapeDtypeStruct((B, H, Tq), f32)),
        scratch_types=[
            tiled_smem((2, TILE, D), dt),  # q tiles, reused to stage the output
            tiled_smem((2 * S, TILE, D), dt),  # K rings (consumer c owns slots c·S .. c·S+S−1)
            tiled_smem((2 * S, TILE, D), dt),  # V rings
            plgpu.SMEM((2, TILE), f32),  # LSE staging
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2 * S),
            plgpu.Barrier(num_barriers=2 * S),
            plgpu.Barrier(num_arrivals=1, num_barriers=2 * S),
            plgpu.Barrier(num_arrivals=1, num_barriers=2 * S),
        ],
        grid=(H, pairs, B),
        grid_names=("heads", "pair", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=params,
    )
    return kernel(q, k, v, rows, valid, nsteps)
