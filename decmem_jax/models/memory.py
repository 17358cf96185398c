"""DecMem's decoupled memory: Sparse Global Memory (SGM) + Anchored Local Memory (ALM), fused by a gate.

Everything here works on the **block-major padded layout** (`../shared/reference/decmem_method.md` §4.1): each
latent frame's T tokens are cut into M raster runs of ceil(T/M) tokens (the last one shorter), each padded to P slots
(a multiple of 64) with zeros, so a block is one contiguous [P, H, D] slab and frame f's block m has id f*M + m.

- SGM (§4): per head, mean-pool the valid tokens of every query block and key block (fp32), score
  q̄·k̄/√d, keep the top-k candidate key blocks (ties: lower block id first; fewer candidates than k: all of them),
  then attend densely to the valid tokens of the selected blocks.
- ALM (§5): the query chunk attends, bidirectionally, to its own chunk and the preceding latents inside a window of
  `window` latent frames (counting the chunk: default 8 = the chunk of 4 + the 4 before it).
- Gate (§6): o = o_alm + G ⊙ o_sgm, G = Linear(h) per token and channel, zero-initialised (a dense/ALM checkpoint is
  unchanged at initialisation).

Both branches are expressed as key-block index lists fed to one function, `pallas_kernels.sgm.sgm_attention`
(reference in XLA, Pallas kernels on GPU/TPU), so the ALM window is just a second, static list.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sgm import sgm_attention


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """DecMem memory settings; defaults are the paper's / the method spec's recommended ones (§13)."""

    blocks_per_frame: int = 6  # M
    block_slots: int = 192  # P: slots per block, a multiple of 64 (kernel tiles)
    top_k: int = 80  # SGM key blocks per query block
    window: int = 8  # ALM window in latent frames, counting the current chunk
    candidates: str = "all"  # "all" committed + current-chunk blocks, or "outside_window" (exclude the ALM window)
    backend: str = "auto"  # sgm_attention backend

    def __post_init__(self):
        if self.block_slots % 64:
            raise ValueError(f"MemoryConfig.block_slots={self.block_slots} must be a multiple of 64")
        if self.candidates not in ("all", "outside_window"):
            raise ValueError(f"MemoryConfig.candidates={self.candidates!r}; expected 'all' or 'outside_window'")
        if self.top_k < 1 or self.window < 1 or self.blocks_per_frame < 1:
            raise ValueError("MemoryConfig.top_k, window and blocks_per_frame must be positive")


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """The static token <-> slot permutation of one latent frame (numpy, host-side constants)."""

    tokens_per_frame: int
    blocks: int  # M
    slots: int  # P
    lengths: np.ndarray  # [M] valid tokens per block
    slot_to_token: np.ndarray  # [M*P] token index of each slot, -1 for padding
    token_to_slot: np.ndarray  # [T] slot index of each token

    @classmethod
    def create(cls, tokens_per_frame: int, blocks: int, slots: int) -> "BlockLayout":
        run = math.ceil(tokens_per_frame / blocks)
        if run > slots:
            raise ValueError(f"{tokens_per_frame} tokens in {blocks} blocks need {run} slots per block, more than "
                             f"block_slots={slots}")
        starts = np.minimum(np.arange(blocks) * run, tokens_per_frame)
        lengths = np.minimum(starts + run, tokens_per_frame) - starts
        if (lengths <= 0).any():
            raise ValueError(f"{tokens_per_frame} tokens do not fill {blocks} raster-run blocks")
        slot_to_token = np.full(blocks * slots, -1, np.int64)
        for m in range(blocks):
            slot_to_token[m * slots: m * slots + lengths[m]] = np.arange(starts[m], starts[m] + lengths[m])
        token_to_slot = np.empty(tokens_per_frame, np.int64)
        token_to_slot[slot_to_token[slot_to_token >= 0]] = np.nonzero(slot_to_token >= 0)[0]
        return cls(tokens_per_frame, blocks, slots, lengths.astype(np.int32), slot_to_token, token_to_slot)

    def to_blocks(self, x: jax.Array) -> jax.Array:
        """[B, F*T, ...] token-major -> [B, F*M*P, ...] block-major with zeros in the padding slots."""
        b, s = x.shape[:2]
        f = s // self.tokens_per_frame
        x = x.reshape(b, f, self.tokens_per_frame, *x.shape[2:])
        valid = self.slot_to_token >= 0
        y = jnp.take(x, np.where(valid, self.slot_to_token, 0), axis=2)
        y = jnp.where(valid.reshape((1, 1, -1) + (1,) * (x.ndim - 3)), y, 0)
        return y.reshape(b, f * self.blocks * self.slots, *x.shape[3:])

    def from_blocks(self, y: jax.Array) -> jax.Array:
        """Inverse of `to_blocks` (padding slots dropped)."""
        b, s = y.shape[:2]
        f = s // (self.blocks * self.slots)
        y = y.reshape(b, f, self.blocks * self.slots, *y.shape[2:])
        x = jnp.take(y, self.token_to_slot, axis=2)
        return x.reshape(b, f * self.tokens_per_frame, *y.shape[3:])

    def block_lengths(self, frames: int) -> np.ndarray:
        """Valid tokens of every block of `frames` consecutive frames, [frames*M] int32."""
        return np.tile(self.lengths, frames)


def pool_blocks(x: jax.Array, lengths: jax.Array, slots: int) -> jax.Array:
    """Per-head mean over the valid tokens of each block: x [B, N*P, H, D] (zeros in padding) -> [B, H, N, D] fp32.
    Empty blocks pool to zeros."""
    b, s, h, d = x.shape
    sums = x.astype(jnp.float32).reshape(b, s // slots, slots, h, d).sum(axis=2)  # [B, N, H, D]
    lengths = jnp.asarray(lengths, jnp.float32)
    mean = sums / jnp.maximum(lengths, 1.0).reshape((-1, 1, 1) if lengths.ndim == 1 else (b, -1, 1, 1))
    return mean.transpose(0, 2, 1, 3)


def select_blocks(q_pool: jax.Array, k_pool: jax.Array, candidates: jax.Array, top_k: int):
    """Top-k key blocks per query block and head.

    q_pool [B, H, Nq, D], k_pool [B, H, Nk, D]; candidates bool broadcastable to [B, H, Nq, Nk]. Returns
    (idx int32 [B, H, Nq, K] ascending, padded with Nk-1; cnt int32 [B, H, Nq]) with K = min(top_k, Nk). Ties go to
    the lower block id (lax.top_k keeps the lower index first among equal values). Indices carry no gradient.
    """
    nk = k_pool.shape[2]
    k = min(top_k, nk)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q_pool, k_pool, precision=jax.lax.Precision.HIGHEST)
    scores = jax.lax.stop_gradient(scores / math.sqrt(q_pool.shape[-1]))
    scores = jnp.where(candidates, scores, -jnp.inf)
    values, indices = jax.lax.top_k(scores, k)
    valid = values > -jnp.inf
    cnt = valid.sum(axis=-1).astype(jnp.int32)
    idx = jnp.sort(jnp.where(valid, indices, nk), axis=-1)  # selected ids ascending, non-selected (nk) last
    return jnp.minimum(idx, nk - 1).astype(jnp.int32), cnt


def window_lists(frames: int, chunk: int, window: int, blocks: int, batch: int, heads: int):
    """ALM key-block lists for a block-causal sequence of `frames` latent frames in chunks of `chunk`: every query
    block of chunk c sees the blocks of frames [max(0, end_c - window), end_c), end_c = the chunk's last frame + 1.
    Returns (idx [B, H, Nq, K], cnt [B, H, Nq]) as numpy int32, K = window * blocks."""
    nq = frames * blocks
    kmax = window * blocks
    idx = np.zeros((nq, kmax), np.int32)
    cnt = np.zeros((nq,), np.int32)
    for f in range(frames):
        end = min((f // chunk + 1) * chunk, frames)
        first = max(0, end - window)
        ids = np.arange(first * blocks, end * blocks, dtype=np.int32)
        for m in range(blocks):
            idx[f * blocks + m, : len(ids)] = ids
            idx[f * blocks + m, len(ids):] = ids[-1]
            cnt[f * blocks + m] = len(ids)
    shape = (batch, heads)
    return np.broadcast_to(idx, shape + idx.shape).copy(), np.broadcast_to(cnt, shape + cnt.shape).copy()


def candidate_mask(frames: int, chunk: int, blocks: int, *, window: int, mode: str) -> np.ndarray:
    """SGM candidates of every query block in a block-causal sequence: key blocks of frames before the end of the
    query's chunk ("all"), optionally minus the ALM window ("outside_window"). bool [Nq, Nk], Nq = Nk = frames*M."""
    frame_of = np.arange(frames * blocks) // blocks
    end = np.minimum((frame_of // chunk + 1) * chunk, frames)  # first frame after the query's chunk
    mask = frame_of[None, :] < end[:, None]
    if mode == "outside_window":
        mask &= frame_of[None, :] < (end - window)[:, None]
    return mask


def decmem_attention(q, k, v, gate, layout: BlockLayout, cfg: MemoryConfig, *, chunk: int):
    """Block-causal DecMem self-attention over a whole sequence (teacher forcing / full forward).

    q, k, v: [B, F*T, H, D] token-major (post qk-norm and RoPE); gate: [B, F*T, H, D] (the gate Linear's output,
    zeros at init). Returns o_alm + gate * o_sgm, token-major [B, F*T, H, D], to be fed to W_o.
    """
    b, s, h, d = q.shape
    frames = s // layout.tokens_per_frame
    qb, kb, vb = (layout.to_blocks(x) for x in (q, k, v))
    lengths = layout.block_lengths(frames)
    kv_len = jnp.broadcast_to(jnp.asarray(lengths), (b, lengths.shape[0]))
    common = dict(block_q=layout.slots, block_kv=layout.slots, backend=cfg.backend)

    alm_idx, alm_cnt = window_lists(frames, chunk, cfg.window, layout.blocks, b, h)
    o_alm = sgm_attention(qb, kb, vb, jnp.asarray(alm_idx), jnp.asarray(alm_cnt), kv_len, **common)

    mask = candidate_mask(frames, chunk, layout.blocks, window=cfg.window, mode=cfg.candidates)
    sgm_idx, sgm_cnt = select_blocks(pool_blocks(qb, lengths, layout.slots), pool_blocks(kb, lengths, layout.slots),
                                     jnp.asarray(mask)[None, None], cfg.top_k)
    o_sgm = sgm_attention(qb, kb, vb, sgm_idx, sgm_cnt, kv_len, **common)
    o = layout.from_blocks(o_alm).astype(jnp.float32) + gate.astype(jnp.float32) * layout.from_blocks(o_sgm)
    return o.astype(q.dtype)
