"""Mosaic GPU (sm_90a) SGM forward kernel and the helpers the backward kernels share (`mosaic_gpu_bwd.py`).

CTA layout: `plan.consumers` consumer warpgroups, each owning one 64-row q tile, plus 1 producer
warpgroup that reads step lists from GMEM and issues the TMA loads of the listed key rows into SMEM rings. A
`StreamPlan` picks one of two options per geometry:
  (a) own lists (share = 1, 2 consumers): every q tile streams its own list through its own ring. Needed when a
      query block is one 64-row tile (VSA-style cubes: neighbouring tiles select different blocks).
  (b) shared stream (share = consumers): the consumers are the tiles of ONE query block, which all use the same
      list, so the producer loads each listed key row once for all of them (3× less K/V traffic at 192-slot DecMem
      blocks) and the ring can hold wider steps.
A "step" is `width` key rows assembled from `width / box` TMA boxes of `box` rows, each box holding >= 1 valid key
(`lists.subtile_steps` + `lists.group_steps`): empty blocks and the empty tail of a partial block are never loaded,
and with 32-row boxes a 147-valid DecMem block costs 160 rows instead of 192. The −inf mask is applied (under
`lax.cond`) only on a step with a partially valid or unused box. `plan.splits` > 1 splits a tile group's steps over
several CTAs (more CTAs than SMs' worth of waves when a problem has few query blocks); their normalised partial
outputs and LSEs are merged exactly in XLA (`merge_splits`). Every step has a valid key (its first box), so after
the first step the running max is finite and no NaN appears; a tile with 0 steps writes O = 0 and LSE = −inf. A
`final` consumer may replace the last q tile's loop (`mosaic_gpu_fwd_tail`: DecMem's 19-row tail, transposed).

Barrier protocol per ring slot: K-ready / V-ready (one TMA arrival per box) and K-consumed / V-consumed (one arrival
per consumer of the stream). The producer walks t = 0 .. n+S−1: it waits for the consumption of step t−S before
reusing its slot and, past the end, still waits for the last S consumptions, so every barrier completion is observed
exactly once (the GPU interpreter checks this; on hardware it is harmless).

Numerics: QKᵀ takes the raw bf16/fp16 operands; the fp32 result is scaled by c = scale·log2(e) once, inside exp2's
argument (exp2(c·s − m), one FMA; the row max is taken over the raw logits and then scaled: `scaled_minus`); the
online softmax runs in base 2 in fp32; the LSE written out is natural-log (m·ln2 + ln l), the `sgm_attention`
contract.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import interpreter

TILE = 64  # rows of a q tile and of a backward key step; also the wgmma M
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Debug aid for a GPU run: apply the tail mask on every step instead of under lax.cond on partial steps only.
ALWAYS_MASK = os.environ.get("SGM_MGPU_ALWAYS_MASK", "0") == "1"
# The forward's softmax scales the logits inside exp2's argument (one FMA a logit, `scaled_minus`) instead of before
# the row max (a multiply and a subtraction): 32 fewer instructions a consumer thread and step, of ~440. The step is
# bound by the consumers' instruction issue (ncu on an H100, 2026-12-06: tensor pipe 60%, issue slots 51%, the
# softmax waits on its own arithmetic, not on the wgmmas), so this took the rollout geometry's forward from 1.439 to
# 1.358 ms (-5.6%) and the rollout from 2.244 to 2.207 s per chunk (docs/benchmarks.md, SGM section, session 11).
# SGM_MGPU_FOLD_SCALE=0: the earlier form, to time against it. FOLD_SCALE_BWD: the same for the backward kernels'
# P = exp2(c·s − lse2) (dq, dk/dv and the key-tail kernel): no faster on an H100 (2026-12-06, DecMem geometry,
# forward+backward 3.965 ms against 3.938 without it, separate processes), so off (SGM_MGPU_FOLD_SCALE_BWD=1).
FOLD_SCALE = os.environ.get("SGM_MGPU_FOLD_SCALE", "1") == "1"
FOLD_SCALE_BWD = os.environ.get("SGM_MGPU_FOLD_SCALE_BWD", "0") == "1"
PRODUCER_REGS = 40
CONSUMER_REGS = {1: 232, 2: 232, 3: 152}  # per consumer thread: 65,536 registers over the CTA, multiples of 8
SMEM_BUDGET = 232_448 - 4096  # sm_90 opt-in maximum minus room for barriers and buffer alignment (~2.8 KB seen)
ROWSUM_N = 16  # columns of the ones block of `StreamPlan.rowsum`: the narrowest wgmma B tile Mosaic GPU takes (32 B
# swizzle); every column receives the same row sum
CODE_BASE = 128  # valid counts (0..64) of a step's boxes packed base 128 into one int32
GROUP_BITS = 3  # row groups of a packed-tails q tile (mosaic_gpu.forward_packed) at most; one bit each per box,
GROUP_BASE = 2 ** GROUP_BITS  # packed base 8 above the boxes' valid counts


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """How a kernel whose consumers own q tiles (the forward; dq) streams K/V (see the module docstring)."""
    consumers: int  # consumer warpgroups per CTA (1..3), one 64-row q tile each
    share: int  # consumers per K/V stream: 1 (own lists) or `consumers` (the tiles of one query block)
    box: int  # key rows per TMA box: 32 or 64
    width: int  # key rows per step (a multiple of box): the N of QKᵀ and the K of PV
    stages: int  # ring slots per stream
    splits: int = 1  # CTAs sharing one tile group's step list
    # Ping-pong: the consumers of a shared stream take turns at the tensor cores (one's softmax overlaps the other's
    # wgmmas) through a schedule barrier each arrives on twice per step, odd ones half a step behind (forward only).
    sched: bool = False
    # Intra-consumer overlap: each consumer issues QKᵀ of step t + 1 and P·V of step t back to back and runs the
    # softmax of step t + 1 while P·V of step t is still on the tensor cores (forward: `mosaic_gpu_fwd_overlap`);
    # dq: its wgmmas in flight during its own arithmetic (`mosaic_gpu_bwd.overlapped_dq`).
    overlap: bool = False
    # With overlap: rescale the output accumulator only in steps that raise some row's max by more than a threshold
    # (`mosaic_gpu_fwd_overlap.lazy_softmax`); forward only.
    lazy: bool = False
    # With overlap: the loop body runs two steps, so consecutive steps' P live in different registers and the wait
    # for P·V need not come before the next P is written (`mosaic_gpu_fwd_overlap`); forward only.
    unroll: bool = False
    # With overlap: each row's softmax sum taken on the tensor cores, P times an SMEM column block of ones into an
    # accumulator rescaled with the output one, instead of a row reduction on the CUDA cores
    # (`mosaic_gpu_fwd_overlap`); forward only.
    rowsum: bool = False

    streams = property(lambda self: self.consumers // self.share)
    nbox = property(lambda self: self.width // self.box)

    def smem_bytes(self, head_dim, itemsize, tiles=1, vectors=1):
        """SMEM of a kernel holding `tiles` 16-bit [64, D] tiles and `vectors` fp32 [64] vectors per consumer
        (forward: q, lse; dq: q and dO, lse and Δ) plus the K and V rings."""
        own = self.consumers * TILE * (tiles * head_dim * itemsize + vectors * 4)
        ones = self.consumers * self.width * ROWSUM_N * itemsize if self.rowsum else 0
        return own + ones + 2 * self.streams * self.stages * self.width * head_dim * itemsize


def plan_stream(block_q, block_kv, head_dim, itemsize, *, tiles=1, vectors=1, stages=None, **overrides):
    """The plan of a q-tile kernel for a geometry. Shared stream when a query block has 2 or 3 (or a multiple) q
    tiles; 32-row boxes when key blocks are larger than one box (they may be partially valid); the deepest ring
    (<= 4) that fits SMEM with `tiles`/`vectors` per consumer (StreamPlan.smem_bytes). `overrides` (consumers,
    share, box, width, splits) are for tuning; `stages` overrides the ring depth."""
    nqs = block_q // TILE
    if nqs % 3 == 0:
        base = dict(consumers=3, share=3, width=64)
    elif nqs % 2 == 0:
        base = dict(consumers=2, share=2, width=128)
    else:
        base = dict(consumers=2, share=1, width=64)
    base["box"] = 64 if block_kv == 64 else 32
    base.update(overrides)
    p = StreamPlan(stages=1, **base)
    shown = dataclasses.replace(p, stages="?")
    where = f"SGM kernel plan {shown} (block_q {block_q}, block_kv {block_kv}, D {head_dim})"
    if p.consumers not in CONSUMER_REGS or p.share not in (1, p.consumers):
        raise ValueError(f"{where}: consumers must be 1..3 and share 1 or consumers")
    if p.share > 1 and nqs % p.consumers:
        raise ValueError(f"{where}: a shared stream needs block_q/64 = {nqs} divisible by consumers")
    if p.box not in (32, 64) or block_kv % p.box or p.width % p.box or not 64 <= p.width <= 256:
        raise ValueError(f"{where}: box must be 32 or 64 dividing block_kv, width a multiple of box in [64, 256]")
    if CODE_BASE ** p.nbox > 2 ** 31:
        raise ValueError(f"{where}: at most 4 boxes per step (width / box = {p.nbox}): a step's valid counts are "
                         f"packed base {CODE_BASE} into one int32")
    if p.splits < 1:
        raise ValueError(f"{where}: splits must be >= 1")
    if p.lazy and not p.overlap:
        raise ValueError(f"{where}: lazy (the conditional rescale) is an option of the overlapped loop: set overlap")
    if p.unroll and (not p.overlap or p.lazy):
        raise ValueError(f"{where}: unroll (two steps a loop body) is an option of the overlapped loop without lazy")
    if p.rowsum and (not p.overlap or p.lazy):
        raise ValueError(f"{where}: rowsum (row sums on the tensor cores) is an option of the overlapped loop without "
                         "lazy")
    if p.overlap and p.sched:
        raise ValueError(f"{where}: overlap and sched (ping-pong) are not combined: the schedule barrier's two phases "
                         "per step assume the plain step order")
    if p.sched and (p.share != p.consumers or p.consumers < 2):
        raise ValueError(f"{where}: sched (ping-pong) needs >= 2 consumers on one shared stream: their step counts "
                         "are equal, so every consumer reaches every schedule-barrier phase")
    if stages is None:
        fits = [s for s in range(1, 5)
                if dataclasses.replace(p, stages=s).smem_bytes(head_dim, itemsize, tiles, vectors) <= SMEM_BUDGET]
        if not fits:
            raise ValueError(f"{where}: even one ring slot exceeds the SMEM budget of {SMEM_BUDGET} B")
        stages = fits[-1]
    p = dataclasses.replace(p, stages=stages)
    if not 1 <= stages <= 16:
        raise ValueError(f"{where}: stages must lie in [1, 16], got {stages}")
    need = p.smem_bytes(head_dim, itemsize, tiles, vectors)
    if need > SMEM_BUDGET:
        raise ValueError(f"{where}: stages = {stages} needs {need} B of SMEM > budget {SMEM_BUDGET} B; use fewer "
                         "stages")
    return p


def default_splits(n_ctas, n_sms=None, waves=5):
    """Split the step lists when the grid is under `waves` waves of CTAs (one CTA per SM at these register counts): the
    last, partial wave otherwise idles much of the GPU (e.g. 288 CTAs = 2.2 waves on 132 SMs). Such grids are split
    up to >= 6 waves (at most 4 splits): on an H100 the DecMem benchmark geometry took 1.00 ms with 3 splits, 1.20
    with 2 and 1.23 with 1; on an H200 the rollout's CFG-folded history call (576 CTAs, 4.4 waves) took 1.88 ms with
    2 splits against 1.96 with 1 (docs/benchmarks.md)."""
    if n_sms is None:  # the GPU's SM count; an H100's 132 elsewhere (interpret mode), so plans do not vary by host
        dev = jax.devices()[0]
        n_sms = (getattr(dev, "core_count", None) if dev.platform == "gpu" else None) or 132
    if n_ctas >= waves * n_sms:
        return 1
    return min(4, -(-6 * n_sms // n_ctas))


class CtaTiles:
    """Index arithmetic of a CTA of a q-tile kernel (forward, dq) under a StreamPlan: grid axis "cta" enumerates
    (tile group, split) with the split fastest; consumer c owns q tile group·consumers + c."""

    def __init__(self, plan, nt, nqs, n_ref, b, h):
        self.plan, self.nt, self.nqs, self.n_ref, self.b, self.h = plan, nt, nqs, n_ref, b, h
        cta, ns = lax.axis_index("cta"), plan.splits
        self.split, self.group = (lax.rem(cta, ns), lax.div(cta, ns)) if ns > 1 else (0, cta)

    def tile_of(self, c):
        """(q tile, whether it exists (ragged last group), its query block) of consumer c."""
        tile = self.group * self.plan.consumers + c
        return tile, tile < self.nt, lax.div(jnp.minimum(tile, self.nt - 1), jnp.int32(self.nqs))

    def span(self, qb):
        """(first list position, step count) of this CTA's split of query block qb's step list."""
        n = self.n_ref[self.b, self.h, qb]
        ns = self.plan.splits
        if ns == 1:
            return 0, n
        per = lax.div(n + (ns - 1), jnp.int32(ns))
        t0 = jnp.minimum(self.split * per, n)
        return t0, jnp.minimum(n - t0, per)

    def out(self, ref, *idx):
        """Output window of this CTA (with the leading split axis when splits > 1)."""
        return ref.at[(self.split, *idx) if self.plan.splits > 1 else idx]

    def stream_of(self, wg):
        return wg if self.plan.share == 1 else 0

    def producer_streams(self):
        """(query block, first list position, step count) of every stream, for kv_producer."""
        streams = []
        for s in range(self.plan.streams):
            _, active, qb = self.tile_of(s * self.plan.share)
            t0, n = self.span(qb)
            streams.append((qb, t0, jnp.where(active, n, 0)))
        return streams


def interpret_params(interpret):
    """`interpret` argument -> what plgpu.kernel takes: False, or GPU interpret-mode parameters (True -> defaults:
    uninitialised SMEM is NaN-filled and out-of-bounds reads raise)."""
    if interpret is None or interpret is False:
        return False
    interpreter.check()
    if interpret is True:
        return plgpu.InterpretGPUParams()
    return interpret


def tiled_smem(shape, dtype, swizzle=128):
    """SMEM buffer of 16-bit rows in the (8, swizzle/2)-tiled, swizzled wgmma layout (128 B: last dim a multiple of
    64; the key-tail kernel uses 64 B for its 32-column tiles, as wgmma needs one swizzle for both SMEM operands)."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // 2)),
                                                plgpu.SwizzleTransform(swizzle)))


def mma(a, b, shape):
    """a @ b into a fresh fp32 accumulator (a: SMEM ref or registers, b: SMEM ref); waits for the wgmma."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def mma_acc(acc, a, b, interpret):
    """acc + a @ b with `a` in registers (bf16/fp16) and `b` an SMEM ref, accumulated in fp32: on hardware one wgmma
    into the initialised accumulator (pl.run_state). jax 0.11.2's GPU interpreter supports neither pl.run_state over
    WGMMA accumulators nor register wgmma operands, so interpret mode reads `b` from SMEM and takes an fp32 dot of
    the same operands: the only place where interpreted kernels differ from compiled ones (every barrier, TMA,
    SMEM-operand wgmma and all the softmax arithmetic run as on the GPU)."""
    if interpret:
        return acc + smem_dot(a, b)

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(body)(plgpu.ACC.init(acc))


def smem_dot(a, b):
    """a @ b in fp32 with `b` read from SMEM: the interpret-mode stand-in for a wgmma with a register operand."""
    b_val = b[...]
    # The interpreter models this plain load as a generic-proxy SMEM read, which the race detector orders before the
    # producer's next TMA (async proxy) write into the slot only across a proxy fence. The hardware path reads `b`
    # inside the wgmma (async proxy) and needs none.
    plgpu.commit_smem()
    return lax.dot(a, b_val, preferred_element_type=jnp.float32)


def store_out(*outs):
    """Writes kernel results out: each (value, SMEM staging ref, GMEM destination ref) is staged, then one fence makes
    the stores visible to TMA, the copies are issued, and the CTA waits for them."""
    for value, stage, _ in outs:
        stage[...] = value
    plgpu.commit_smem()
    for _, stage, dst in outs:
        plgpu.copy_smem_to_gmem(stage, dst)
    plgpu.wait_smem_to_gmem(0)


def mask_tail(s, count, axis):
    """Logits past `count` along `axis` (1: key columns, 0: key rows of a transposed tile) -> −inf; skipped (via
    lax.cond) when the step is full, so full key blocks pay nothing."""
    def apply(x):
        pos = plgpu.broadcasted_iota(jnp.int32, x.shape, axis, layout=plgpu.Layout.WGMMA)
        return jnp.where(pos < count, x, -jnp.inf)
    if ALWAYS_MASK:
        return apply(s)
    return lax.cond(count < s.shape[axis], apply, lambda x: x, s)


def mask_boxes(s, code, box, nbox, axis=1):
    """Keys of a step of `nbox` boxes along `axis` (1: columns; 0: rows of a transposed tile): key j·box + i is
    valid iff i < valid_j, the counts packed in `code` (`lists.group_steps`); −inf (under lax.cond) if a box is
    partial."""
    if nbox == 1:
        return mask_tail(s, code, axis=axis)
    full = sum(box * CODE_BASE ** j for j in range(nbox))

    def apply(x):
        pos = plgpu.broadcasted_iota(jnp.int32, x.shape, axis, layout=plgpu.Layout.WGMMA)
        ok = None
        for j in range(nbox):
            vj = lax.rem(lax.div(code, jnp.int32(CODE_BASE ** j)), jnp.int32(CODE_BASE))
            in_box = jnp.logical_and(pos >= j * box, pos < j * box + vj)
            ok = in_box if ok is None else jnp.logical_or(ok, in_box)
        return jnp.where(ok, x, -jnp.inf)
    if ALWAYS_MASK:
        return apply(s)
    return lax.cond(code != full, apply, lambda x: x, s)


def online_softmax(s, code, m_i, l_i, c_log2, plan, dt, row_groups=None, row_sum=True):
    """One step of the base-2 online softmax of raw logits `s` [64, width]: (p in `dt`, new running max, new running
    sum, the rescale factor alpha of everything accumulated before). row_groups: a packed-tails tile
    (`mask_row_groups`), whose rows may see no key in a step. row_sum=False: the sum is taken elsewhere
    (`StreamPlan.rowsum`) and l_i is only rescaled."""
    s, c_log2 = prescaled(s, c_log2, FOLD_SCALE)
    if row_groups is None:
        s = mask_boxes(s, code, plan.box, plan.nbox)
        m_new = jnp.maximum(m_i, s.max(axis=1) * c_log2)  # finite: every step has a valid key
        m_use = m_new
    else:
        s = mask_row_groups(s, code, plan.box, plan.nbox, *row_groups)
        m_new = jnp.maximum(m_i, s.max(axis=1) * c_log2)  # −inf for a row that has seen no key yet
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # exp2(−inf − 0) = 0, not NaN
    alpha = jnp.exp2(m_i - m_use)
    p = jnp.exp2(scaled_minus(s, c_log2, m_use))
    l_new = l_i * alpha + p.sum(axis=1) if row_sum else l_i * alpha
    return p.astype(dt), m_new, l_new, alpha


def prescaled(s, c, fold):
    """(logits, scale) as the softmax takes them: the raw logits and c when `fold` (c then goes inside exp2's
    argument, `scaled_minus`), else the logits times c and 1. Masks apply to either (−inf stays −inf)."""
    return (s, c) if fold else (s * c, 1.0)


def scaled_minus(s, c, m, axis=0):
    """s·c − m (m a vector along `axis`: per row for 0, per column for 1): one fused multiply-add a logit when c != 1
    (a max is then taken over the raw logits and scaled, exact for c > 0), instead of a multiply before the max and
    a subtraction after it."""
    m = lax.broadcast_in_dim(m, s.shape, [axis])
    return s - m if c == 1.0 else s * c - m


def mask_row_groups(s, code, box, nbox, groups, rows):
    """Key columns of a step of a packed-tails q tile (`mosaic_gpu_qtails`): rows g·rows .. g·rows + rows − 1 are
    the tail of the group's g-th query block and see column j·box + i iff i < valid_j and bit g of box j's bits is
    set (`lists.group_steps` with bits); rows past groups·rows see nothing. Always applied: most union entries were
    selected by only some of the blocks."""
    col = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
    row = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
    bits = lax.div(code, jnp.int32(CODE_BASE ** nbox))
    ok = None
    for j in range(nbox):
        vj = lax.rem(lax.div(code, jnp.int32(CODE_BASE ** j)), jnp.int32(CODE_BASE))
        bj = lax.rem(lax.div(bits, jnp.int32(GROUP_BASE ** j)), jnp.int32(GROUP_BASE))
        limit = jnp.zeros_like(row)
        for g in range(groups):  # valid keys of box j for the rows of group g: vj if the group selected it, else 0
            seen = vj * lax.rem(lax.div(bj, jnp.int32(2 ** g)), jnp.int32(2))
            limit = jnp.where(jnp.logical_and(row >= g * rows, row < (g + 1) * rows), seen, limit)
        in_box = jnp.logical_and(col >= j * box, col < j * box + limit)
        ok = in_box if ok is None else jnp.logical_or(ok, in_box)
    return jnp.where(ok, s, -jnp.inf)


def row_vector(value):
    """Per-row fp32 vector of a 64-row tile in the layout of a row reduction of a wgmma result."""
    return plgpu.layout_cast(jnp.full((TILE,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))


def zeros_acc(d):
    return plgpu.layout_cast(jnp.full((TILE, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)


def ring_producer(streams, counts, stages):
    """Producer loop feeding one SMEM ring per stream (ring slots s·S .. s·S+S−1 belong to stream s).

    streams: per stream (address, copies): address(t) reads the GMEM list entry of step t (it must clamp t into
    the list's bounds: it is called for every t); copies is a list of (issue(addr, slot_index), consumed), issue
    starting the TMA copies of the step into ring slot `slot_index` and `consumed` being the barrier array the
    consumers arrive on when done with that slot. counts: per stream its (traced) number of steps.
    For t in [0, max(count) + S): read step t's address first (the load's latency overlaps the wait), wait for the
    consumption of step t − S (slot reuse, or the final drain), then issue step t."""
    total = functools.reduce(jnp.maximum, counts) + stages

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


def kv_producer(streams, rows_ref, b, h, k, v, stages, box):
    """The producer warpgroup of the forward and dq kernels: for each stream (query block qb, first list position
    t0, step count n) streams the listed K and V boxes into its ring. rows_ref `[B, H, Nq, M, nbox]` holds the first
    key row of every box; k, v = (gmem ref, smem ring, ready barriers, consumed barriers)."""
    plgpu.set_max_registers(PRODUCER_REGS, action="decrease")
    last = rows_ref.shape[3] - 1

    def address(qb, t0, t):  # clamped: the producer reads step t before it knows t < n
        pos = jnp.minimum(t0 + t, last)
        return tuple(rows_ref[b, h, qb, pos, j] for j in range(rows_ref.shape[4]))

    def issue(src, ring, ready, starts, bi):
        for j, r in enumerate(starts):
            dst = ring.at[bi] if len(starts) == 1 else ring.at[bi, pl.ds(j * box, box)]
            plgpu.copy_gmem_to_smem(src.at[b, pl.ds(pl.multiple_of(r, box), box), h], dst, ready.at[bi])

    specs = [(functools.partial(address, qb, t0),
              [(functools.partial(issue, src, ring, ready), done) for src, ring, ready, done in (k, v)])
             for qb, t0, _ in streams]
    ring_producer(specs, [n for _, _, n in streams], stages)


def forward_call(q, k, v, rows, code, nsteps, *, block_q, scale, plan, interpret, row_groups=None, final=None):
    """Launches the forward kernel. rows `[B, H, Nq, M, nbox]` / code `[B, H, Nq, M]` / nsteps `[B, H, Nq]`:
    `lists.group_steps` of `lists.subtile_steps(sub=plan.box)`. Returns (out, lse), each with a leading split axis
    when plan.splits > 1 (partial results: see merge_splits), and `final`'s outputs: `final`, if given, is the last
    consumer's own work instead of its q tile (`mosaic_gpu_fwd_tail.TailConsumer`: `out_types`, `scratch`, `run`).

    row_groups = (groups, rows): packed q tails (64-row query blocks whose rows come in `groups` groups of `rows`
    with their own selections; the codes carry each box's group bits, `mask_row_groups`). A row may then see no key
    in a step, or in a whole split, so the running max is guarded against −inf."""
    B, Tq, H, D = q.shape
    dt = q.dtype
    nc, S, W, nsplit = plan.consumers, plan.stages, plan.width, plan.splits
    nt, nqs = Tq // TILE, block_q // TILE
    groups = -(-nt // nc)
    c_log2 = float(scale) * LOG2E
    last = code.shape[-1] - 1

    def sgm_fwd(q_ref, k_ref, v_ref, rows_ref, code_ref, n_ref, o_ref, lse_ref, *refs):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        cta = CtaTiles(plan, nt, nqs, n_ref, b, h)
        ones_smem, refs = (refs[-1], refs[:-1]) if plan.rowsum else (None, refs)  # the last scratch, if any
        final_out, refs = (refs[:2], refs[2:]) if final else ((), refs)
        (q_smem, lse_smem, q_bar, k_smem, v_smem, k_rdy, v_rdy, k_done, v_done), sched_bar = refs[:9], refs[9:]
        if final:  # its scratch follows the rings (no schedule barrier: `final` excludes sched)
            ring = (k_smem, v_smem, k_rdy, v_rdy, k_done, v_done)
            pl.when(wg == nc - 1)(lambda: final.run(cta, q_ref, q_smem, q_bar, code_ref, ring, final_out, sched_bar))

        @pl.when(wg < (nc - 1 if final else nc))
        def _consumer():
            plgpu.set_max_registers(CONSUMER_REGS[nc], action="increase")
            tile, active, qb = cta.tile_of(wg)
            stream = cta.stream_of(wg)

            @pl.when(active)
            def _():
                q_tile = q_smem.at[wg]
                rows_q = pl.ds(tile * TILE, TILE)
                t0, n = cta.span(qb)
                code_at = lambda t: code_ref[b, h, qb, jnp.minimum(t0 + t, last)]
                slot = lambda t: stream * S + lax.rem(t, S)  # the ring slot of step t

                @pl.when(n > 0)  # a tile without steps only writes zeros
                def _():
                    plgpu.copy_gmem_to_smem(q_ref.at[b, rows_q, h], q_tile, q_bar.at[wg])
                    plgpu.barrier_wait(q_bar.at[wg])

                def sync():  # one phase of the schedule barrier (sched plans only)
                    plgpu.barrier_arrive(sched_bar[0])
                    plgpu.barrier_wait(sched_bar[0])

                def logits(bi):
                    if not plan.sched:
                        return mma(q_tile, k_smem.at[bi].transpose((1, 0)), (TILE, W))

                    def body(acc_ref):  # issue QKᵀ, then wait for the other parity's softmax before reading it
                        plgpu.wgmma(acc_ref, q_tile, k_smem.at[bi].transpose((1, 0)))
                        sync()
                        return acc_ref[...]
                    return pl.run_scoped(body, plgpu.ACC((TILE, W), jnp.float32))

                def step(t, carry):
                    acc, m_i, l_i, cd = carry
                    cd_next = code_at(t + 1)  # GMEM latency hidden behind this step
                    bi = slot(t)
                    plgpu.barrier_wait(k_rdy.at[bi])
                    s = logits(bi)
                    plgpu.barrier_arrive(k_done.at[bi])
                    p, m_new, l_i, alpha = online_softmax(s, cd, m_i, l_i, c_log2, plan, dt, row_groups)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    if plan.sched:  # softmax done: hand the tensor cores over, then wait for our turn
                        acc, l_i, m_new, p = lax.optimization_barrier((acc, l_i, m_new, p))
                        plgpu.barrier_arrive(sched_bar[0])
                        plgpu.barrier_wait(v_rdy.at[bi])
                        plgpu.barrier_wait(sched_bar[0])
                    else:
                        plgpu.barrier_wait(v_rdy.at[bi])
                    acc = mma_acc(acc, p, v_smem.at[bi], interpret)
                    plgpu.barrier_arrive(v_done.at[bi])
                    return acc, m_new, l_i, cd_next

                def finish(acc, m_i, l_i):
                    has = l_i > 0.0  # false only for a tile without steps
                    l_safe = jnp.where(has, l_i, 1.0)
                    inv = jnp.where(has, 1.0 / l_safe, 0.0)
                    store_out(((acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dt), q_tile,
                               cta.out(o_ref, b, rows_q, h)),
                              (jnp.where(has, m_i * LN2 + jnp.log(l_safe), -jnp.inf), lse_smem.at[wg],
                               cta.out(lse_ref, b, h, rows_q)))

                empty = (zeros_acc(D), row_vector(-jnp.inf), row_vector(0.0))
                if plan.overlap:
                    # imported here: the overlapped loop's module builds on this one's helpers
                    from pallas_kernels.sgm.mosaic_gpu_fwd_overlap import overlapped_steps

                    ring = (slot, k_smem, v_smem, k_rdy, v_rdy, k_done, v_done)
                    ones = None if ones_smem is None else ones_smem.at[wg]
                    pl.when(n > 0)(lambda: finish(*overlapped_steps(
                        n, code_at, q_tile, ring, c_log2, plan, dt, D, interpret, row_groups, ones)))
                    pl.when(n == 0)(lambda: finish(*empty))
                    return
                odd = lax.rem(wg, 2) == 1
                if plan.sched:  # odd consumers start half a step behind ...
                    pl.when(odd)(sync)
                acc, m_i, l_i, _ = lax.fori_loop(0, n, step, (*empty, code_at(0)))
                if plan.sched:  # ... and even ones end with the phase the odd ones began with
                    pl.when(jnp.logical_not(odd))(sync)
                finish(acc, m_i, l_i)

        @pl.when(wg == nc)
        def _producer():
            kv_producer(cta.producer_streams(), rows_ref, b, h, (k_ref, k_smem, k_rdy, k_done),
                        (v_ref, v_smem, v_rdy, v_done), S, plan.box)

    f32 = jnp.float32
    lead = (nsplit,) if nsplit > 1 else ()
    kernel = plgpu.kernel(
        sgm_fwd,
        out_type=(jax.ShapeDtypeStruct(lead + q.shape, dt), jax.ShapeDtypeStruct(lead + (B, H, Tq), f32),
                  *(final.out_types() if final else ())),
        scratch_types=[
            tiled_smem((nc, TILE, D), dt),  # q tiles, reused to stage the output
            plgpu.SMEM((nc, TILE), f32),  # LSE staging
            plgpu.Barrier(num_barriers=nc),
            *ring_scratch(plan, D, dt, final.v_swizzle if final else 128),
            *([plgpu.Barrier(num_arrivals=nc)] if plan.sched else []),  # the schedule barrier
            *(final.scratch() if final else []),
            *([tiled_smem((nc, plan.width, ROWSUM_N), dt, 2 * ROWSUM_N)] if plan.rowsum else []),  # ones, last
        ],
        **launch_params(plan, H, B, groups * nsplit, interpret),
    )
    return kernel(q, k, v, rows, code, nsteps)


def ring_scratch(plan, d, dt, v_swizzle=128):
    """K and V rings (stream s owns slots s·S .. s·S+S−1) and their ready (one TMA arrival per box) and consumed
    (one arrival per consumer of the stream) barriers, in kernel-argument order k, v, k_rdy, v_rdy, k_done, v_done."""
    slots = plan.streams * plan.stages
    ready = plgpu.Barrier(num_arrivals=plan.nbox, num_barriers=slots)
    done = plgpu.Barrier(num_arrivals=plan.share, num_barriers=slots)
    return [tiled_smem((slots, plan.width, d), dt), tiled_smem((slots, plan.width, d), dt, v_swizzle), ready, ready,
            done, done]


def launch_params(plan, heads, batch, ctas, interpret):
    return dict(grid=(heads, ctas, batch), grid_names=("heads", "cta", "batch"), num_threads=plan.consumers + 1,
                thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                interpret=interpret_params(interpret))


def merge_splits(out, lse):
    """Exact merge of the per-split normalised outputs `[splits, B, Tq, H, D]` and natural-log LSEs
    `[splits, B, H, Tq]` (−inf for a split without steps): weights exp(lse_s − lse)."""
    m = jnp.max(lse, axis=0)
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    w = jnp.exp(lse - m_safe)  # 0 for empty splits
    total = jnp.sum(w, axis=0)
    has = total > 0.0
    lse_all = jnp.where(has, m_safe + jnp.log(jnp.where(has, total, 1.0)), -jnp.inf)
    wn = jnp.where(has, w / jnp.where(has, total, 1.0), 0.0)  # [S, B, H, Tq]
    merged = jnp.einsum("sbqhd,sbhq->bqhd", out.astype(jnp.float32), wn)
    return merged.astype(out.dtype), lse_all
