"""Index-list helpers of the SGM kernels: `reverse_block_lists`, `subtile_steps`, `group_steps` (Mosaic GPU,
`mosaic_gpu*.py`) and `pair_lists` (the dk/dv work list of the TPU kernel, `tpu.py`).

All of them run in XLA before a kernel launch, are deterministic (sorts are stable, no atomics) and keep ascending
order, so kernels that walk the lists accumulate in a fixed order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["reverse_block_lists", "subtile_steps", "group_steps", "pair_lists", "union_lists"]


def reverse_block_lists(idx, cnt, nk):
    """Key block -> query blocks that selected it, per (b·h). idx `[BH, Nq, K]` (sanitised), cnt `[BH, Nq]`.

    Returns rev `[BH, Nk, Nq]` (query blocks ascending; positions >= rev_cnt repeat the previous entry, 0 when empty)
    and rev_cnt `[BH, Nk]`. Built with a stable sort, so it is deterministic. Assumes duplicate-free lists (a key
    block appears at most once per query block), hence at most Nq entries per key block."""
    bh, nq, topk = idx.shape
    valid = jnp.arange(topk, dtype=jnp.int32)[None, None, :] < cnt[..., None]
    key = jnp.where(valid, idx, nk).reshape(bh, nq * topk)  # invalid entries sort last (sentinel nk)
    order = jnp.argsort(key, axis=-1, stable=True)
    q_sorted = (order // topk).astype(jnp.int32)  # query block of each sorted entry, ascending within a key block
    rev_cnt = jax.vmap(lambda kk: jnp.bincount(kk, length=nk + 1)[:nk])(key).astype(jnp.int32)
    start = jnp.cumsum(rev_cnt, axis=-1) - rev_cnt
    pos = jnp.minimum(jnp.arange(nq, dtype=jnp.int32)[None, None, :], jnp.maximum(rev_cnt[..., None] - 1, 0))
    flat = jnp.minimum(start[..., None] + pos, nq * topk - 1).reshape(bh, nk * nq)
    rev = jnp.take_along_axis(q_sorted, flat, axis=-1).reshape(bh, nk, nq)
    rev = jnp.where(rev_cnt[..., None] > 0, rev, 0)
    return rev, rev_cnt


def subtile_steps(idx, cnt, lens, *, block_kv, sub, payload=None):
    """Schedule of a kernel that walks each selected key block in sub-tiles of `sub` rows (sub divides block_kv).

    idx `[B, H, Nq, K]` (ids already in [0, Nk)), cnt `[B, H, Nq]` in [0, K], lens `[B, Nk]` in [0, block_kv].
    Returns (rows, valid, nsteps):
      rows   int32 `[B, H, Nq, K·block_kv/sub]`: first key row (in the flat Tk axis) of each step,
      valid  int32 same shape: valid keys in that step, in 1..sub (a step is partial iff valid < sub),
      nsteps int32 `[B, H, Nq]`: number of steps,
      and with `payload` (int `[B, H, Nq, K]`, a value per listed block) a 4th array: each step's block's value
      (0 past nsteps).
    Sub-tiles without any valid key (past the count, or past a block's valid length: empty blocks, the tail of a
    partial block) are dropped, so every step holds >= 1 valid key and a query block whose selected blocks are all
    empty gets nsteps = 0. Steps keep list order (key rows ascending). Positions >= nsteps hold row 0, valid 0."""
    b, h, nq, kk = idx.shape
    ns = block_kv // sub
    idx = idx.astype(jnp.int32)
    sel_len = jnp.take_along_axis(lens.astype(jnp.int32)[:, None, None, :], idx.reshape(b, 1, 1, -1), axis=-1)
    sel_len = sel_len.reshape(b, h, nq, kk)  # valid tokens of each selected block
    listed = jnp.arange(kk, dtype=jnp.int32) < cnt[..., None]
    j = jnp.arange(ns, dtype=jnp.int32)
    valid = jnp.clip(sel_len[..., None] - j * sub, 0, sub)  # [B, H, Nq, K, ns]
    valid = jnp.where(listed[..., None], valid, 0).reshape(b, h, nq, kk * ns)
    rows = (idx[..., None] * block_kv + j * sub).reshape(b, h, nq, kk * ns)
    order = jnp.argsort((valid == 0).astype(jnp.int32), axis=-1, stable=True)  # non-empty steps first, in order
    valid = jnp.take_along_axis(valid, order, axis=-1)
    rows = jnp.where(valid > 0, jnp.take_along_axis(rows, order, axis=-1), 0)
    out = rows.astype(jnp.int32), valid.astype(jnp.int32), jnp.sum(valid > 0, axis=-1).astype(jnp.int32)
    if payload is None:
        return out
    per_step = jnp.broadcast_to(payload.astype(jnp.int32)[..., None], (b, h, nq, kk, ns)).reshape(b, h, nq, kk * ns)
    return (*out, jnp.where(valid > 0, jnp.take_along_axis(per_step, order, axis=-1), 0))


def group_steps(rows, valid, nsteps, nbox, base=128, bits=None, bits_base=8):
    """Groups `subtile_steps` boxes `nbox` at a time into wider kernel steps (one SMEM slot of nbox·sub rows).

    Returns (rows `[B, H, Nq, M, nbox]`, code `[B, H, Nq, M]`, nsteps `[B, H, Nq]`) with M = ceil(L / nbox): the
    first key row of every box, the boxes' valid counts packed as Σ_j valid_j·base^j (a box past the list: row 0,
    valid 0, i.e. loaded but fully masked) and ceil(nsteps / nbox) steps. The first box of a step is always valid,
    so every step still holds >= 1 valid key. `bits` (per box, each < bits_base: `union_lists`' row-group bits
    through `subtile_steps`' payload) are packed above the counts: code += (Σ_j bits_j·bits_base^j)·base^nbox."""
    b, h, nq, length = rows.shape
    if bits is not None and (base * bits_base) ** nbox > 2 ** 31:
        raise ValueError(f"group_steps: {nbox} boxes of counts < {base} and bits < {bits_base} overflow an int32 code")
    pad = -length % nbox
    if pad:
        widths = ((0, 0),) * 3 + ((0, pad),)
        rows, valid = jnp.pad(rows, widths), jnp.pad(valid, widths)
        bits = None if bits is None else jnp.pad(bits, widths)
    rows = rows.reshape(b, h, nq, -1, nbox)
    weights = jnp.asarray([base ** j for j in range(nbox)], jnp.int32)
    code = jnp.sum(valid.reshape(b, h, nq, -1, nbox) * weights, axis=-1)
    if bits is not None:
        bit_weights = jnp.asarray([bits_base ** j * base ** nbox for j in range(nbox)], jnp.int32)
        code = code + jnp.sum(bits.reshape(b, h, nq, -1, nbox) * bit_weights, axis=-1)
    return rows.astype(jnp.int32), code.astype(jnp.int32), ((nsteps + nbox - 1) // nbox).astype(jnp.int32)


def union_lists(idx, cnt, group):
    """The key blocks that any of `group` consecutive query blocks selected, and which of them did.

    idx `[B, H, Nq, K]` (sanitised, ascending below the count), cnt `[B, H, Nq]`. Query blocks g·group .. g·group +
    group − 1 form group g (a last, short group is padded with empty blocks). Returns (uidx `[B, H, G, group·K]`
    ascending and duplicate-free below ucnt, padded with the last listed id (0 when none); ucnt `[B, H, G]`; ubits
    same shape as uidx: bit j set iff block g·group + j listed that key block, 0 past ucnt). For the forward's packed
    query tails (`mosaic_gpu_qtails`): one q tile holds the tails of a group's blocks and walks the union once."""
    b, h, nq, kk = idx.shape
    ng = -(-nq // group)
    if ng * group != nq:
        extra = ng * group - nq
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, extra), (0, 0)))
        cnt = jnp.pad(cnt, ((0, 0), (0, 0), (0, extra)))
    listed = jnp.arange(kk, dtype=jnp.int32) < cnt[..., None]
    member = (jnp.arange(ng * group, dtype=jnp.int32) % group)[:, None]
    big = jnp.iinfo(jnp.int32).max
    key = jnp.where(listed, idx.astype(jnp.int32) * group + member, big).reshape(b, h, ng, group * kk)
    key = jnp.sort(key, axis=-1)  # by block id, then group member: equal ids are neighbours
    live = key != big
    ids, bit = key // group, jnp.left_shift(1, key % group)
    bits = jnp.where(live, bit, 0)
    for s in range(1, group):  # OR in the members of the same id that follow (a run is at most `group` long)
        nxt_id = jnp.pad(ids[..., s:], ((0, 0),) * 3 + ((0, s),), constant_values=-1)
        nxt_bit = jnp.pad(bits[..., s:], ((0, 0),) * 3 + ((0, s),))
        bits = bits | jnp.where(live & (nxt_id == ids), nxt_bit, 0)
    prev_id = jnp.pad(ids[..., :-1], ((0, 0),) * 3 + ((1, 0),), constant_values=-1)
    first = live & (ids != prev_id)
    order = jnp.argsort(jnp.logical_not(first).astype(jnp.int32), axis=-1, stable=True)  # firsts to the front
    ucnt = jnp.sum(first, axis=-1, dtype=jnp.int32)
    uidx = jnp.take_along_axis(jnp.where(live, ids, 0), order, axis=-1)
    ubits = jnp.take_along_axis(jnp.where(first, bits, 0), order, axis=-1)
    pos = jnp.arange(group * kk, dtype=jnp.int32)
    last = jnp.take_along_axis(uidx, jnp.maximum(ucnt - 1, 0)[..., None], axis=-1)
    uidx = jnp.where(pos < ucnt[..., None], uidx, jnp.where(ucnt[..., None] > 0, last, 0))
    return uidx.astype(jnp.int32), ucnt, ubits.astype(jnp.int32)


PAIR_VALID, PAIR_FIRST, PAIR_LAST, PAIR_FLAGS = 1, 2, 4, 8


def pair_lists(idx, cnt, nk):
    """The dk/dv kernel's work list: idx `[BH, Nq, K]` (sanitised), cnt `[BH, Nq]` -> int32 `[BH, Nq·K]` codes
    (kb·Nq + qb)·8 + flags, one per selected (key block kb, query block qb) pair, sorted by kb then qb, with flags
    PAIR_VALID, PAIR_FIRST / PAIR_LAST (first / last pair of its key block). Positions past the pair count repeat
    the last valid pair with flags 0 (pair 0 with flags 0 when there is none). Deterministic (keys are unique for
    duplicate-free lists); returns also the per-key-block pair counts `[BH, Nk]`."""
    bh, nq, topk = idx.shape
    valid = jnp.arange(topk, dtype=jnp.int32) < cnt[..., None]
    qb = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32)[:, None], (nq, topk))
    key = jnp.sort(jnp.where(valid, idx * nq + qb, nk * nq).reshape(bh, -1), axis=-1)
    n = jnp.sum(valid, axis=(1, 2), dtype=jnp.int32)[:, None]
    pos = jnp.arange(nq * topk, dtype=jnp.int32)[None, :]
    key = jnp.where(n > 0, jnp.take_along_axis(key, jnp.minimum(pos, jnp.maximum(n - 1, 0)), axis=-1), 0)
    kb = key // nq
    live = pos < n
    edge = jnp.full((bh, 1), -1, jnp.int32)
    first = live & (kb != jnp.concatenate([edge, kb[:, :-1]], axis=1))
    last = live & ((pos == n - 1) | (kb != jnp.concatenate([kb[:, 1:], edge], axis=1)))
    code = key * PAIR_FLAGS + live * PAIR_VALID + first * PAIR_FIRST + last * PAIR_LAST
    counts = jax.vmap(lambda k, m: jnp.bincount(jnp.where(m, k, nk), length=nk + 1)[:nk])(kb, live)
    return code.astype(jnp.int32), counts.astype(jnp.int32)
