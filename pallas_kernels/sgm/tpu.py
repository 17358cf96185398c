"""Sparse Global Memory (SGM) block-sparse attention as Pallas Mosaic-TPU kernels (forward, dq, dk/dv).

Contract (shared with the other SGM backends): q `[B, Tq, H, D]` with Tq = Nq·block_q, k/v `[B, Tk, H, D]` with
Tk = Nk·block_kv, both block-major and padded; `kv_block_idx` int32 `[B, H, Nq, K]` strictly ascending selected key
block ids per query block (entries at positions >= count are ignored), `kv_block_cnt` int32 `[B, H, Nq]` in 0..K,
`kv_block_len` int32 `[B, Nk]` valid tokens per key block (valid tokens first). Each query token takes a softmax
(logits = scale·q·k, scale defaults to 1/sqrt(D)) over the valid tokens of its block's selected key blocks. A query
block with count 0 (or whose selected blocks hold no valid token) gets output 0 and LSE −inf. LSE is natural-log,
`[B, H, Tq]`. Padded query rows are computed like any other row (finite).

Design:
* Wrapper transposes to `[B·H, T, D]`; one grid step = one query block × one key block.
* Scalar prefetch (SMEM, flattened 1-D int32): the selected-block list, the counts and the key-block lengths. The list
  is sanitised in XLA first: positions >= count repeat the last valid id (0 for count 0), so padded steps ask for the
  block already resident in VMEM (no new DMA on hardware) and no index −1 is ever read; `pl.when(j < count)` skips
  their compute.
* Forward grid (B·H "parallel", Nq "parallel", K "arbitrary"): the selected-block axis is innermost, so the output
  block is revisited on consecutive steps. fp32 running max / sum / accumulator live in VMEM scratch, initialised at
  j == 0 and finalised at j == K−1. Key tokens >= kv_block_len[b, idx] are masked only when that block is partial.
* Backward: delta = rowsum(dO·O) in XLA. dq kernel: same grid as the forward. dk/dv kernel: grid (B·H, Nq·K) over
  the selected (key block, query block) pairs, sorted by key block then query block in XLA (`pair_lists`:
  deterministic, query blocks ascending per key block), so the grid does exactly the forward's work instead of
  Nk·Nq steps; a pair's code carries "first/last pair of its key block" flags (init / finalise the dK, dV
  accumulators) and padding pairs repeat the last valid pair (no new DMA). Key blocks nobody selected are zeroed in
  XLA. Logits are recomputed exactly as in the forward (raw operands into the matmul, fp32 accumulate, fp32 scale
  after) from the saved natural-log LSE; nothing is pre-scaled in bf16.
* SMEM budget: the scalar-prefetched lists of one call must fit half of the 1 MiB SMEM of TPU v4–v6e
  (`SMEM_BUDGET`). Every list is per (b, h), so B·H is split into the fewest equal chunks that fit, run by
  `lax.map` (one compiled kernel); a single (b, h) too large for the budget is refused with the sizes.

Registered as backend "tpu" of `pallas_kernels.sgm.api.sgm_attention` (tile (8, 128), f32/bf16, TPU platform only).

Tile rule: block_q % 8 == 0 always; on a real TPU (interpret falsy) also block_kv % 128 == 0 (lane width; 256 is
better on v6e/v7). Under interpret mode block_kv only needs to be a multiple of 8. D is always the full last dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sgm.api import register_backend
from pallas_kernels.sgm.reference import mask_padding_rows
from pallas_kernels.sgm.lists import PAIR_FIRST, PAIR_FLAGS, PAIR_LAST, PAIR_VALID, pair_lists

__all__ = ["sgm_forward_tpu", "sgm_backward_tpu", "SMEM_BUDGET"]

_NT = (((1,), (1,)), ((), ()))  # contract last dims: a @ b.T
_TN = (((0,), (0,)), ((), ()))  # contract first dims: a.T @ b


# ----------------------------------------------------------------------------------------------- helpers (XLA side)


def _check(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, block_q, block_kv, interpret):
    B, Tq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, D):
        raise ValueError(f"k/v shape {k.shape}/{v.shape} does not match q {q.shape}")
    Tk = k.shape[1]
    if block_q % 8 or block_kv % 8:
        raise ValueError(f"block_q ({block_q}) and block_kv ({block_kv}) must be multiples of 8 (sublanes)")
    if not interpret and block_kv % 128:
        raise ValueError(f"block_kv ({block_kv}) must be a multiple of 128 (lanes) on a real TPU")
    if Tq % block_q or Tk % block_kv:
        raise ValueError(f"Tq={Tq} / Tk={Tk} are not multiples of block_q={block_q} / block_kv={block_kv}")
    Nq, Nk = Tq // block_q, Tk // block_kv
    if kv_block_idx.ndim != 4 or kv_block_idx.shape[:3] != (B, H, Nq):
        raise ValueError(f"kv_block_idx {kv_block_idx.shape} must be [B, H, Nq, K] = [{B}, {H}, {Nq}, K]")
    if kv_block_cnt.shape != (B, H, Nq):
        raise ValueError(f"kv_block_cnt {kv_block_cnt.shape} must be [B, H, Nq] = [{B}, {H}, {Nq}]")
    if kv_block_len.shape != (B, Nk):
        raise ValueError(f"kv_block_len {kv_block_len.shape} must be [B, Nk] = [{B}, {Nk}]")
    return B, H, D, Nq, Nk, kv_block_idx.shape[3]


def _pad_repeat_last(lists, counts, upper):
    """Entries at positions >= count repeat the last valid entry (0 when count is 0); clipped to [0, upper)."""
    n = lists.shape[-1]
    pos = jnp.minimum(jnp.arange(n, dtype=jnp.int32), jnp.maximum(counts[..., None] - 1, 0))
    out = jnp.take_along_axis(lists.astype(jnp.int32), pos, axis=-1)
    out = jnp.where(counts[..., None] > 0, out, 0)
    return jnp.clip(out, 0, upper - 1)


def _sanitize(kv_block_idx, kv_block_cnt, kv_block_len, nk, block_kv):
    topk = kv_block_idx.shape[-1]
    cnt = jnp.clip(kv_block_cnt.astype(jnp.int32), 0, topk)
    idx = _pad_repeat_last(kv_block_idx, cnt, nk)
    ln = jnp.clip(kv_block_len.astype(jnp.int32), 0, block_kv)
    return idx, cnt, ln


def _to_bhtd(x):
    B, T, H, D = x.shape
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(B * H, T, D)


def _from_bhtd(x, B, H):
    BH, T, D = x.shape
    return jnp.transpose(x.reshape(B, H, T, D), (0, 2, 1, 3))


SMEM_BUDGET = 512 * 1024  # bytes of scalar-prefetched lists per call: half of the 1 MiB SMEM (v4–v6e)


def _rows_per_call(bh, per_row_entries, what):
    """Largest divisor of bh whose int32 lists (per_row_entries per (b, h) row) fit SMEM_BUDGET."""
    cap = SMEM_BUDGET // (4 * per_row_entries)
    if cap < 1:
        raise ValueError(f"SGM tpu {what}: the index lists of one (batch, head) take {4 * per_row_entries} B of "
                         f"SMEM, more than the {SMEM_BUDGET} B budget; use fewer query/key blocks per call or a "
                         "smaller top-k")
    return max(d for d in range(1, min(bh, cap) + 1) if bh % d == 0)


def _chunked(call, rows, *arrays):
    """call(*arrays) on chunks of `rows` rows of the leading B·H axis (lax.map: one kernel for all chunks)."""
    bh = arrays[0].shape[0]
    if rows == bh:
        return call(*arrays)
    split = lambda x: x.reshape(bh // rows, rows, *x.shape[1:])
    outs = lax.map(lambda xs: call(*xs), tuple(split(x) for x in arrays))
    return jax.tree.map(lambda y: y.reshape(bh, *y.shape[2:]), outs)


def _logits(q, k, scale, kv_len, masked):
    """fp32 logits of one tile exactly as every kernel computes them: raw operands, fp32 accumulate, fp32 scale."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    if masked:
        col = lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(col < kv_len, s, -jnp.inf)
    return s


def _probs(s, lse):
    """p = exp(s − lse); rows with lse = −inf (no valid key at all) have s = −inf everywhere, so p = 0 there."""
    return jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse))


def _split_masked(kv_len, block_kv, active, body):
    """Run body(masked) only on active steps; the masked variant only when the key block is partial."""
    full = kv_len >= block_kv
    pl.when(jnp.logical_and(active, full))(lambda: body(False))
    pl.when(jnp.logical_and(active, jnp.logical_not(full)))(lambda: body(True))


def _params(interpret, semantics=("parallel", "parallel", "arbitrary")):
    return dict(interpret=interpret, compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


# ----------------------------------------------------------------------------------------------------- forward


def _fwd_kernel(idx_ref, cnt_ref, len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                *, scale, nq, nk, topk, block_kv):
    bh, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cnt = cnt_ref[bh * nq + i]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    kb = idx_ref[(bh * nq + i) * topk + j]
    kv_len = len_ref[bh * nk + kb]

    def body(masked):
        s = _logits(q_ref[...], k_ref[...], scale, kv_len, masked)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all-masked so far: keep p = 0, alpha = 0, no NaN
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    _split_masked(kv_len, block_kv, j < cnt, body)

    @pl.when(j == topk - 1)
    def _finalize():
        l = l_sc[...]
        has = l > 0.0  # l >= 1 whenever any valid key was seen
        inv = jnp.where(has, 1.0 / jnp.where(has, l, 1.0), 0.0)
        o_ref[...] = (acc_sc[...] * inv).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has, m_sc[...] + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)


def sgm_forward_tpu(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, *, block_q, block_kv, scale=None,
                    interpret=False):
    """Block-sparse SGM attention forward. Returns (out `[B, Tq, H, D]` in q.dtype, lse `[B, H, Tq]` fp32)."""
    B, H, D, Nq, Nk, K = _check(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, block_q, block_kv, interpret)
    scale = float(1.0 / math.sqrt(D) if scale is None else scale)
    idx, cnt, ln = _row_lists(kv_block_idx, kv_block_cnt, kv_block_len, H, Nk, block_kv)
    BH, Tq = B * H, q.shape[1]
    kernel = functools.partial(_fwd_kernel, scale=scale, nq=Nq, nk=Nk, topk=K, block_kv=block_kv)

    def call(idx, cnt, ln, qt, kt, vt):  # one chunk of `rows` (b, h) rows
        rows = qt.shape[0]
        q_map = lambda b, i, j, idx_r, cnt_r, len_r: (b, i, 0)
        kv_map = lambda b, i, j, idx_r, cnt_r, len_r: (b, idx_r[(b * Nq + i) * K + j], 0)
        return pl.pallas_call(
            kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3,
                grid=(rows, Nq, K),
                in_specs=[
                    pl.BlockSpec((None, block_q, D), q_map),
                    pl.BlockSpec((None, block_kv, D), kv_map),
                    pl.BlockSpec((None, block_kv, D), kv_map),
                ],
                out_specs=[
                    pl.BlockSpec((None, block_q, D), q_map),
                    pl.BlockSpec((None, block_q, 1), q_map),
                ],
                scratch_shapes=[
                    pltpu.VMEM((block_q, 1), jnp.float32),  # running max
                    pltpu.VMEM((block_q, 1), jnp.float32),  # running sum
                    pltpu.VMEM((block_q, D), jnp.float32),  # accumulator
                ],
            ),
            out_shape=[
                jax.ShapeDtypeStruct((rows, Tq, D), q.dtype),
                jax.ShapeDtypeStruct((rows, Tq, 1), jnp.float32),
            ],
            name="sgm_fwd_tpu",
            **_params(interpret),
        )(idx.reshape(-1), cnt.reshape(-1), ln.reshape(-1), qt, kt, vt)

    rows = _rows_per_call(BH, Nq * K + Nq + Nk, "forward")
    out, lse = _chunked(call, rows, idx, cnt, ln, _to_bhtd(q), _to_bhtd(k), _to_bhtd(v))
    return _from_bhtd(out, B, H), lse.reshape(B, H, Tq)


def _row_lists(kv_block_idx, kv_block_cnt, kv_block_len, heads, nk, block_kv):
    """Sanitised lists with one row per (b, h): idx `[BH, Nq, K]`, cnt `[BH, Nq]`, key-block lengths `[BH, Nk]`
    (each batch's lengths repeated per head), so a chunk of rows carries everything its kernel reads."""
    idx, cnt, ln = _sanitize(kv_block_idx, kv_block_cnt, kv_block_len, nk, block_kv)
    B, H, Nq, K = idx.shape
    return idx.reshape(B * H, Nq, K), cnt.reshape(B * H, Nq), jnp.repeat(ln, heads, axis=0)


# ---------------------------------------------------------------------------------------------------- backward


def _dq_kernel(idx_ref, cnt_ref, len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc,
               *, scale, nq, nk, topk, block_kv):
    bh, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cnt = cnt_ref[bh * nq + i]

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    kb = idx_ref[(bh * nq + i) * topk + j]
    kv_len = len_ref[bh * nk + kb]

    def body(masked):
        k = k_ref[...]
        s = _logits(q_ref[...], k, scale, kv_len, masked)
        p = _probs(s, lse_ref[...])
        dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale

    _split_masked(kv_len, block_kv, j < cnt, body)

    @pl.when(j == topk - 1)
    def _finalize():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(pair_ref, len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc,
                *, scale, nq, nk, npairs, block_kv):
    bh, p = pl.program_id(0), pl.program_id(1)
    code = pair_ref[bh * npairs + p]
    kb = code // (PAIR_FLAGS * nq)
    flag = lambda f: lax.rem(lax.div(code, f), 2) == 1

    @pl.when(flag(PAIR_FIRST))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    kv_len = len_ref[bh * nk + kb]

    def body(masked):
        q, do = q_ref[...], do_ref[...]
        s = _logits(q, k_ref[...], scale, kv_len, masked)
        p = _probs(s, lse_ref[...])
        dv_sc[...] += lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dk_sc[...] += lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32) * scale

    _split_masked(kv_len, block_kv, flag(PAIR_VALID), body)

    @pl.when(flag(PAIR_LAST))
    def _finalize():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def sgm_backward_tpu(q, k, v, out, lse, d_out, kv_block_idx, kv_block_cnt, kv_block_len, *, block_q, block_kv,
                     scale=None, interpret=False):
    """Gradients of sgm_forward_tpu's output w.r.t. q, k, v (lse is treated as a saved residual, not an output).

    out / lse are the forward's results; d_out the output cotangent. Returns (dq, dk, dv) in the input dtypes."""
    B, H, D, Nq, Nk, K = _check(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, block_q, block_kv, interpret)
    scale = float(1.0 / math.sqrt(D) if scale is None else scale)
    idx, cnt, ln = _row_lists(kv_block_idx, kv_block_cnt, kv_block_len, H, Nk, block_kv)
    BH, Tq, Tk = B * H, q.shape[1], k.shape[1]
    qt, kt, vt, dot_ = _to_bhtd(q), _to_bhtd(k), _to_bhtd(v), _to_bhtd(d_out)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, Tq, H]
    delta = jnp.transpose(delta, (0, 2, 1)).reshape(BH, Tq, 1)
    lse_t = lse.astype(jnp.float32).reshape(BH, Tq, 1)
    statics = dict(scale=scale, nq=Nq, nk=Nk, block_kv=block_kv)

    def dq_call(idx, cnt, ln, qt, kt, vt, dot_, lse_t, delta):  # same grid and index maps as the forward
        rows = qt.shape[0]
        q_map = lambda b, i, j, idx_r, cnt_r, len_r: (b, i, 0)
        kv_map = lambda b, i, j, idx_r, cnt_r, len_r: (b, idx_r[(b * Nq + i) * K + j], 0)
        q_spec = pl.BlockSpec((None, block_q, D), q_map)
        row_spec = pl.BlockSpec((None, block_q, 1), q_map)
        return pl.pallas_call(
            functools.partial(_dq_kernel, topk=K, **statics),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3,
                grid=(rows, Nq, K),
                in_specs=[q_spec, pl.BlockSpec((None, block_kv, D), kv_map),
                          pl.BlockSpec((None, block_kv, D), kv_map), q_spec, row_spec, row_spec],
                out_specs=q_spec,
                scratch_shapes=[pltpu.VMEM((block_q, D), jnp.float32)],
            ),
            out_shape=jax.ShapeDtypeStruct((rows, Tq, D), q.dtype),
            name="sgm_dq_tpu",
            **_params(interpret),
        )(idx.reshape(-1), cnt.reshape(-1), ln.reshape(-1), qt, kt, vt, dot_, lse_t, delta)

    rows = _rows_per_call(BH, Nq * K + Nq + Nk, "dq")
    dq = _chunked(dq_call, rows, idx, cnt, ln, qt, kt, vt, dot_, lse_t, delta)

    # dk/dv: grid over the selected (key block, query block) pairs, sorted by key block.
    pairs, pair_cnt = pair_lists(idx, cnt, Nk)
    npairs = Nq * K

    def dkv_call(pairs, ln, qt, kt, vt, dot_, lse_t, delta):
        rows = qt.shape[0]
        at = lambda b, p, pair_r: pair_r[b * npairs + p] // PAIR_FLAGS  # kb·Nq + qb
        rq_map = lambda b, p, pair_r, len_r: (b, lax.rem(at(b, p, pair_r), Nq), 0)
        k_map = lambda b, p, pair_r, len_r: (b, lax.div(at(b, p, pair_r), Nq), 0)
        rq_spec = pl.BlockSpec((None, block_q, D), rq_map)
        rrow_spec = pl.BlockSpec((None, block_q, 1), rq_map)
        k_spec = pl.BlockSpec((None, block_kv, D), k_map)
        return pl.pallas_call(
            functools.partial(_dkv_kernel, npairs=npairs, **statics),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(rows, npairs),
                in_specs=[rq_spec, k_spec, k_spec, rq_spec, rrow_spec, rrow_spec],
                out_specs=[k_spec, k_spec],
                scratch_shapes=[pltpu.VMEM((block_kv, D), jnp.float32), pltpu.VMEM((block_kv, D), jnp.float32)],
            ),
            out_shape=[jax.ShapeDtypeStruct((rows, Tk, D), k.dtype), jax.ShapeDtypeStruct((rows, Tk, D), v.dtype)],
            name="sgm_dkv_tpu",
            **_params(interpret, ("parallel", "arbitrary")),
        )(pairs.reshape(-1), ln.reshape(-1), qt, kt, vt, dot_, lse_t, delta)

    rows = _rows_per_call(BH, npairs + Nk, "dk/dv")
    dk, dv = _chunked(dkv_call, rows, pairs, ln, qt, kt, vt, dot_, lse_t, delta)
    # key blocks no query block selected were never visited (or only by padding pairs): their gradient is 0
    keep = jnp.repeat(pair_cnt > 0, block_kv, axis=1)[..., None]
    dk, dv = jnp.where(keep, dk, 0).astype(k.dtype), jnp.where(keep, dv, 0).astype(v.dtype)
    return _from_bhtd(dq, B, H), _from_bhtd(dk, B, H), _from_bhtd(dv, B, H)


# ------------------------------------------------------------------------------------- sgm_attention registration


def _api_fwd(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, *, block_q, block_kv, scale, interpret=False):
    return sgm_forward_tpu(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, block_q=block_q, block_kv=block_kv,
                           scale=scale, interpret=interpret)


def _api_bwd(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, out, lse, dout, *, block_q, block_kv, scale,
             q_rows=None, interpret=False):
    dout = mask_padding_rows(dout, block_q, q_rows)  # the padded rows' cotangent is zero; the kernel walks them all
    return sgm_backward_tpu(q, k, v, out, lse, dout, kv_block_idx, kv_block_cnt, kv_block_len, block_q=block_q,
                            block_kv=block_kv, scale=scale, interpret=interpret)


# Plugs into `sgm_attention(..., backend="tpu")` (api.py imports this module lazily, so no import cycle).
register_backend("tpu", _api_fwd, _api_bwd, tile=(8, 128), dtypes=(jnp.float32, jnp.bfloat16),
                 platforms=("tpu",))
