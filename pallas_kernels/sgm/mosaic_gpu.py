"""Sparse Global Memory (SGM) block-sparse attention as Pallas Mosaic GPU kernels for Hopper (sm_90a, H100/H200),
jax 0.11.2: forward (`mosaic_gpu_fwd.py`), dq and dk/dv (`mosaic_gpu_bwd.py`), registered as backend "mosaic_gpu" of
`pallas_kernels.sgm.api.sgm_attention`.

Contract (shared with the other SGM backends): q `[B, Tq, H, D]`, Tq = Nq·block_q; k/v `[B, Tk, H, D]`, Tk =
Nk·block_kv, block-major and padded; `kv_block_idx` int32 `[B, H, Nq, K]` ascending (entries >= count ignored),
`kv_block_cnt` `[B, H, Nq]`, `kv_block_len` `[B, Nk]` valid tokens first. Returns out `[B, Tq, H, D]` in q.dtype and
the natural-log LSE fp32 `[B, H, Tq]` (−inf where a row has no valid key; its output is 0).

Supported: bf16 and fp16 (SMEM holds the input dtype; wgmma takes no fp32 operands in this form), head dim 64 or
128, block_q and block_kv multiples of 64, any B, H, Tq != Tk. Padded key slots must hold finite values (they are
multiplied by zero probabilities, as in the reference). Everything runs in XLA around the kernels: list
sanitising, the step lists (`lists.subtile_steps` + `lists.group_steps` under each kernel's StreamPlan), the reverse
key->query lists (`lists.reverse_block_lists`, stable sort: deterministic), merging split partial results, delta =
rowsum(dO·O) and the LSE base conversion.

Plans (`forward_plan`, `dq_plan`; `mosaic_gpu_fwd.StreamPlan`): the forward shares one K/V stream among the q tiles
of a query block when it has 2 or 3 of them (DecMem's 192-slot blocks), uses 32-row key boxes for blocks larger
than 64, and splits short grids; dq shares a stream among 3 consumers for 192-slot query blocks (DQ_SHARED3) and
otherwise keeps 2 consumers with their own lists and 64-row steps (DQ_DEFAULTS); both measured. A forward-only
caller that passes q_rows (the rollout) may have the padding rows skipped: `forward_packed` runs a block's whole q
tiles as usual and packs the partial last tiles of up to 3 neighbouring blocks into one tile over the union of
their lists (Q_TAILS).

Backward: split and deterministic (no atomics). dq kernel: the forward's CTA machinery under its own plan. dk/dv
kernel: each consumer owns one 64-row key tile and walks the query rows of the query blocks that selected its key
block (reverse lists, ascending): whole q tiles, or with `q_rows` 32-row boxes of the rows in use packed across
query blocks (`q_boxes`). With `k_tails`, a key block's last tile holding <= 32 valid keys goes to the transposed
tail kernel (`mosaic_gpu_tail.py`, keys on the N side) instead, and the dk/dv kernel's CTAs take the remaining tiles
first (`dkv_tile_map`), two per CTA; with `dkv_share` the two tiles of one key block share a CTA's query stream.
Defaults, from their H200 timings: q_boxes on; k_tails and dkv_share on when the reverse lists are long (training),
off when they are short (see Q_BOXES below). Both backward kernels can keep their wgmmas in flight during their own
arithmetic (DKV_OVERLAP, DQ_OVERLAP: off, as they did not pay on an H100); the forward's overlap (FWD_OVERLAP) is on
for shared streams.
Logits are recomputed exactly as in the forward (raw operands, one fp32 multiply).

`interpret=True` (or a `plgpu.InterpretGPUParams`) runs the same kernel bodies in the Mosaic GPU interpreter on CPU;
see `mosaic_gpu_fwd.mma_acc` for the one place where the interpreted body differs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp

from pallas_kernels.sgm.api import register_backend
from pallas_kernels.sgm.lists import group_steps, reverse_block_lists, subtile_steps, union_lists
from pallas_kernels.sgm.mosaic_gpu_bwd import dkv_call, dq_call, query_boxes
from pallas_kernels.sgm.mosaic_gpu_tail import TAIL, dkv_tail_call, tail_plan
from pallas_kernels.sgm.reference import check_q_rows, mask_padding_rows
from pallas_kernels.sgm.mosaic_gpu_fwd import (CODE_BASE, GROUP_BASE, GROUP_BITS, LOG2E, TILE, StreamPlan,
                                               default_splits, forward_call, merge_splits, plan_stream)
from pallas_kernels.sgm.mosaic_gpu_fwd_tail import TailConsumer, q_tail_fits, q_tail_plan

__all__ = ["sgm_forward_mgpu", "sgm_backward_mgpu", "forward_plan", "dq_plan", "default_stages", "SUPPORTED_DTYPES",
           "SUPPORTED_HEAD_DIMS", "StreamPlan"]

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (64, 128)


def default_stages(head_dim):
    """Ring depth per consumer of the dk/dv kernel (own 64-row rings, 2 consumers): the deepest that fits in 227 KiB
    of SMEM (checked by lowering in tests/test_sgm_kernels.py): 2 at D = 128, 4 at D = 64. The forward and dq
    kernels size their rings from their plans (`forward_plan`, `dq_plan`)."""
    return 2 if head_dim > 64 else 4


# Ping-pong consumers (StreamPlan.sched) on shared streams: off, as they gained nothing on an H200
# (docs/benchmarks.md); SGM_MGPU_SCHED=1 turns them on for A/B timing.
FWD_SCHED = os.environ.get("SGM_MGPU_SCHED", "0") == "1"


def _switch(name, default):
    """An environment switch: "1" on, "0" off, "auto" decided per call from the lists' shape (`_long_lists`)."""
    value = os.environ.get(name, default)
    if value not in ("0", "1", "auto"):
        raise ValueError(f"{name}={value!r}: expected 0, 1 or auto")
    return "auto" if value == "auto" else value == "1"


# The dk/dv variants, measured on an H200 on 2026-12-05 (docs/benchmarks.md, SGM section; whole backward):
# - q_boxes: with q_rows, stream only the query rows in use as packed 32-row boxes (`mosaic_gpu_bwd.query_boxes`):
#   3.165 ms against 3.27-3.30 in the DecMem benchmark geometry. On (SGM_MGPU_Q_BOXES=0 turns it off).
# - k_tails: key-block tails of <= 32 valid keys (DecMem's 19 past 128) through the transposed tail kernel
#   (`mosaic_gpu_tail`), the other tiles two per CTA (`dkv_tile_map`); and dkv_share: a CTA's two tiles of one key
#   block on one query stream. With short reverse lists (the DecMem benchmark: each key block listed by ~1.6 query
#   blocks) the tail kernel's own cost dominates: 4.41 ms (k_tails) and 4.24 (with q_boxes, with or without
#   dkv_share) against 3.27; with a training step's long lists (720 query blocks against 720, each key block listed
#   by ~80) 66.7 ms (q_boxes + k_tails) and 65.7-66.1 (+ dkv_share) against 74.3-75.3. So both are "auto": on
#   when the lists average >= LONG_LISTS query blocks per key block (SGM_MGPU_K_TAILS / SGM_MGPU_DKV_SHARE = 0, 1
#   or auto).
Q_BOXES = _switch("SGM_MGPU_Q_BOXES", "1")
# QKᵀ of the next step and P·V of this one in flight together in each forward consumer (StreamPlan.overlap,
# FlashAttention-3's intra-warpgroup overlap). Timed on an H100 on 2026-12-05 (docs/benchmarks.md): the DecMem
# forward 0.822 ms against 0.826-0.880 plain, the rollout geometry's 1.360-1.366 against 1.471-1.478, the training
# geometry's 19.82 against 21.03, the rollout at 56 latents 2.249 s per chunk against 2.295; with 3 consumers and
# 128-key steps it spills (2.86 ms). "auto" (the default): on for shared streams whose consumers hold at most 256
# logit columns together (3 x 64, 2 x 128: the measured wins), off for own-list plans (not timed);
# SGM_MGPU_OVERLAP=0 / 1 forces it.
FWD_OVERLAP = _switch("SGM_MGPU_OVERLAP", "auto")
# The overlapped forward rescaling its output accumulator only in steps that raise a row's max by more than
# LAZY_TAU (`mosaic_gpu_fwd_overlap`). In the rollout on an H100 (2026-12-06) no faster than the every-step rescale
# (2.275 s per chunk against 2.264-2.275), and in the kernel alone slower (1.455 against 1.439 ms; with the scale
# inside exp2 1.399 against 1.358, 2026-12-06): off (SGM_MGPU_LAZY=1 turns it on).
FWD_LAZY = os.environ.get("SGM_MGPU_LAZY", "0") == "1"
# The overlapped forward's loop body running two steps (`StreamPlan.unroll`), so that ptxas need not wait for the
# P·V in flight before the softmax writes the next P (with one step a body, both P share registers; the SASS of
# 2026-12-06 shows the wait hoisted above the softmax, docs/benchmarks.md). Timed on an H100 (2026-12-06): 21% slower
# (1.648 against 1.364 ms in the rollout geometry; the second P spills 16 bytes at 152 registers), so off
# (SGM_MGPU_UNROLL=1 turns it on).
FWD_UNROLL = os.environ.get("SGM_MGPU_UNROLL", "0") == "1"
# The overlapped forward's row sums on the tensor cores (`StreamPlan.rowsum`: P times a block of ones into a second
# accumulator rescaled with the output one) instead of a row reduction on the CUDA cores. Timed on an H100
# (2026-12-06): the rollout geometry's forward -2.5% (1.403 against 1.437 ms), the DecMem geometry's -2.7% (0.809
# against 0.831 ms, 7 interleaved rounds of a drifting GPU), the rollout 2.214 s per chunk against 2.225: on
# (SGM_MGPU_ROWSUM=0 turns it off).
FWD_ROWSUM = os.environ.get("SGM_MGPU_ROWSUM", "1") == "1"
K_TAILS = _switch("SGM_MGPU_K_TAILS", "auto")
DKV_SHARE = _switch("SGM_MGPU_DKV_SHARE", "auto")
# dk/dv consumers with their wgmmas in flight during their own exp2 and dS arithmetic
# (`mosaic_gpu_bwd.overlapped_dkv`), and the same for the dq kernel (`mosaic_gpu_bwd.overlapped_dq`, its plan's
# `overlap`). Timed on an H100 on 2026-12-05 (whole backward): dk/dv 3.127 ms against 3.157-3.184 in the DecMem
# geometry but 67.6 against 63.0-64.0 in the training geometry; dq 5.01 against 3.16-3.18 (its 3 consumers at 152
# registers cannot hold the extra logits tile). Both off; SGM_MGPU_DKV_OVERLAP=1 / SGM_MGPU_DQ_OVERLAP=1 turn them on.
DKV_OVERLAP = _switch("SGM_MGPU_DKV_OVERLAP", "0")
DQ_OVERLAP = os.environ.get("SGM_MGPU_DQ_OVERLAP", "0") == "1"
LONG_LISTS = 8  # between the two measured geometries (1.6: off is faster; 80: on is faster)
# Packed q tails in the forward, when a caller passes q_rows (`forward_packed`): 5-16% slower than the padded
# forward on an H200 (plain loops) and no faster with the overlap on an H100 (2026-12-05), so off by default
# (SGM_MGPU_Q_TAILS=1 turns it on).
Q_TAILS = _switch("SGM_MGPU_Q_TAILS", "0")
# The third consumer on its query block's partial last q tile, transposed (`mosaic_gpu_fwd_tail`), when a caller
# passes q_rows with 129..160 rows of 192 in use (DecMem: 147): correct, but 1.27-1.32x slower than the padded
# forward on an H100 (2026-12-05; the column-wise softmax and the SMEM-staged P^T cost more than the MMA work it
# saves, and the CTA waits for its slowest consumer), so off (SGM_MGPU_Q_TAIL_T=1 turns it on).
Q_TAIL_T = _switch("SGM_MGPU_Q_TAIL_T", "0")


def _long_lists(kv_block_idx, nk):
    """Whether the reverse (key -> query block) lists are long: Nq·K / Nk >= LONG_LISTS (static shapes)."""
    _, _, nq, kk = kv_block_idx.shape
    return nq * kk >= LONG_LISTS * nk


def _resolve(value, default, long_lists):
    value = default if value is None else value
    return long_lists if value == "auto" else bool(value)


def forward_plan(q_shape, block_q, block_kv, dtype, *, stages=None, plan=None):
    """The forward kernel's StreamPlan for q `[B, Tq, H, D]`: `plan_stream`'s choice, `plan` (a dict of overrides,
    for tuning) applied on top, the step lists split over CTAs when the grid would be under 5 waves, and ping-pong
    consumers (FWD_SCHED) on a shared stream, or the intra-consumer overlap (FWD_OVERLAP) where a plan asks for
    neither."""
    p = _plan(q_shape, block_q, block_kv, dtype, stages, plan, {}, tiles=1, vectors=1, waves=5)
    given = dict(plan or {})
    if "sched" not in given and p.share == p.consumers >= 2 and not p.overlap:
        p = dataclasses.replace(p, sched=FWD_SCHED)
    if "overlap" not in given and not p.sched:
        p = dataclasses.replace(p, overlap=_overlap_default(p) if FWD_OVERLAP == "auto" else FWD_OVERLAP)
    if "lazy" not in given and p.overlap:
        p = dataclasses.replace(p, lazy=FWD_LAZY)
    if "unroll" not in given and p.overlap and not p.lazy:
        p = dataclasses.replace(p, unroll=FWD_UNROLL)
    if "rowsum" not in given and p.overlap and not p.lazy:
        p = dataclasses.replace(p, rowsum=FWD_ROWSUM)
    return p


def _overlap_default(p):
    """FWD_OVERLAP's "auto": shared streams whose consumers hold <= 256 logit columns together (see FWD_OVERLAP)."""
    return p.share == p.consumers >= 2 and p.consumers * p.width <= 256


# dq plans. Query blocks of 3 q tiles (DecMem's 192 slots) share one K/V stream among 3 consumers, as the forward
# does: on an H200 the DecMem geometry's whole backward took 3.26 ms with it against 3.44-3.50 ms with 2 consumers on
# their own lists (two runs of the default interleaved in one sweep, 2026-12-04), after 3.52 against 3.81-3.91 ms in
# an earlier session (docs/benchmarks.md). Other blocks keep the first design: 2 consumers with their own lists and
# 64-row boxes (on an H100 no other plan beat it beyond run-to-run noise).
DQ_DEFAULTS = dict(consumers=2, share=1, width=64, box=64)
DQ_SHARED3 = dict(consumers=3, share=3, width=64, box=64)


def dq_plan(q_shape, block_q, block_kv, dtype, *, stages=None, plan=None):
    """The dq kernel's StreamPlan: DQ_SHARED3 for query blocks of 3 (or 3n) q tiles, else DQ_DEFAULTS, `plan`
    overrides on top, splits as in the forward but only under 3 waves (the 5-wave rule was measured for the forward
    only; partial dq sums added in XLA), the overlap (`mosaic_gpu_bwd.overlapped_dq`) as DQ_OVERLAP says unless
    `plan` does."""
    defaults = dict(DQ_SHARED3 if (block_q // TILE) % 3 == 0 else DQ_DEFAULTS, overlap=DQ_OVERLAP)
    if dict(plan or {}).get("sched"):
        raise ValueError("dq plan override sched: ping-pong is a forward-kernel option, the dq kernel has none")
    return _plan(q_shape, block_q, block_kv, dtype, stages, plan, defaults, tiles=2, vectors=2, waves=3)


def _plan(q_shape, block_q, block_kv, dtype, stages, plan, defaults, tiles, vectors, waves):
    B, Tq, H, D = q_shape
    overrides = dict(plan or {})
    stages = overrides.pop("stages", stages)
    p = plan_stream(block_q, block_kv, D, jnp.dtype(dtype).itemsize, tiles=tiles, vectors=vectors, stages=stages,
                    **{**defaults, **overrides})
    if "splits" not in overrides:
        ctas = B * H * -(-(Tq // TILE) // p.consumers)
        p = dataclasses.replace(p, splits=default_splits(ctas, waves=waves))
    return p


def _step_lists(idx, cnt, lens, block_kv, p):
    rows, valid, nsteps = subtile_steps(idx, cnt, lens, block_kv=block_kv, sub=p.box)
    return group_steps(rows, valid, nsteps, p.nbox, base=CODE_BASE)  # the packing mask_boxes unpacks


def _check(q, k, v, idx, cnt, lens, block_q, block_kv, stages):
    B, Tq, H, D = q.shape
    if k.shape != v.shape or k.ndim != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D):
        raise ValueError(f"mosaic_gpu SGM: k/v shapes {k.shape}/{v.shape} do not match q {q.shape}")
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"mosaic_gpu SGM: q, k, v must all be bfloat16 or all float16 (wgmma operands in SMEM), got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"mosaic_gpu SGM: head dim {D} not supported (supports {SUPPORTED_HEAD_DIMS})")
    if block_q % TILE or block_kv % TILE or block_q < TILE or block_kv < TILE:
        raise ValueError(f"mosaic_gpu SGM: block_q ({block_q}) and block_kv ({block_kv}) must be positive multiples "
                         f"of {TILE}")
    if Tq % block_q or k.shape[1] % block_kv:
        raise ValueError(f"mosaic_gpu SGM: Tq = {Tq} / Tk = {k.shape[1]} are not multiples of block_q = {block_q} / "
                         f"block_kv = {block_kv}")
    Nq, Nk = Tq // block_q, k.shape[1] // block_kv
    if idx.ndim != 4 or idx.shape[:3] != (B, H, Nq) or cnt.shape != (B, H, Nq) or lens.shape != (B, Nk):
        raise ValueError(f"mosaic_gpu SGM: lists must be idx [B, H, Nq, K] = [{B}, {H}, {Nq}, K], cnt [B, H, Nq], "
                         f"len [B, Nk = {Nk}]; got {idx.shape}, {cnt.shape}, {lens.shape}")
    stages = default_stages(D) if stages is None else stages
    if not 1 <= stages <= 16:
        raise ValueError(f"mosaic_gpu SGM: stages must lie in [1, 16], got {stages}")
    return B, Tq, H, D, Nq, Nk, stages


def _sanitize(idx, cnt, lens, nk, block_kv):
    """Same clipping as api.py, so the kernels stand alone too (garbage ids past the count never reach a TMA)."""
    kk = idx.shape[-1]
    cnt = jnp.clip(cnt.astype(jnp.int32), 0, kk)
    idx = jnp.clip(idx.astype(jnp.int32), 0, nk - 1)
    return idx, cnt, jnp.clip(lens.astype(jnp.int32), 0, block_kv)


def _forward(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, *, block_q, block_kv, scale=None, stages=None,
             plan=None, interpret=False, q_rows=None, q_tails=None, q_tail_t=None):
    """Block-sparse SGM attention forward. Returns (out `[B, Tq, H, D]` in q.dtype, natural-log lse `[B, H, Tq]`).
    `stages` sets the ring depth, `plan` (a tuple of (field, value) pairs of `StreamPlan`, hashable for jit)
    overrides the automatic plan; both are for tuning. q_rows (static): only the first q_rows rows of each query
    block are queries; with q_tails (default Q_TAILS) the rows past it are skipped (out 0, LSE −inf) and the partial
    last q tiles are packed (`forward_packed`); with q_tail_t (default Q_TAIL_T), where the tail fits, the third
    consumer runs it transposed (`forward_tail`); without either, q_rows changes nothing."""
    B, Tq, H, D, Nq, Nk, _ = _check(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, block_q, block_kv, stages)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    idx, cnt, lens = _sanitize(kv_block_idx, kv_block_cnt, kv_block_len, Nk, block_kv)
    q_rows = check_q_rows(q_rows, block_q, "sgm_forward_mgpu")
    if q_tail_fits(q_rows, block_q) and (Q_TAIL_T if q_tail_t is None else q_tail_t):
        return forward_tail(q, k, v, idx, cnt, lens, block_q=block_q, block_kv=block_kv, q_rows=q_rows, scale=scale,
                            stages=stages, plan=plan, interpret=interpret)
    if q_rows is not None and (Q_TAILS if q_tails is None else q_tails):
        return forward_packed(q, k, v, idx, cnt, lens, block_q=block_q, block_kv=block_kv, q_rows=q_rows,
                              scale=scale, stages=stages, plan=plan, interpret=interpret)
    return _forward_lists(q, k, v, idx, cnt, lens, block_q=block_q, block_kv=block_kv, scale=scale, stages=stages,
                          plan=plan, interpret=interpret)


def _forward_lists(q, k, v, idx, cnt, lens, *, block_q, block_kv, scale, stages, plan, interpret, union=None):
    """One forward launch over sanitised lists (or, with union = (groups, rows, bits), over `lists.union_lists`
    of packed tails), splits merged."""
    p = forward_plan(q.shape, block_q, block_kv, q.dtype, stages=stages, plan=dict(plan or ()))
    if union is None:
        rows, code, nsteps = _step_lists(idx, cnt, lens, block_kv, p)
        groups = None
    else:
        *groups, bits = union
        rows, valid, nsteps, box_bits = subtile_steps(idx, cnt, lens, block_kv=block_kv, sub=p.box, payload=bits)
        rows, code, nsteps = group_steps(rows, valid, nsteps, p.nbox, base=CODE_BASE, bits=box_bits,
                                         bits_base=GROUP_BASE)
    out, lse = forward_call(q, k, v, rows, code, nsteps, block_q=block_q, scale=scale, plan=p, interpret=interpret,
                            row_groups=None if groups is None else tuple(groups))
    return merge_splits(out, lse) if p.splits > 1 else (out, lse)


def packed_rows(q_rows):
    """(rows run as whole q tiles, tail rows packed, tails per packed tile) of query blocks with q_rows rows in use:
    the tail (q_rows mod 64) is packed when at least two fit in a tile (at most 3: the codes carry 3 group bits per
    box), else it gets a tile of its own."""
    full, tail = divmod(q_rows, TILE)
    if tail and TILE // tail < 2:
        return (full + 1) * TILE, 0, 0
    return full * TILE, tail, (min(TILE // tail, GROUP_BITS) if tail else 0)


def forward_packed(q, k, v, idx, cnt, lens, *, block_q, block_kv, q_rows, scale, stages=None, plan=None,
                   interpret=False):
    """The forward without the padding rows of partly used query blocks (sanitised lists; q_rows < block_q).

    DecMem's blocks hold 147 queries in 192 slots: 2 whole q tiles and a third with 19 rows in use, which costs a
    whole tile's tensor-core work. Here the whole tiles run as query blocks of 64·(q_rows // 64) rows (plan and
    `plan` overrides as usual), and the tails of `64 // tail` consecutive query blocks share ONE 64-row tile that
    walks the union of their lists once, each block's rows masked to its own selections (`lists.union_lists`,
    `mosaic_gpu_fwd.mask_row_groups`). The tails then cost the union of the lists instead of their sum: in the
    rollout benchmark's geometry 107 of 240 key blocks for three neighbouring blocks of a frame (their pooled
    queries select much the same memory). Rows past q_rows: out 0, LSE −inf."""
    B, Tq, H, D = q.shape
    nq = Tq // block_q
    main, tail, groups = packed_rows(q_rows)
    blocks = q.reshape(B, nq, block_q, H, D)
    outs, lses = [], []
    if main:
        q_main = blocks[:, :, :main].reshape(B, nq * main, H, D)
        o, l = _forward_lists(q_main, k, v, idx, cnt, lens, block_q=main, block_kv=block_kv, scale=scale,
                              stages=stages, plan=plan, interpret=interpret)
        outs.append(o.reshape(B, nq, main, H, D))
        lses.append(l.reshape(B, H, nq, main))
    if tail:
        ng = -(-nq // groups)
        q_tail = jnp.pad(blocks[:, :, main:main + tail], ((0, 0), (0, ng * groups - nq), (0, 0), (0, 0), (0, 0)))
        q_tail = jnp.pad(q_tail.reshape(B, ng, groups * tail, H, D),
                         ((0, 0), (0, 0), (0, TILE - groups * tail), (0, 0), (0, 0))).reshape(B, ng * TILE, H, D)
        uidx, ucnt, ubits = union_lists(idx, cnt, groups)
        o, l = _forward_lists(q_tail, k, v, uidx, ucnt, lens, block_q=TILE, block_kv=block_kv, scale=scale,
                              stages=stages, plan=None, interpret=interpret, union=(groups, tail, ubits))
        o = o.reshape(B, ng, TILE, H, D)[:, :, :groups * tail].reshape(B, ng * groups, tail, H, D)
        l = l.reshape(B, H, ng, TILE)[..., :groups * tail].reshape(B, H, ng * groups, tail)
        outs.append(o[:, :nq])
        lses.append(l[:, :, :nq])
    pad = block_q - main - tail
    if pad:
        outs.append(jnp.zeros((B, nq, pad, H, D), q.dtype))
        lses.append(jnp.full((B, H, nq, pad), -jnp.inf, jnp.float32))
    out = jnp.concatenate(outs, axis=2).reshape(B, Tq, H, D)
    return out, jnp.concatenate(lses, axis=3).reshape(B, H, Tq)


def forward_tail(q, k, v, idx, cnt, lens, *, block_q, block_kv, q_rows, scale, stages=None, plan=None,
                 interpret=False):
    """The forward with each query block's tail (rows 128 .. q_rows − 1) run transposed by the third consumer
    (`mosaic_gpu_fwd_tail`; sanitised lists, `q_tail_fits`). The kernel leaves the third q tile's rows of `out` and
    `lse` unwritten; here they become the transposed tails, then zeros and −inf past q_rows, before the splits'
    merge."""
    B, Tq, H, D = q.shape
    nq, main = Tq // block_q, block_q - TILE
    p = q_tail_plan(forward_plan(q.shape, block_q, block_kv, q.dtype, stages=stages, plan=dict(plan or ())), D,
                    jnp.dtype(q.dtype).itemsize)
    rows, code, nsteps = _step_lists(idx, cnt, lens, block_kv, p)
    last = TailConsumer(p, (B, H, nq, D), q.dtype, float(scale) * LOG2E, bool(interpret))
    out, lse, out_t, lse_t = forward_call(q, k, v, rows, code, nsteps, block_q=block_q, scale=scale, plan=p,
                                          interpret=interpret, final=last)
    lead = out.shape[:-4]
    n = len(lead)
    keep = jnp.arange(TAIL) < q_rows - main
    tail = jnp.transpose(out_t, (*range(n), n, n + 2, n + 4, n + 1, n + 3))  # [.., B, Nq, 32, H, D]
    tail = jnp.where(keep[:, None, None], tail, jnp.zeros((), q.dtype))
    pad = block_q - main - TAIL
    out = jnp.concatenate([out.reshape(*lead, B, nq, block_q, H, D)[..., :main, :, :], tail,
                           jnp.zeros((*lead, B, nq, pad, H, D), q.dtype)], axis=-3).reshape(out.shape)
    lse = jnp.concatenate([lse.reshape(*lead, B, H, nq, block_q)[..., :main], jnp.where(keep, lse_t, -jnp.inf),
                           jnp.full((*lead, B, H, nq, pad), -jnp.inf, jnp.float32)], axis=-1).reshape(lse.shape)
    return merge_splits(out, lse) if p.splits > 1 else (out, lse)


# The public entry point is jitted; sgm_attention calls `_forward` as is (`_api_fwd`): inside the model's jit a
# nested one adds nothing, and the traced program then holds the kernel call directly next to the names api.py gives
# its outputs for remat policies (with or without the nested jit, the policy kept them in a traced test; the H200
# measurement of remat="save_sgm" in docs/benchmarks.md ran this way).
sgm_forward_mgpu = jax.jit(_forward, static_argnames=("block_q", "block_kv", "scale", "stages", "plan", "interpret",
                                                     "q_rows", "q_tails", "q_tail_t"))


def sgm_backward_mgpu(q, k, v, out, lse, d_out, kv_block_idx, kv_block_cnt, kv_block_len, *, block_q, block_kv,
                      scale=None, stages=None, dq_plan_overrides=None, interpret=False, q_rows=None, q_boxes=None,
                      k_tails=None, dkv_share=None, dkv_overlap=None):
    """Gradients (dq, dk, dv) of sgm_forward_mgpu's output (lse is the forward's residual, natural log). `stages`
    sets both kernels' ring depth, `dq_plan_overrides` ((field, value) pairs) the dq kernel's plan (tuning).
    q_rows (static): only the first q_rows rows of every query block are queries; the cotangent of the rows past
    them is taken as zero (their dq is 0, they add nothing to dk, dv), which lets dk/dv skip them: `q_boxes` (default
    Q_BOXES) streams only those rows, in packed 32-row boxes. `k_tails` (default K_TAILS): key blocks whose last
    tile holds <= 32 valid keys get that tail's dk, dv from the transposed tail kernel. `dkv_share` (default
    DKV_SHARE): a dk/dv CTA whose two tiles share a key block streams its query side once. "auto" (the defaults of
    the last two): on when the reverse lists are long (`_long_lists`). `dkv_overlap` (default DKV_OVERLAP): the dk/dv
    consumers overlap their arithmetic with their own wgmmas (`mosaic_gpu_bwd.overlapped_dkv`).

    The defaults are read here, outside the jit, so that changing Q_BOXES / K_TAILS / DKV_SHARE / DKV_OVERLAP at run
    time (train_step's --sgm-dkv) changes the static arguments and retraces instead of reusing a cached trace."""
    long_lists = _long_lists(kv_block_idx, k.shape[1] // block_kv)
    return _backward(q, k, v, out, lse, d_out, kv_block_idx, kv_block_cnt, kv_block_len, block_q=block_q,
                     block_kv=block_kv, scale=scale, stages=stages, dq_plan_overrides=dq_plan_overrides,
                     interpret=interpret, q_rows=q_rows, q_boxes=_resolve(q_boxes, Q_BOXES, long_lists),
                     k_tails=_resolve(k_tails, K_TAILS, long_lists),
                     dkv_share=_resolve(dkv_share, DKV_SHARE, long_lists),
                     dkv_overlap=_resolve(dkv_overlap, DKV_OVERLAP, long_lists))


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "scale", "stages", "dq_plan_overrides",
                                             "interpret", "q_rows", "q_boxes", "k_tails", "dkv_share",
                                             "dkv_overlap"))
def _backward(q, k, v, out, lse, d_out, kv_block_idx, kv_block_cnt, kv_block_len, *, block_q, block_kv, scale,
              stages, dq_plan_overrides, interpret, q_rows, q_boxes, k_tails, dkv_share, dkv_overlap):
    dq_stages = stages  # None: the dq plan sizes its own ring
    B, Tq, H, D, Nq, Nk, stages = _check(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, block_q, block_kv,
                                         stages)
    q_rows = check_q_rows(q_rows, block_q, "mosaic_gpu SGM")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    idx, cnt, lens = _sanitize(kv_block_idx, kv_block_cnt, kv_block_len, Nk, block_kv)
    d_out = d_out.astype(q.dtype)
    if q_rows is not None:
        d_out = mask_padding_rows(d_out, block_q, q_rows)
    f32 = jnp.float32
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(f32), d_out.astype(f32))
    lse = lse.astype(f32)
    lse2 = jnp.where(jnp.isneginf(lse), 0.0, lse * LOG2E)  # base 2 for exp2 in the kernels; −inf rows run no step
    statics = dict(block_q=block_q, scale=scale, stages=stages, interpret=interpret)

    pq = dq_plan(q.shape, block_q, block_kv, q.dtype, stages=dq_stages, plan=dict(dq_plan_overrides or ()))
    rows, code, nsteps = _step_lists(idx, cnt, lens, block_kv, pq)
    dq = dq_call(q, k, v, d_out, lse2, delta, rows, code, nsteps, block_q=block_q, scale=scale, plan=pq,
                 interpret=interpret)
    if pq.splits > 1:
        dq = jnp.sum(dq.astype(f32), axis=0).astype(q.dtype)

    rev, rev_cnt = reverse_block_lists(idx.reshape(B * H, Nq, -1), cnt.reshape(B * H, Nq), Nk)
    rev, rev_cnt = rev.reshape(B, H, Nk, Nq), rev_cnt.reshape(B, H, Nk)
    dkv_rows = q_rows if q_boxes else None
    nks, nqb = block_kv // TILE, query_boxes(block_q, dkv_rows)[1]
    kvalid = jnp.clip(lens[:, :, None] - jnp.arange(nks, dtype=jnp.int32) * TILE, 0, TILE).reshape(B, Nk * nks)
    kboxes = jnp.where(kvalid[:, None, :] > 0, jnp.repeat(rev_cnt, nks, axis=-1) * nqb, 0).astype(jnp.int32)
    if not k_tails:
        dk, dv = dkv_call(q, k, v, d_out, lse2, delta, rev, kvalid, kboxes, block_kv=block_kv, q_rows=dkv_rows,
                          share_pairs=dkv_share, overlap=dkv_overlap, **statics)
        return dq, dk, dv
    start, valid, take = tail_plan(lens)  # [B, Nk]
    mine = (jnp.arange(nks) == (start // TILE)[..., None]) & take[..., None]  # [B, Nk, nks]: the tiles taken
    kboxes = jnp.where(mine.reshape(B, 1, Nk * nks), 0, kboxes)  # the dk/dv kernel writes zeros there
    dk, dv = dkv_call(q, k, v, d_out, lse2, delta, rev, kvalid, kboxes, block_kv=block_kv, q_rows=dkv_rows,
                      tile_map=dkv_tile_map(mine.reshape(B, Nk * nks)), share_pairs=dkv_share,
                      overlap=dkv_overlap, **statics)
    tail_row = (jnp.arange(Nk, dtype=jnp.int32) * block_kv + start).astype(jnp.int32)
    tboxes = jnp.where(take[:, None, :], rev_cnt * nqb, 0).astype(jnp.int32)
    dkt, dvt = dkv_tail_call(q, k, v, d_out, lse2, delta, rev, tail_row, jnp.where(take, valid, 0).astype(jnp.int32),
                             tboxes, q_rows=dkv_rows, **statics)
    # the tails' 32 rows of every block taken (rows of other blocks are dropped: index Tk is out of range)
    rows = jnp.where(take[..., None], tail_row[..., None] + jnp.arange(TAIL, dtype=jnp.int32), k.shape[1])
    bi = jnp.arange(B)[:, None, None]
    put = lambda x, t: x.at[bi, rows].set(t.transpose(0, 2, 4, 1, 3), mode="drop")  # [B, Nk, 32, H, D]
    return dq, put(dk, dkt), put(dv, dvt)


def dkv_tile_map(taken):
    """The order in which the dk/dv kernel's CTAs take key tiles (`dkv_call`'s tile_map), from taken `[B, tiles]`
    (tiles the tail kernel computes): the others first, in order, so that a CTA's two consumers both work (the two
    full tiles of a 192-slot DecMem block share a CTA), then the taken ones, whose CTAs only write zeros."""
    return jnp.argsort(taken, axis=-1, stable=True).astype(jnp.int32)


# ------------------------------------------------------------------------------------- sgm_attention registration


def _api_fwd(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, *, block_q, block_kv, scale, q_rows=None,
             interpret=False, q_tails=None):
    return _forward(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, block_q=block_q, block_kv=block_kv,
                    scale=scale, interpret=interpret, q_rows=q_rows, q_tails=q_tails)


def _api_bwd(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, out, lse, dout, *, block_q, block_kv, scale,
             q_rows=None, interpret=False, q_boxes=None, k_tails=None, dkv_share=None, dkv_overlap=None):
    return sgm_backward_mgpu(q, k, v, out, lse, dout, kv_block_idx, kv_block_cnt, kv_block_len, block_q=block_q,
                             block_kv=block_kv, scale=scale, interpret=interpret, q_rows=q_rows, q_boxes=q_boxes,
                             k_tails=k_tails, dkv_share=dkv_share, dkv_overlap=dkv_overlap)


# Plugs into `sgm_attention(..., backend="mosaic_gpu")` (api.py imports this module lazily, so no import cycle).
register_backend("mosaic_gpu", _api_fwd, _api_bwd, tile=(TILE, TILE), head_dims=SUPPORTED_HEAD_DIMS,
                 dtypes=SUPPORTED_DTYPES, platforms=("gpu",), fwd_q_rows=True)
