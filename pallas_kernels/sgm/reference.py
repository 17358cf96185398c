"""Pure-XLA oracles for Sparse Global Memory (SGM) block-sparse attention.

Layout (the `sgm_attention` contract): q [B, Tq, H, D] and k, v [B, Tk, H, D] are block-major padded
(Tq = Nq·block_q, Tk = Nk·block_kv); query block n attends to the valid tokens of key blocks
kv_block_idx[b, h, n, :kv_block_cnt[b, h, n]] (ascending); key block m holds kv_block_len[b, m] valid tokens first.

- `sgm_reference`: gathers the selected key blocks per query block and runs a masked fp32 softmax. Returns the output
  and the natural-log LSE. Memory: the gathered K and V are [B, H, Nq, K·block_kv, D] each in fp32 (Nq·K/Nk times the
  size of k, per tensor) and the logits [B, H, Nq, block_q, K·block_kv] fp32 -- fine at test sizes, not at DecMem
  training sizes (use a kernel there).
- `sgm_reference_bwd`: the explicit backward (dq, dk, dv) from probabilities recomputed with the saved LSE; the
  formula the kernels mirror.
- `dense_masked_reference`: expands the lists to a token mask [B, H, Tq, Tk] and runs a dense masked softmax in fp32;
  independent ground truth for small sizes (O(Tq·Tk) memory).

Padded query rows (`q_rows`, optional and static, every backward takes it): only the first q_rows rows of every
query block are queries. Their forward is unchanged; the backward takes the cotangent of the rows past q_rows as
zero (`mask_padding_rows`), so those rows get dq = 0 and add nothing to dk, dv, and a kernel may skip them.

LSE convention: natural log of sum_j exp(scale · q·k_j) over the valid selected keys, fp32 [B, H, Tq]; −inf for a
query row with no valid key (count 0, or only empty key blocks), whose output is exactly 0. A kernel storing a base-2
LSE converts with lse_2 = lse · log2(e).

Numerics: operands are cast to fp32 (exact for bf16/f16) and the scale is applied to the fp32 logits, never to q or k.
Indices are clamped to [0, Nk) before gathering; entries at positions ≥ count are masked out whatever they hold.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def check_q_rows(q_rows, block_q, where="sgm_attention"):
    """q_rows as a Python int in [1, block_q], or None (also for q_rows == block_q: nothing is padding)."""
    if q_rows is None:
        return None
    if not isinstance(q_rows, int) or isinstance(q_rows, bool) or not 1 <= q_rows <= block_q:
        raise ValueError(f"{where}: q_rows must be a static int in [1, block_q = {block_q}] (the query rows in use "
                         f"at the front of every query block), got {q_rows!r}")
    return None if q_rows == block_q else q_rows


def mask_padding_rows(x, block_q, q_rows):
    """x [B, Tq, ...] with the rows past q_rows of every query block set to zero (q_rows None: x unchanged)."""
    if q_rows is None:
        return x
    keep = (jnp.arange(x.shape[1]) % block_q) < q_rows
    return jnp.where(keep.reshape((1, -1) + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))


def _blocks(x, block):
    """[B, T, H, D] -> [B, H, N, block, D] (fp32)."""
    b, t, h, d = x.shape
    return x.astype(jnp.float32).reshape(b, t // block, block, h, d).transpose(0, 3, 1, 2, 4)


def _unblocks(x):
    """[B, H, N, block, D] -> [B, N·block, H, D]."""
    b, h, n, blk, d = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(b, n * blk, h, d)


def _gather_setup(k, kv_block_idx, kv_block_cnt, kv_block_len, block_kv):
    """Clamped indices [B, H, Nq·K] and the token validity mask [B, H, Nq, K·block_kv] of the gathered keys."""
    b, h, nq, kk = kv_block_idx.shape
    nk = k.shape[1] // block_kv
    idx = jnp.clip(kv_block_idx.astype(jnp.int32), 0, nk - 1)
    cnt = kv_block_cnt.astype(jnp.int32)
    lens = jnp.take_along_axis(kv_block_len.astype(jnp.int32)[:, None, :], idx.reshape(b, h, nq * kk), axis=2)
    lens = lens.reshape(b, h, nq, kk)  # valid tokens of each selected block
    listed = jnp.arange(kk) < cnt[..., None]  # [B, H, Nq, K]
    valid = listed[..., None] & (jnp.arange(block_kv) < lens[..., None])  # [B, H, Nq, K, bkv]
    return idx.reshape(b, h, nq * kk), valid.reshape(b, h, nq, kk * block_kv)


def _gather(x, idx, nq, block):
    """The key blocks of x [B, T, H, D] listed in idx [B, H, Nq·K] -> fp32 [B, H, Nq, K·bkv, D].

    Gathers from x's own layout (a free reshape, no transpose) and converts only what was gathered: a KV cache of
    any length is never copied whole (a long rollout's peak memory would otherwise grow twice as fast as its cache)."""
    b, t, h, d = x.shape
    xb = x.reshape(b, t // block, block, h, d)
    # vmap over batch and head makes them batching dimensions of ONE gather (rather than indexed dimensions, as
    # advanced indexing with arange(h) would): XLA's SPMD partitioner then splits a head-sharded cache (a sharded
    # rollout, decmem_jax/parallel/rollout.py) locally instead of all-gathering it.
    per_head = jax.vmap(lambda xh, ih: xh[ih], in_axes=(2, 0))  # [N, bkv, H, D], [H, Nq·K] -> [H, Nq·K, bkv, D]
    g = jax.vmap(per_head)(xb, idx)  # [B, H, Nq·K, bkv, D]
    return g.astype(jnp.float32).reshape(b, h, nq, -1, d)


def _masked_softmax(s, valid):
    """Rows of fp32 logits s with boolean mask -> (probabilities, lse); fully masked rows give zeros and −inf.

    Masked logits are replaced by −inf *before* the exp so no inf·0 reaches the gradient."""
    s = jnp.where(valid, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    return p / jnp.where(l > 0, l, 1.0), lse


def _scale(scale, d):
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def sgm_reference(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, *, block_q, block_kv, scale=None):
    """Block-sparse attention by gathering the selected key blocks. Returns (out [B, Tq, H, D] in q.dtype,
    lse [B, H, Tq] fp32 natural log, −inf where no key is valid)."""
    b, tq, h, d = q.shape
    nq = tq // block_q
    scale = _scale(scale, d)
    idx, valid = _gather_setup(k, kv_block_idx, kv_block_cnt, kv_block_len, block_kv)
    kg = _gather(k, idx, nq, block_kv)
    vg = _gather(v, idx, nq, block_kv)
    qb = _blocks(q, block_q)  # [B, H, Nq, bq, D]
    s = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, kg, precision=_HI) * scale
    p, lse = _masked_softmax(s, valid[:, :, :, None, :])
    out = jnp.einsum("bhnqk,bhnkd->bhnqd", p, vg, precision=_HI)
    return _unblocks(out).astype(q.dtype), lse.reshape(b, h, tq)


def sgm_reference_bwd(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, out, lse, dout, *, block_q, block_kv,
                      scale=None, q_rows=None):
    """Explicit backward of `sgm_reference` (the formula kernels mirror), all in fp32:

        P  = exp(scale·q·kᵀ − lse) on valid keys, 0 elsewhere (lse = −inf rows: P = 0)
        Δ  = rowsum(dO ∘ O)                      (O is the saved output)
        dP = dO·Vᵀ;   dS = P ∘ (dP − Δ)
        dQ = scale · dS·K;   dK = scale · dSᵀ·Q;   dV = Pᵀ·dO

    dK and dV are computed per gathered block and scatter-added back to their key blocks. Returns (dq, dk, dv) in
    the dtypes of q, k, v. q_rows: see the module docstring (the cotangent past them is taken as zero)."""
    dout = mask_padding_rows(dout, block_q, check_q_rows(q_rows, block_q, "sgm_reference_bwd"))
    b, tq, h, d = q.shape
    nq, nk = tq // block_q, k.shape[1] // block_kv
    scale = _scale(scale, d)
    idx, valid = _gather_setup(k, kv_block_idx, kv_block_cnt, kv_block_len, block_kv)
    kg = _gather(k, idx, nq, block_kv)
    vg = _gather(v, idx, nq, block_kv)
    qb, ob, dob = _blocks(q, block_q), _blocks(out, block_q), _blocks(dout, block_q)
    lse_b = lse.astype(jnp.float32).reshape(b, h, nq, block_q, 1)
    s = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, kg, precision=_HI) * scale
    s = jnp.where(valid[:, :, :, None, :], s, -jnp.inf)
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse_b), lse_b, 0.0))  # masked -> exp(-inf) = 0
    delta = jnp.sum(dob * ob, axis=-1, keepdims=True)
    dp = jnp.einsum("bhnqd,bhnkd->bhnqk", dob, vg, precision=_HI)
    ds = p * (dp - delta)
    dq = jnp.einsum("bhnqk,bhnkd->bhnqd", ds, kg, precision=_HI) * scale
    dkg = jnp.einsum("bhnqk,bhnqd->bhnkd", ds, qb, precision=_HI) * scale
    dvg = jnp.einsum("bhnqk,bhnqd->bhnkd", p, dob, precision=_HI)
    # Scatter-add the gathered blocks [B, H, Nq·K, bkv, D] back to [B, H, Nk, bkv, D] (ignored entries add zeros).
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    zeros = jnp.zeros((b, h, nk, block_kv, d), jnp.float32)
    dk = zeros.at[bi, hi, idx].add(dkg.reshape(b, h, -1, block_kv, d))
    dv = zeros.at[bi, hi, idx].add(dvg.reshape(b, h, -1, block_kv, d))
    return _unblocks(dq).astype(q.dtype), _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype)


def dense_token_mask(kv_block_idx, kv_block_cnt, kv_block_len, *, block_q, block_kv):
    """The boolean token mask [B, H, Tq, Tk] that the block lists describe."""
    nk = kv_block_len.shape[1]
    kk = kv_block_idx.shape[-1]
    listed = jnp.arange(kk) < kv_block_cnt[..., None]  # [B, H, Nq, K]
    sel = jnp.any((kv_block_idx[..., None] == jnp.arange(nk)) & listed[..., None], axis=-2)  # [B, H, Nq, Nk]
    tok = jnp.arange(block_kv) < kv_block_len[:, :, None]  # [B, Nk, bkv]
    mask = sel[..., None] & tok[:, None, None]  # [B, H, Nq, Nk, bkv]
    b, h, nq = sel.shape[:3]
    mask = mask.reshape(b, h, nq, 1, nk * block_kv)
    return jnp.broadcast_to(mask, (b, h, nq, block_q, nk * block_kv)).reshape(b, h, nq * block_q, nk * block_kv)


def dense_masked_reference(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, *, block_q, block_kv, scale=None,
                           return_lse=False):
    """Dense fp32 attention under the token mask of the block lists (memory O(B·H·Tq·Tk)): the independent ground
    truth. Differentiable with plain `jax.grad`. Returns out [B, Tq, H, D] in q.dtype (and the LSE if asked)."""
    scale = _scale(scale, q.shape[-1])
    mask = dense_token_mask(kv_block_idx, kv_block_cnt, kv_block_len, block_q=block_q, block_kv=block_kv)
    f32 = jnp.float32
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), k.astype(f32), precision=_HI) * scale
    p, lse = _masked_softmax(s, mask)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(f32), precision=_HI).astype(q.dtype)
    return (out, lse) if return_lse else out
