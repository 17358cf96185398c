"""Mosaic GPU (sm_90a) SGM backward: a dq kernel and a dk/dv kernel, both deterministic (no atomics, fixed order).

Shared formula (reference.py `sgm_reference_bwd`), with lse2 = base-2 LSE and c = scale·log2(e):
    P = exp2(c·q·kᵀ − lse2) on valid keys;  dP = dO·vᵀ;  dS = P ∘ (dP − Δ),  Δ = rowsum(dO ∘ O) (XLA)
    dQ = scale · dS·k;   dK = scale · dSᵀ·q;   dV = Pᵀ·dO
The logits are recomputed exactly as the forward does (raw bf16/fp16 operands, one fp32 multiply); the scale on dQ
and dK is applied once to the fp32 accumulators at the end, never to bf16 operands.

dq: the forward's CTA layout and step machinery under its own StreamPlan (`mosaic_gpu.dq_plan`: 3 consumers on one
    shared stream for 192-slot query blocks, else 2 with their own lists; 64-row steps); the consumer also holds
    dO, lse2 and Δ of its tile. Split plans write partial dq sums, added in XLA.
dk/dv: 2 consumers × one 64-row key tile each (K, V resident) + 1 producer streaming (q, lse2) and (dO, Δ) of the
    query blocks that selected the tile's key block (reverse lists, ascending), in 64-row steps. A key tile without
    valid keys, or never selected, runs no step and writes zeros; rows past the tile's valid count are masked.
    The query side of a step is one 64-row q tile, or, when only the first `q_rows` rows of every query block are
    queries (`query_boxes`), two 32-row boxes packed across query blocks: DecMem's 147 query rows of 192 slots then
    cost 160 rows instead of 192. Rows past q_rows inside a box need no mask: their dO is zero (the caller's
    contract), so they add exactly nothing to dK and dV; the half-filled last step of an odd box count is masked.
overlap (both kernels, off by default): `overlapped_dkv`, `overlapped_dq` keep a consumer's wgmmas in flight during
    its own arithmetic instead of waiting for each in turn.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sgm import mosaic_gpu_fwd as fwd
from pallas_kernels.sgm.mosaic_gpu_fwd import (CONSUMER_REGS, LOG2E, PRODUCER_REGS, TILE, CtaTiles,
                                               interpret_params, kv_producer, launch_params, mask_boxes, mask_tail,
                                               mma, mma_acc, ring_producer, ring_scratch, smem_dot, store_out,
                                               tiled_smem, zeros_acc)

_COMMON = dict(num_threads=3, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True))


def dq_call(q, k, v, do, lse2, delta, rows, code, nsteps, *, block_q, scale, plan, interpret):
    """dq `[B, Tq, H, D]` in q.dtype (partial sums `[splits, B, Tq, H, D]` when plan.splits > 1: their sum is dq).
    lse2/delta fp32 `[B, H, Tq]`; rows/code/nsteps: the step lists of `plan` (`lists.group_steps`), as for the
    forward, whose CTA layout this kernel shares (`CtaTiles`, `kv_producer`)."""
    B, Tq, H, D = q.shape
    dt = q.dtype
    nc, S, W = plan.consumers, plan.stages, plan.width
    nt, nqs = Tq // TILE, block_q // TILE
    c_log2 = float(scale) * LOG2E
    last = code.shape[-1] - 1

    def sgm_dq(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rows_ref, code_ref, n_ref, dq_ref,
               q_smem, do_smem, lse_smem, delta_smem, in_bar, k_smem, v_smem, k_rdy, v_rdy, k_done, v_done):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        cta = CtaTiles(plan, nt, nqs, n_ref, b, h)

        @pl.when(wg < nc)
        def _consumer():
            plgpu.set_max_registers(CONSUMER_REGS[nc], action="increase")
            tile, active, qb = cta.tile_of(wg)
            stream = cta.stream_of(wg)

            @pl.when(active)
            def _():
                rows_q = pl.ds(tile * TILE, TILE)
                q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
                t0, n = cta.span(qb)
                code_at = lambda t: code_ref[b, h, qb, jnp.minimum(t0 + t, last)]
                loads = ((q_ref.at[b, rows_q, h], q_tile), (do_ref.at[b, rows_q, h], do_tile),
                         (lse_ref.at[b, h, rows_q], lse_smem.at[wg]), (delta_ref.at[b, h, rows_q], delta_smem.at[wg]))

                @pl.when(n > 0)  # a tile without steps only writes zeros
                def _():
                    for j, (src, dst) in enumerate(loads):
                        plgpu.copy_gmem_to_smem(src, dst, in_bar.at[wg * 4 + j])
                    for j in range(4):
                        plgpu.barrier_wait(in_bar.at[wg * 4 + j])

                lse = plgpu.load(lse_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                delta = plgpu.load(delta_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

                slot = lambda t: stream * S + lax.rem(t, S)

                def probs(s, cd):  # P of a step from raw logits
                    s, c = fwd.prescaled(s, c_log2, fwd.FOLD_SCALE_BWD)
                    return jnp.exp2(fwd.scaled_minus(mask_boxes(s, cd, plan.box, plan.nbox), c, lse))

                dscores = lambda p, dp: p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))

                def step(t, carry):
                    dq, cd = carry
                    cd_next = code_at(t + 1)  # prefetch, as in the forward
                    bi = slot(t)
                    plgpu.barrier_wait(k_rdy.at[bi])
                    p = probs(mma(q_tile, k_smem.at[bi].transpose((1, 0)), (TILE, W)), cd)
                    plgpu.barrier_wait(v_rdy.at[bi])
                    dp = mma(do_tile, v_smem.at[bi].transpose((1, 0)), (TILE, W))
                    plgpu.barrier_arrive(v_done.at[bi])
                    dq = mma_acc(dq, dscores(p, dp).astype(dt), k_smem.at[bi], interpret)
                    plgpu.barrier_arrive(k_done.at[bi])
                    return dq, cd_next

                if plan.overlap:
                    ring = (slot, k_smem, v_smem, k_rdy, v_rdy, k_done, v_done)
                    dq = overlapped_dq(n, code_at, (q_tile, do_tile), ring, probs, dscores, dt, D, interpret)
                else:
                    dq, _ = lax.fori_loop(0, n, step, (zeros_acc(D), code_at(0)))
                store_out(((dq * scale).astype(dt), q_tile, cta.out(dq_ref, b, rows_q, h)))

        @pl.when(wg == nc)
        def _producer():
            kv_producer(cta.producer_streams(), rows_ref, b, h, (k_ref, k_smem, k_rdy, k_done),
                        (v_ref, v_smem, v_rdy, v_done), S, plan.box)

    f32 = jnp.float32
    lead = (plan.splits,) if plan.splits > 1 else ()
    kernel = plgpu.kernel(
        sgm_dq,
        out_type=jax.ShapeDtypeStruct(lead + q.shape, dt),
        scratch_types=[
            tiled_smem((nc, TILE, D), dt),  # q tiles, reused to stage dq
            tiled_smem((nc, TILE, D), dt),  # dO tiles
            plgpu.SMEM((nc, TILE), f32),  # lse2
            plgpu.SMEM((nc, TILE), f32),  # delta
            plgpu.Barrier(num_barriers=4 * nc),  # per consumer: q, dO, lse2, delta loaded
            *ring_scratch(plan, D, dt),
        ],
        **launch_params(plan, H, B, -(-nt // nc) * plan.splits, interpret),
    )
    return kernel(q, k, v, do, lse2, delta, rows, code, nsteps)


def query_boxes(block_q, q_rows=None):
    """(rows per q box, boxes per query block) that the dk/dv kernels stream: 64-row q tiles, or 32-row boxes when
    the query rows in use (`q_rows`, default all) leave a whole 32-row box of a tile unused (147 of 192: 5 boxes,
    160 rows, instead of 3 tiles)."""
    rows = block_q if q_rows is None else q_rows
    n64, n32 = -(-rows // TILE), -(-rows // 32)
    return (32, n32) if n32 * 32 < n64 * TILE else (TILE, n64)


class QStream:
    """The query side of the dk/dv kernels (`dkv_call`, `mosaic_gpu_tail.dkv_tail_call`): 2 consumers, each owning
    key rows of one key block, and a producer streaming, per consumer, 64-row steps of (q, lse2) and (dO, Δ) of the
    query blocks that selected that key block (reverse lists, ascending): whole q tiles, or `nbox` = 2 boxes of 32
    rows packed across query blocks (`query_boxes`). A step count is the box count rounded up, so the last step of an
    odd box count is half filled: its second box repeats a real box and the consumer masks it (`used_rows`).

    share_pairs: when both consumers own tiles of the same key block (the same reverse list), the producer streams
    it once, into consumer 0's ring, which both read (`shared`): half the q/dO traffic. Every consumed barrier then
    takes 2 arrivals: one from each consumer of a shared ring, or two from the one consumer of its own ring."""

    def __init__(self, block_q, q_rows, stages, head_dim, dtype, swizzle=128, share_pairs=False):
        self.block_q, self.stages, self.d, self.dt, self.swizzle = block_q, stages, head_dim, dtype, swizzle
        self.qbox, self.nqb = query_boxes(block_q, q_rows)
        self.nbox = TILE // self.qbox  # q boxes per step
        self.share_pairs = share_pairs

    def shared(self, blocks, counts, active):
        """Whether the two consumers (key blocks, q box counts, whether each runs) read one stream (share_pairs)."""
        if not self.share_pairs:
            return False
        return active[0] & active[1] & (blocks[0] == blocks[1]) & (counts[0] == counts[1])

    def ring(self, wg, shared):
        """The ring (0 or 1) consumer wg reads."""
        return wg if shared is False else jnp.where(shared, 0, wg)

    def consumed(self, barrier, shared):
        """A consumer is done with a ring slot (see share_pairs for the arrival count)."""
        plgpu.barrier_arrive(barrier)
        if self.share_pairs:
            pl.when(jnp.logical_not(shared))(lambda: plgpu.barrier_arrive(barrier))

    def steps(self, boxes):
        return lax.div(boxes + (self.nbox - 1), jnp.int32(self.nbox))

    def used_rows(self, t, boxes):
        """Query rows of step t that hold boxes of the stream (TILE, or qbox on the half-filled last step)."""
        last = (boxes - (self.steps(boxes) - 1) * self.nbox) * self.qbox
        return jnp.where(t == self.steps(boxes) - 1, last, TILE)

    def scratch(self):
        """q and dO rings of the 2 consumers (slots c·S .. c·S+S−1), lse2 and Δ rings, their ready barriers (one
        arrival per box) and consumed barriers (q, dO): in the order `producer` and the kernels take them."""
        slots, f32 = 2 * self.stages, jnp.float32
        ring = tiled_smem((slots, TILE, self.d), self.dt, self.swizzle)
        return [ring, ring, plgpu.SMEM((slots, TILE), f32), plgpu.SMEM((slots, TILE), f32),
                *[plgpu.Barrier(num_arrivals=self.nbox, num_barriers=slots)] * 4,
                *[plgpu.Barrier(num_arrivals=2 if self.share_pairs else 1, num_barriers=slots)] * 2]

    def producer(self, b, h, streams, rev_ref, srcs, rings, shared=False):
        """The producer warpgroup. streams: per consumer (key block, box count, whether it runs); srcs = the GMEM refs
        (q, lse2, dO, Δ); rings = the `scratch` refs (q, dO, lse2, Δ rings, then q, dO, lse2, Δ ready and q, dO
        consumed barriers); shared: consumer 1 reads consumer 0's stream (its own is not filled)."""
        plgpu.set_max_registers(PRODUCER_REGS, action="decrease")
        if shared is not False:
            (kb1, nb1, on1) = streams[1]
            streams = [streams[0], (kb1, nb1, on1 & jnp.logical_not(shared))]
        q_ref, lse_ref, do_ref, delta_ref = srcs
        q_smem, do_smem, lse_smem, delta_smem, q_rdy, do_rdy, lse_rdy, delta_rdy, q_done, do_done = rings
        qbox, nqb, nbox, last = self.qbox, self.nqb, self.nbox, rev_ref.shape[-1] * self.nqb - 1

        def rows_q(kb, t):  # box p of kb's stream: box p % nqb of the (p // nqb)-th query block listing kb
            starts = []
            for j in range(nbox):  # past the list (a half step, or the producer's lookahead): clamped
                p = jnp.minimum(t * nbox + j, last)
                qb = rev_ref[b, h, kb, lax.div(p, jnp.int32(nqb))]
                starts.append(pl.multiple_of(qb * self.block_q + lax.rem(p, jnp.int32(nqb)) * qbox, qbox))
            return starts

        def boxes(src, dst, ready, starts, bi, rows_axis):
            for j, r in enumerate(starts):
                at = (b, pl.ds(r, qbox), h) if rows_axis == 1 else (b, h, pl.ds(r, qbox))
                slot = dst.at[bi] if nbox == 1 else dst.at[bi, pl.ds(j * qbox, qbox)]
                plgpu.copy_gmem_to_smem(src.at[at], slot, ready.at[bi])

        def issue_q(starts, bi):
            boxes(q_ref, q_smem, q_rdy, starts, bi, 1)
            boxes(lse_ref, lse_smem, lse_rdy, starts, bi, 2)

        def issue_do(starts, bi):
            boxes(do_ref, do_smem, do_rdy, starts, bi, 1)
            boxes(delta_ref, delta_smem, delta_rdy, starts, bi, 2)

        specs = [(functools.partial(rows_q, kb), [(issue_q, q_done), (issue_do, do_done)]) for kb, _, _ in streams]
        ring_producer(specs, [jnp.where(on, self.steps(nb), 0) for _, nb, on in streams], self.stages)


def dkv_call(q, k, v, do, lse2, delta, rev, kvalid, kboxes, *, block_q, block_kv, scale, stages, interpret,
             q_rows=None, tile_map=None, share_pairs=False, overlap=False):
    """(dk, dv) `[B, Tk, H, D]` in k.dtype. rev int32 `[B, H, Nk, Nq]` (query blocks per key block, ascending),
    kvalid int32 `[B, Tk/64]` valid keys per key tile, kboxes int32 `[B, H, Tk/64]` q boxes per key tile (= reverse
    count × `query_boxes(block_q, q_rows)[1]`; 0 for a tile without valid keys, or one left to another kernel: it
    writes zeros). q_rows: only the first q_rows rows of every query block are streamed; dO must be zero past them.
    tile_map int32 `[B, Tk/64]`, a permutation of the key tiles (default: in order): consumer c of CTA p takes tile
    tile_map[2p + c]. Putting the tiles left to another kernel last keeps them from idling one consumer of a CTA
    whose other consumer works (with the key tails of 192-slot blocks taken, 2 of every 3 CTAs in order).
    share_pairs: a CTA whose two tiles belong to one key block streams its query side once (`QStream`).
    overlap: each consumer keeps the tensor cores busy through its softmax and dS arithmetic (`overlapped_dkv`)."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    dt = k.dtype
    nkt, nks, S = Tk // TILE, block_kv // TILE, stages
    qs = QStream(block_q, q_rows, stages, D, dt, share_pairs=share_pairs)
    c_log2 = float(scale) * LOG2E
    if tile_map is None:
        tile_map = jnp.broadcast_to(jnp.arange(nkt, dtype=jnp.int32), (B, nkt))

    def sgm_dkv(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rev_ref, kvalid_ref, n_ref, map_ref, dk_ref, dv_ref,
                k_smem, v_smem, kv_bar, *rings):
        q_smem, do_smem, lse_smem, delta_smem, q_rdy, do_rdy, lse_rdy, delta_rdy, q_done, do_done = rings
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        pair, wg = lax.axis_index("pair"), lax.axis_index("wg")

        def tile_of(c):  # key tile of consumer c, whether it exists, its key block
            slot = pair * 2 + c
            tile = map_ref[b, jnp.minimum(slot, nkt - 1)]
            return tile, slot < nkt, lax.div(tile, jnp.int32(nks))

        def pair_state():  # both consumers' (tile, whether it runs, key block), and whether they share one stream
            tiles = [tile_of(c) for c in range(2)]
            return tiles, qs.shared([kb for _, _, kb in tiles], [n_ref[b, h, t] for t, _, _ in tiles],
                                    [on for _, on, _ in tiles])

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(CONSUMER_REGS[2], action="increase")
            tile, active, _ = tile_of(wg)
            shared = pair_state()[1]
            ring = qs.ring(wg, shared)

            @pl.when(active)
            def _():
                rows_k = pl.ds(tile * TILE, TILE)
                k_tile, v_tile = k_smem.at[wg], v_smem.at[wg]
                nb = n_ref[b, h, tile]
                n = qs.steps(nb)

                @pl.when(n > 0)  # a key tile nobody selected (or without valid keys) only writes zeros
                def _():
                    plgpu.copy_gmem_to_smem(k_ref.at[b, rows_k, h], k_tile, kv_bar.at[wg * 2])
                    plgpu.copy_gmem_to_smem(v_ref.at[b, rows_k, h], v_tile, kv_bar.at[wg * 2 + 1])
                    plgpu.barrier_wait(kv_bar.at[wg * 2])
                    plgpu.barrier_wait(kv_bar.at[wg * 2 + 1])

                kval = kvalid_ref[b, tile]
                slot = lambda t: ring * S + lax.rem(t, S)

                def probs(s_t, t, bi):  # Pᵀ of step t from raw logits [keys, queries]
                    s_t, c = fwd.prescaled(s_t, c_log2, fwd.FOLD_SCALE_BWD)
                    s_t = mask_tail(s_t, kval, axis=0)
                    if qs.nbox > 1:  # the unused box of a half step holds a real (repeated) box: masked out
                        s_t = mask_tail(s_t, qs.used_rows(t, nb), axis=1)
                    lse = plgpu.load(lse_smem.at[bi], layout=plgpu.Layout.WGMMA.reduce(0))
                    return jnp.exp2(fwd.scaled_minus(s_t, c, lse, axis=1))

                def delta_of(bi):  # Δ of step t's queries (read before the slot's dO side is released)
                    return plgpu.load(delta_smem.at[bi], layout=plgpu.Layout.WGMMA.reduce(0))

                def dscores(p_t, dp_t, delta):  # dSᵀ
                    return p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))

                def release(bi):
                    qs.consumed(do_done.at[bi], shared)
                    qs.consumed(q_done.at[bi], shared)

                def step(t, carry):
                    dk, dv = carry
                    bi = slot(t)
                    plgpu.barrier_wait(q_rdy.at[bi])
                    plgpu.barrier_wait(lse_rdy.at[bi])
                    p_t = probs(mma(k_tile, q_smem.at[bi].transpose((1, 0)), (TILE, TILE)), t, bi)
                    plgpu.barrier_wait(do_rdy.at[bi])
                    plgpu.barrier_wait(delta_rdy.at[bi])
                    dv = mma_acc(dv, p_t.astype(dt), do_smem.at[bi], interpret)
                    dp_t = mma(v_tile, do_smem.at[bi].transpose((1, 0)), (TILE, TILE))
                    delta = delta_of(bi)
                    qs.consumed(do_done.at[bi], shared)
                    dk = mma_acc(dk, dscores(p_t, dp_t, delta).astype(dt), q_smem.at[bi], interpret)
                    qs.consumed(q_done.at[bi], shared)
                    return dk, dv

                if overlap:
                    math = (probs, delta_of, dscores)
                    dk, dv = overlapped_dkv(n, slot, (k_tile, v_tile), (q_smem, do_smem),
                                            (q_rdy, lse_rdy, do_rdy, delta_rdy), math, release, dt, D, interpret)
                else:
                    dk, dv = lax.fori_loop(0, n, step, (zeros_acc(D), zeros_acc(D)))
                store_out(((dk * scale).astype(dt), k_tile, dk_ref.at[b, rows_k, h]),
                          (dv.astype(dt), v_tile, dv_ref.at[b, rows_k, h]))

        @pl.when(wg == 2)
        def _producer():
            tiles, shared = pair_state()
            streams = [(kb, n_ref[b, h, tile], active) for tile, active, kb in tiles]
            qs.producer(b, h, streams, rev_ref, (q_ref, lse_ref, do_ref, delta_ref), rings, shared)

    kv_out = jax.ShapeDtypeStruct(k.shape, dt)
    kernel = plgpu.kernel(
        sgm_dkv,
        out_type=(kv_out, kv_out),
        scratch_types=[
            tiled_smem((2, TILE, D), dt),  # K tiles, reused to stage dK
            tiled_smem((2, TILE, D), dt),  # V tiles, reused to stage dV
            plgpu.Barrier(num_barriers=4),
            *qs.scratch(),
        ],
        grid=(H, -(-nkt // 2), B),
        grid_names=("heads", "pair", "batch"),
        interpret=interpret_params(interpret),
        **_COMMON,
    )
    return kernel(q, k, v, do, lse2, delta, rev, kvalid, kboxes, tile_map.astype(jnp.int32))


def overlapped_dkv(n, slot, kv, rings, ready, math, release, dt, d, interpret):
    """A dk/dv consumer's n steps with its wgmmas in flight during its own arithmetic: step t issues Sᵀ = K·qᵀ and
    dPᵀ = V·dOᵀ back to back (both read SMEM only), waits for Sᵀ alone (`wait_n=1`) and computes Pᵀ while dPᵀ runs,
    issues dV += Pᵀ·dO, waits for dPᵀ and computes dSᵀ while dV runs, then issues dK += dSᵀ·q without waiting. The
    next step first waits for everything (`wgmma_wait(0)`), so P and dS of a step are dead before the next step's
    logits are allocated: the live registers peak as in the plain loop (dK, dV, two logits tiles) but for P's
    16-bit copy, which dV reads while dSᵀ is computed (16 registers a thread at 64 x 64); and the slot of
    step t − 1 is released (its q and dO read by those wgmmas) before step t's slot is awaited, which a ring of depth
    1 needs. The plain loop waits for each of its four wgmmas in turn, so a consumer's exp2 and dS arithmetic never
    overlap its own tensor-core work. Same products, same fp32 accumulation order: the plain loop's result up to
    rounding. Returns (dk, dv) fp32 [64, d].

    math = (probs(s, t, slot), delta_of(slot), dscores(p, dp, delta)); release(slot): the consumer is done with a
    ring slot. In the GPU interpreter (no register wgmma operands, no stores into accumulator refs: `mma_acc`) dK and
    dV are values carried through the loop and their products dots on the spot: same barrier protocol and
    arithmetic, no overlap."""
    k_tile, v_tile = kv
    q_smem, do_smem = rings
    q_rdy, lse_rdy, do_rdy, delta_rdy = ready
    probs, delta_of, dscores = math
    f32 = jnp.float32

    def run(acc_dk=None, acc_dv=None):
        def step(t, carry):
            settle(t, slot, release, interpret)
            bi = slot(t)
            plgpu.barrier_wait(q_rdy.at[bi])
            plgpu.barrier_wait(do_rdy.at[bi])

            def body(acc_s, acc_dp):
                plgpu.wgmma(acc_s, k_tile, q_smem.at[bi].transpose((1, 0)))
                plgpu.wgmma(acc_dp, v_tile, do_smem.at[bi].transpose((1, 0)))
                s_t = read(acc_s, 1, interpret)
                plgpu.barrier_wait(lse_rdy.at[bi])
                p_t = probs(s_t, t, bi)
                plgpu.barrier_wait(delta_rdy.at[bi])
                delta = delta_of(bi)
                if interpret:
                    dk, dv = carry
                    dv = dv + smem_dot(p_t.astype(dt), do_smem.at[bi])
                    dk = dk + smem_dot(dscores(p_t, acc_dp[...], delta).astype(dt), q_smem.at[bi])
                    return dk, dv
                plgpu.wgmma(acc_dv, p_t.astype(dt), do_smem.at[bi])
                dp_t = read(acc_dp, 1, interpret)  # dV may still run
                plgpu.wgmma(acc_dk, dscores(p_t, dp_t, delta).astype(dt), q_smem.at[bi])
                return carry

            return pl.run_scoped(body, plgpu.ACC((TILE, TILE), f32), plgpu.ACC((TILE, TILE), f32))

        carry = lax.fori_loop(0, n, step, (zeros_acc(d), zeros_acc(d)) if interpret else ())
        settle(n, slot, release, interpret)
        if interpret:
            return carry
        return plgpu.wgmma_accumulator_load(acc_dk, wait_n=None), plgpu.wgmma_accumulator_load(acc_dv, wait_n=None)

    if interpret:
        return run()
    return pl.run_scoped(run, plgpu.ACC((TILE, d), f32), plgpu.ACC((TILE, d), f32))


def overlapped_dq(n, code_at, tiles, ring, probs, dscores, dt, d, interpret):
    """A dq consumer's n steps with its wgmmas in flight during its own arithmetic, as `overlapped_dkv` does for
    dk/dv: step t issues S = q·Kᵀ and dP = dO·Vᵀ back to back, waits for S alone and computes P while dP runs, then
    issues dq += dS·K without waiting; the next step first waits for it (so the live registers peak as in the plain
    loop) and releases step t − 1's K slot before awaiting step t's (a ring of depth 1 needs that order). The V slot
    is released as soon as dP has landed. Returns dq fp32 [64, d]: the plain loop's up to rounding (same products,
    same order). probs(s, code), dscores(p, dp): the plain loop's arithmetic. Interpreter: dq a carried value, its
    product a dot on the spot (`mma_acc`)."""
    q_tile, do_tile = tiles
    slot, k_smem, v_smem, k_rdy, v_rdy, k_done, v_done = ring
    f32, width = jnp.float32, k_smem.shape[1]
    release = lambda bi: plgpu.barrier_arrive(k_done.at[bi])  # the V slot goes as soon as dP has landed

    def run(acc_dq=None):
        def step(t, carry):
            dq, cd = carry
            cd_next = code_at(t + 1)
            settle(t, slot, release, interpret)
            bi = slot(t)
            plgpu.barrier_wait(k_rdy.at[bi])
            plgpu.barrier_wait(v_rdy.at[bi])

            def body(acc_s, acc_dp):
                plgpu.wgmma(acc_s, q_tile, k_smem.at[bi].transpose((1, 0)))
                plgpu.wgmma(acc_dp, do_tile, v_smem.at[bi].transpose((1, 0)))
                p = probs(read(acc_s, 1, interpret), cd)
                dp = read(acc_dp, 0, interpret)
                plgpu.barrier_arrive(v_done.at[bi])
                ds = dscores(p, dp).astype(dt)
                if interpret:
                    return dq + smem_dot(ds, k_smem.at[bi])
                plgpu.wgmma(acc_dq, ds, k_smem.at[bi])
                return dq

            return pl.run_scoped(body, plgpu.ACC((TILE, width), f32), plgpu.ACC((TILE, width), f32)), cd_next

        dq, _ = lax.fori_loop(0, n, step, (zeros_acc(d) if interpret else (), code_at(0)))
        settle(n, slot, release, interpret)
        return dq if interpret else plgpu.wgmma_accumulator_load(acc_dq, wait_n=None)

    if interpret:
        return run()
    return pl.run_scoped(run, plgpu.ACC((TILE, d), f32))


def settle(t, slot, release, interpret):
    """The start of overlapped step t (t = n: after the loop): wait for every wgmma in flight (the previous step's
    accumulating products), after which their register operands and step t − 1's ring slot are free, and release
    that slot (`release(slot)`; nothing at t = 0). The interpreter runs every product on the spot: nothing to wait
    for there."""
    if not interpret:
        plgpu.wgmma_wait(0)
    pl.when(t > 0)(lambda: release(slot(t - 1)))


def read(acc, wait_n, interpret):
    """An accumulator's value once at most `wait_n` wgmmas are in flight (the interpreter: a plain read)."""
    return acc[...] if interpret else plgpu.wgmma_accumulator_load(acc, wait_n=wait_n)
