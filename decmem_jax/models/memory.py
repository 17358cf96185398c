"""DecMem's decoupled memory: Sparse Global Memory (SGM) + Anchored Local Memory (ALM), fused by a gate.

Everything here works on the **block-major padded layout** (`docs/method.md` §5): each
latent frame's T tokens are cut into M raster runs of ceil(T/M) tokens (the last one shorter), each padded to P slots
(a multiple of 64) with zeros, so a block is one contiguous [P, H, D] slab and frame f's block m has id f*M + m.

- SGM (docs/method.md §6): per head, mean-pool the valid tokens of every query block and key block (fp32), score
  q̄·k̄/√d, keep the top-k candidate key blocks (ties: lower block id first; fewer candidates than k: all of them),
  then attend densely to the valid tokens of the selected blocks.
- ALM (§7): the query chunk attends, bidirectionally, to its own chunk and the preceding latents inside a window of
  `window` latent frames (counting the chunk: default 8 = the chunk of 4 + the 4 before it).
- Gate (§8): o = o_alm + G ⊙ o_sgm, G = Linear(h) per token and channel, zero-initialised (a dense/ALM checkpoint is
  unchanged at initialisation).

SGM runs on key-block index lists through one function, `pallas_kernels.sgm.sgm_attention` (reference in XLA,
Pallas kernels on GPU/TPU). The ALM window is contiguous, so it runs as dense attention on the token-major tensors
(`window_attention`; in a rollout, `_window_attention` over the cache's last frames): cuDNN on GPU, which is faster
than the block-sparse kernel on such windows. Layers with the DecMem switch off use block lists of every visible
block.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from decmem_jax.models.attention import attention, fits_mask, frame_masked_attention
from decmem_jax.models.attention_ops import merge_partial
from decmem_jax.models.config import MemoryConfig  # noqa: F401 -- re-exported: the memory settings
from pallas_kernels.sgm import sgm_attention

log = logging.getLogger(__name__)
_WARNED: set[tuple[int, int, int]] = set()  # layouts already warned about (layouts are rebuilt at every trace)


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
        wasteful = 4 * run <= slots and (blocks > 1 or slots > 64)  # and a less padded layout exists
        if wasteful and (tokens_per_frame, blocks, slots) not in _WARNED:  # kernels work on all P slots
            _WARNED.add((tokens_per_frame, blocks, slots))
            log.warning("memory layout: %d tokens per frame in %d blocks fill %d of %d slots per block (%.0f%% "
                        "padding); fewer blocks_per_frame or a smaller block_slots would waste less", tokens_per_frame,
                        blocks, run, slots, 100 * (1 - tokens_per_frame / (blocks * slots)))
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

    @property
    def run(self) -> int:
        """Tokens per raster run: every block but the last holds `run` tokens, the last one the rest."""
        return int(self.lengths[0])

    # Both directions are pads, reshapes and slices, not gathers: their gradients are then slices and pads too, where
    # a gather's is a scatter-add (on the H200 the scatters of q, k, v took 0.19 s of a 60-latent training step).
    def to_blocks(self, x: jax.Array) -> jax.Array:
        """[B, F*T, ...] token-major -> [B, F*M*P, ...] block-major with zeros in the padding slots."""
        b, s = x.shape[:2]
        f, t, m, run, rest = s // self.tokens_per_frame, self.tokens_per_frame, self.blocks, self.run, x.shape[2:]
        none = [(0, 0)] * len(rest)
        x = jnp.pad(x.reshape(b, f, t, *rest), [(0, 0), (0, 0), (0, m * run - t)] + none)  # the last run's tail
        y = jnp.pad(x.reshape(b, f, m, run, *rest), [(0, 0)] * 3 + [(0, self.slots - run)] + none)
        return y.reshape(b, f * m * self.slots, *rest)

    def from_blocks(self, y: jax.Array) -> jax.Array:
        """Inverse of `to_blocks` (padding slots dropped)."""
        b, s = y.shape[:2]
        f, m, rest = s // (self.blocks * self.slots), self.blocks, y.shape[2:]
        x = y.reshape(b, f, m, self.slots, *rest)[:, :, :, : self.run].reshape(b, f, m * self.run, *rest)
        return x[:, :, : self.tokens_per_frame].reshape(b, f * self.tokens_per_frame, *rest)

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


def _block_scores(q_pool: jax.Array, k_pool: jax.Array) -> jax.Array:
    """q_pool [B, H, Nq, D] · k_pool [B or 1, H, Nk, D] -> [B, H, Nq, Nk] fp32; a batch-1 k_pool (the rollout's
    history, shared by the CFG branches) is read once, not broadcast into a copy."""
    hi = jax.lax.Precision.HIGHEST
    if k_pool.shape[0] == 1 and q_pool.shape[0] != 1:
        return jnp.einsum("bhqd,hkd->bhqk", q_pool, k_pool[0], precision=hi)
    return jnp.einsum("bhqd,bhkd->bhqk", q_pool, k_pool, precision=hi)


def select_blocks(q_pool: jax.Array, k_pool, candidates: jax.Array, top_k: int, *, ranked: bool = False):
    """Top-k key blocks per query block and head.

    q_pool [B, H, Nq, D], k_pool [B, H, Nk, D], or a sequence of such parts (each of batch B or 1) that number the
    key blocks one after another (the rollout's cached history, then the chunk's own blocks: their scores are
    concatenated, which is smaller than the pooled keys); candidates bool broadcastable to [B, H, Nq, Nk]. Returns
    (idx int32 [B, H, Nq, K] ascending, padded with Nk-1; cnt int32 [B, H, Nq]) with K = min(top_k, Nk). Ties go to
    the lower block id (lax.top_k keeps the lower index first among equal values). Indices carry no gradient.
    ranked=True adds a third array: the same ids in descending score order (column 0 = the best block), padded with
    Nk-1 likewise; the kernels need ascending ids, diagnostics (top-1 retrieval precision) need the order.
    """
    parts = list(k_pool) if isinstance(k_pool, (tuple, list)) else [k_pool]
    nk = sum(part.shape[2] for part in parts)
    k = min(top_k, nk)
    scores = jnp.concatenate([_block_scores(q_pool, part) for part in parts], axis=-1)
    scores = jax.lax.stop_gradient(scores / math.sqrt(q_pool.shape[-1]))
    scores = jnp.where(candidates, scores, -jnp.inf)
    values, indices = jax.lax.top_k(scores, k)
    valid = values > -jnp.inf
    cnt = valid.sum(axis=-1).astype(jnp.int32)
    idx = jnp.sort(jnp.where(valid, indices, nk), axis=-1)  # selected ids ascending, non-selected (nk) last
    idx = jnp.minimum(idx, nk - 1).astype(jnp.int32)
    if ranked:
        return idx, cnt, jnp.where(valid, indices, nk - 1).astype(jnp.int32)
    return idx, cnt


@dataclasses.dataclass(frozen=True)
class FramePlan:
    """Which latent frames of a full sequence each frame may attend to (host-side, static).

    positions [F]: RoPE time index of each sequence frame; visible [F, F]: query frame f may attend key frame j;
    end [F]: position just after the query frame's chunk (the ALM window ends there)."""

    positions: np.ndarray
    visible: np.ndarray
    end: np.ndarray
    chunk: int
    teacher_forcing: bool = False  # [clean ; noisy] layout

    @property
    def frames(self) -> int:
        return len(self.positions)

    def window(self, window: int) -> np.ndarray:
        """ALM keys: visible frames whose position lies in [end - window, end)."""
        return self.visible & (self.positions[None, :] >= self.end[:, None] - window)

    def candidates(self, window: int, mode: str) -> np.ndarray:
        """SGM candidates at the frame level: every visible frame, or only those outside the ALM window."""
        return self.visible & ~self.window(window) if mode == "outside_window" else self.visible


def causal_plan(frames: int, chunk: int) -> FramePlan:
    """One block-causal sequence: chunk c (frames [c*chunk, (c+1)*chunk)) sees chunks 0..c; positions 0..F-1."""
    f = np.arange(frames)
    end = np.minimum((f // chunk + 1) * chunk, frames)
    return FramePlan(f, f[None, :] < end[:, None], end, chunk)


def teacher_forcing_plan(frames: int, chunk: int) -> FramePlan:
    """[clean ; noisy] sequence of 2F frames (docs/method.md §11): clean chunk c sees clean chunks <= c; noisy chunk c
    sees clean chunks < c and itself; both copies share positions 0..F-1."""
    if frames % chunk:
        raise ValueError(f"teacher forcing needs whole chunks: {frames} latent frames, chunk {chunk}")
    f = np.arange(frames)
    c = f // chunk
    clean_clean = c[None, :] <= c[:, None]
    noisy_clean = c[None, :] < c[:, None]
    noisy_noisy = c[None, :] == c[:, None]
    visible = np.block([[clean_clean, np.zeros_like(clean_clean)], [noisy_clean, noisy_noisy]])
    end = np.tile((c + 1) * chunk, 2)
    return FramePlan(np.tile(f, 2), visible, end, chunk, teacher_forcing=True)


def frame_lists_to_blocks(mask: np.ndarray, blocks: int, batch: int, heads: int):
    """Frame-level key mask [Fq, Fk] -> per-query-block lists of every block of the allowed frames.

    Returns numpy int32 (idx [B, H, Fq*M, K], cnt [B, H, Fq*M]), K = max allowed frames * M (>= 1), lists ascending
    and padded by repeating the last id."""
    fq = mask.shape[0]
    kmax = max(1, int(mask.sum(1).max()) * blocks)
    idx = np.zeros((fq * blocks, kmax), np.int32)
    cnt = np.zeros((fq * blocks,), np.int32)
    for f in range(fq):
        ids = (np.nonzero(mask[f])[0][:, None] * blocks + np.arange(blocks)).reshape(-1).astype(np.int32)
        rows = slice(f * blocks, (f + 1) * blocks)
        if len(ids):
            idx[rows, : len(ids)] = ids
            idx[rows, len(ids):] = ids[-1]
        cnt[rows] = len(ids)
    shape = (batch, heads)
    return np.broadcast_to(idx, shape + idx.shape).copy(), np.broadcast_to(cnt, shape + cnt.shape).copy()


def expand_frames(mask: np.ndarray, blocks: int) -> np.ndarray:
    """Frame-level [Fq, Fk] -> block-level [Fq*M, Fk*M]."""
    return np.repeat(np.repeat(mask, blocks, axis=0), blocks, axis=1)


def candidate_mask(frames: int, chunk: int, blocks: int, *, window: int, mode: str) -> np.ndarray:
    """SGM candidates of every query block of a block-causal sequence, bool [F*M, F*M]."""
    return expand_frames(causal_plan(frames, chunk).candidates(window, mode), blocks)


def _sgm(q, k, v, idx, cnt, lens, layout: BlockLayout, cfg: MemoryConfig, return_lse=False):
    # Query blocks hold at most `run` tokens; the slots past it are padding that `from_blocks` drops (zero
    # cotangent), so the backward may skip them (q_rows): DecMem's dk/dv kernel then streams 160 of 192 rows.
    return sgm_attention(q, k, v, idx, cnt, lens, block_q=layout.slots, block_kv=layout.slots, backend=cfg.backend,
                         return_lse=return_lse, q_rows=layout.run)


def _score_blocks(q, k, qb, kb, score, layout: BlockLayout):
    """The block-major tensors SGM pools: q/k's own blocks, or those of `score` = (q, k) before RoPE."""
    if score is None or score[0] is q:
        return qb, kb
    return layout.to_blocks(score[0]), layout.to_blocks(score[1])


def _runs(frames: np.ndarray) -> list[tuple[int, int]]:
    """Ascending frame indices -> maximal runs of consecutive frames [(start, end), ...]."""
    cuts = np.nonzero(np.diff(frames) != 1)[0] + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(frames, cuts)]


def _fold_spec(plan: FramePlan, window: int) -> tuple[int, int] | None:
    """(copies, history frames h) when the plan's ALM window is the standard one: every chunk of C query frames sees
    itself and the h = window - C clean frames before it (0 <= h <= C), in a block-causal sequence (1 copy) or in both
    halves of a teacher-forcing one (2 copies). None for any other pattern (a partial last chunk, h > C)."""
    c, h = plan.chunk, window - plan.chunk
    copies = 2 if plan.teacher_forcing else 1
    f = plan.frames // copies
    if f % c or not 0 <= h <= c or plan.frames != copies * f:
        return None
    g = np.arange(f) // c
    own = g[:, None] == g[None, :]
    hist = (np.arange(f)[None, :] < g[:, None] * c) & (np.arange(f)[None, :] >= g[:, None] * c - h)
    expect = own | hist if copies == 1 else np.block([[own | hist, np.zeros_like(own)], [hist, own]])
    return (copies, h) if np.array_equal(plan.window(window), expect) else None


def _folded_window_attention(q, k, v, chunk: int, h: int, copies: int, t: int, backend: str):
    """The standard ALM window (`_fold_spec`) as ONE dense call with the chunks folded into the batch: each chunk's
    keys are [its own chunk ; the last h frames of the clean chunk before it], and `kv_length` masks the first
    chunk's missing history. The keys are built from reshapes, one pad and one concatenation, so their gradient is
    as cheap; per-chunk static slices (the general path) cost a pad and an add per slice in the backward pass (on
    the H200 about 0.3 s of a 60-latent training step). (Running the first chunks as a second call without the mask
    gave the same step time: cuDNN's backward was 2% faster, the slices around it cost as much.)"""
    b, s, nh, d = q.shape
    n = s // (copies * chunk * t)  # chunks per copy
    fold = lambda x: x.reshape(b * copies * n, chunk * t, nh, d)
    if h == 0:  # the chunks see only themselves
        return attention(fold(q), fold(k), fold(v), backend=backend).reshape(q.shape)

    def keys(x):
        clean = x[:, : n * chunk * t].reshape(b, n, chunk * t, nh, d)
        hist = jnp.pad(clean[:, :-1, (chunk - h) * t:], ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))  # chunk i: i-1's tail
        hist = jnp.broadcast_to(hist[:, None], (b, copies) + hist.shape[1:]).reshape(b, copies * n, h * t, nh, d)
        return jnp.concatenate([x.reshape(b, copies * n, chunk * t, nh, d), hist], axis=2).reshape(
            b * copies * n, (chunk + h) * t, nh, d)

    length = np.where(np.arange(n) == 0, chunk * t, (chunk + h) * t).astype(np.int32)
    kv_length = np.broadcast_to(length, (b, copies, n)).reshape(-1)
    return attention(fold(q), keys(k), keys(v), backend=backend, kv_length=jnp.asarray(kv_length)).reshape(q.shape)


def window_attention(q, k, v, plan: FramePlan, window: int, tokens_per_frame: int, backend: str):
    """ALM over a whole sequence, token-major [B, F*T, H, D]: each query frame attends to the frames of
    `plan.window(window)` with dense attention (cuDNN on GPU, with its backward), which is faster than the
    block-sparse kernel on these short, contiguous windows.

    A small sequence runs as one call under the frame mask; a long one with the standard window as one call with the
    chunks folded into the batch (`_folded_window_attention`); any other as one call per group of consecutive query
    frames with the same window (a chunk), over static slices of the keys: one slice per run of consecutive key
    frames (a teacher-forcing noisy chunk has two: the clean frames before it and itself)."""
    mask = plan.window(window)
    t, f = tokens_per_frame, plan.frames
    if fits_mask(q.shape[1], k.shape[1]):
        return frame_masked_attention(q, k, v, mask, tokens_per_frame=t, backend=backend)
    spec = _fold_spec(plan, window)
    if spec is not None:
        return _folded_window_attention(q, k, v, plan.chunk, spec[1], spec[0], t, backend)
    outs, start = [], 0
    while start < f:
        end = start + 1
        while end < f and (mask[end] == mask[start]).all():
            end += 1
        runs = _runs(np.nonzero(mask[start])[0])
        ks = [k[:, a * t: e * t] for a, e in runs]
        vs = [v[:, a * t: e * t] for a, e in runs]
        keys, values = (xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=1) for xs in (ks, vs))
        outs.append(attention(q[:, start * t: end * t], keys, values, backend=backend))
        start = end
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def decmem_attention(q, k, v, gate, layout: BlockLayout, cfg: MemoryConfig, *, plan: FramePlan | None = None,
                     chunk: int | None = None, use_memory=True, score=None, attention_backend: str = "xla"):
    """DecMem self-attention over a whole sequence (teacher forcing / full forward), under a `FramePlan`.

    q, k, v: [B, F*T, H, D] token-major (post qk-norm and RoPE); gate: [B, F*T, H, D] (the gate Linear's output,
    zeros at init). Returns o_alm + gate * o_sgm (o_alm alone when cfg.sgm is False), token-major [B, F*T, H, D], to
    be fed to W_o. `plan` defaults to
    `causal_plan(F, chunk)`. use_memory: True, or a traced bool (per-layer switch under a layer scan): where False the
    layer runs dense attention over every visible block instead. score: optional (q, k) that SGM pools and scores
    instead of q and k (MemoryConfig.score_on="content": the tensors before RoPE). attention_backend: the dense
    attention backend of the ALM window (`window_attention`).
    """
    b, s, h, d = q.shape
    frames = s // layout.tokens_per_frame
    plan = causal_plan(frames, chunk) if plan is None else plan
    if plan.frames != frames:
        raise ValueError(f"plan covers {plan.frames} frames, the sequence has {frames}")
    if cfg.window < plan.chunk:
        raise ValueError(f"MemoryConfig.window={cfg.window} is shorter than the chunk ({plan.chunk} latents)")
    qb, kb, vb = (layout.to_blocks(x) for x in (q, k, v))
    lengths = layout.block_lengths(frames)
    kv_len = jnp.broadcast_to(jnp.asarray(lengths), (b, lengths.shape[0]))

    def memory():
        o_alm = window_attention(q, k, v, plan, cfg.window, layout.tokens_per_frame, attention_backend)
        if not cfg.sgm:  # inference switch: the ALM window alone
            return o_alm.astype(q.dtype)
        cand = expand_frames(plan.candidates(cfg.window, cfg.candidates), layout.blocks)
        qs, ks = _score_blocks(q, k, qb, kb, score, layout)
        sgm_idx, sgm_cnt = select_blocks(pool_blocks(qs, lengths, layout.slots),
                                         pool_blocks(ks, lengths, layout.slots), jnp.asarray(cand)[None, None],
                                         cfg.top_k)
        o_sgm = _sgm(qb, kb, vb, sgm_idx, sgm_cnt, kv_len, layout, cfg)
        o = o_alm.astype(jnp.float32) + gate.astype(jnp.float32) * layout.from_blocks(o_sgm)
        return o.astype(q.dtype)

    def dense():
        idx, cnt = frame_lists_to_blocks(plan.visible, layout.blocks, b, h)
        return layout.from_blocks(_sgm(qb, kb, vb, jnp.asarray(idx), jnp.asarray(cnt), kv_len, layout, cfg))

    if isinstance(use_memory, (bool, np.bool_)):
        return memory() if use_memory else dense()
    return jax.lax.cond(use_memory, memory, dense)


def retrieval_loss(q, k, layout: BlockLayout, cfg: MemoryConfig, plan: FramePlan, target, *, score=None):
    """Auxiliary retrieval loss on SGM's block scores (NOT part of the DecMem method, which trains the scores only
    through the fine attention; `train.retrieval_loss` > 0 turns it on; docs/memory.md, "Retrieval loss").

    SGM's top-k is not differentiable, so nothing teaches q̄·k̄ to rank the blocks that matter; at small scale the
    scores stayed at chance. This loss gives them a direct signal: for every query block whose frame has target key
    frames among its SGM candidates, -log of the softmax mass (over the candidates) on those frames' blocks, per
    head, averaged over such (batch, head, query block) rows. q, k [B, F*T, H, D] as for `decmem_attention` (score:
    the tensors SGM pools instead, MemoryConfig.score_on); target bool [B, P, P] over RoPE positions (sequence frame
    f has position plan.positions[f]): query position i should retrieve key position j. Returns (loss, top1): top1 =
    the fraction of those rows whose best-scored candidate is a target (what the rollout's top-k would pick first).
    """
    b, s, h, d = q.shape
    frames = s // layout.tokens_per_frame
    qs, ks = (q, k) if score is None else score
    lengths = layout.block_lengths(frames)
    q_pool = pool_blocks(layout.to_blocks(qs), lengths, layout.slots)
    k_pool = pool_blocks(layout.to_blocks(ks), lengths, layout.slots)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q_pool, k_pool, precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
    cand = jnp.asarray(expand_frames(plan.candidates(cfg.window, cfg.candidates), layout.blocks))
    pos = np.asarray(plan.positions)
    want = jnp.asarray(target, bool)[:, pos][:, :, pos]  # [B, F, F] over sequence frames
    want = jnp.repeat(jnp.repeat(want, layout.blocks, axis=1), layout.blocks, axis=2) & cand[None]
    rows = want.any(-1)  # [B, N]: query blocks with something to retrieve
    # Finite fill, not -inf: rows without targets are masked out below, and -inf there would turn their zero
    # cotangent into NaN gradients.
    fill = jnp.float32(-1e9)
    all_lse = jax.nn.logsumexp(jnp.where(cand[None, None], logits, fill), axis=-1)
    pos_lse = jax.nn.logsumexp(jnp.where(want[:, None], logits, fill), axis=-1)
    weight = jnp.broadcast_to(rows[:, None], all_lse.shape).astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    loss = ((all_lse - pos_lse) * weight).sum() / count
    best = jnp.argmax(jnp.where(cand[None, None], logits, fill), axis=-1)  # [B, H, N]
    hit = jnp.take_along_axis(jnp.broadcast_to(want[:, None], logits.shape), best[..., None], axis=-1)[..., 0]
    return loss, jax.lax.stop_gradient((hit * weight).sum() / count)


def _history_attention(qb, hk, hv, idx, cnt, hist_len, layout, cfg):
    """sgm over the cache with (out, lse). A cache of batch 1 shared by a batch of B queries (the CFG branches): the
    batch is folded into the query blocks, so the cache is read in place, never broadcast."""
    b, bh = qb.shape[0], hk.shape[0]
    if bh == b:
        return _sgm(qb, hk, hv, idx, cnt, hist_len, layout, cfg, return_lse=True)
    if bh != 1:
        raise ValueError(f"cache batch {bh} must be 1 (shared) or equal the query batch {b}")
    _, tq, h, d = qb.shape
    nq = idx.shape[2]
    q1 = qb.reshape(1, b * tq, h, d)
    idx1 = idx.transpose(1, 0, 2, 3).reshape(1, h, b * nq, -1)
    cnt1 = cnt.transpose(1, 0, 2).reshape(1, h, b * nq)
    o, lse = _sgm(q1, hk, hv, idx1, cnt1, hist_len[:1], layout, cfg, return_lse=True)
    return o.reshape(b, tq, h, d), lse.reshape(h, b, tq).transpose(1, 0, 2)


def _take_suffix(idx, start, nk_offset):
    """Entries idx[..., start:] shifted left (start is per row), minus nk_offset; tail padded with the last entry."""
    k = idx.shape[-1]
    pos = jnp.minimum(start[..., None] + jnp.arange(k), k - 1)
    return jnp.take_along_axis(idx, pos, axis=-1) - nk_offset


def _window_tokens(x, layout: BlockLayout, first, frames: int):
    """Frames [first, first + frames) of a block-major cache [Bh, cap*M*P, H, D] as token-major rows
    [Bh, frames*T, H, D] (padding slots dropped). Rows past the cache's end repeat its last slot: callers mask them
    (they lie past the committed length)."""
    fp = layout.blocks * layout.slots
    rows = (first + jnp.arange(frames, dtype=jnp.int32))[:, None] * fp + jnp.asarray(layout.token_to_slot, jnp.int32)
    return jnp.take(x, jnp.minimum(rows.reshape(-1), x.shape[1] - 1), axis=1)


def _window_attention(q, k, v, hk, hv, layout: BlockLayout, length, wh: int, backend: str):
    """ALM of a chunk, token-major: its queries over [its own keys ; the last `wh` committed frames] as ONE dense
    attention call (cuDNN on GPU), the history frames gathered out of the block-major cache (wh*T rows, a few MB).

    Same keys and softmax as the block lists of `decmem_attention` (the window is bidirectional and contiguous, so no
    block lists are needed); the own keys go first so that the valid keys are a prefix (`kv_length`), which also
    covers a window that reaches before frame 0."""
    b, s = q.shape[:2]
    if wh <= 0:
        return attention(q, k, v, backend=backend)
    first = jnp.maximum(length - wh, 0)
    wk, wv = (_window_tokens(x, layout, first, wh) for x in (hk, hv))
    keys = jnp.concatenate([k, jnp.broadcast_to(wk, (b,) + wk.shape[1:]).astype(k.dtype)], axis=1)
    values = jnp.concatenate([v, jnp.broadcast_to(wv, (b,) + wv.shape[1:]).astype(v.dtype)], axis=1)
    return attention(q, keys, values, backend=backend, kv_length=s + (length - first) * layout.tokens_per_frame)


def chunk_decmem_attention(q, k, v, gate, layout: BlockLayout, cfg: MemoryConfig, hist, length, *, use_memory=True,
                           score=None, attention_backend: str = "xla"):
    """DecMem attention of one chunk against a block-major cache (inference; forward only).

    q, k, v, gate: [B, C*T, H, D] token-major, the chunk's frames follow the `length` committed ones.
    hist = (hk, hv, hpool): cache keys/values [Bh, cap*M*P, H, D] block-major and pooled keys [Bh, H, cap*M, D]
    fp32, Bh = 1 (shared by the CFG branches) or B. Same result as `decmem_attention` on the full causal sequence
    for this chunk's rows. Returns (o token-major, (kb, vb, k_pool), (sel, cnt)): the chunk's block-major
    keys/values and pooled keys, which `commit` writes into the cache, and the SGM retrieval for diagnostics: global
    block ids frame*M + m [B, H, C*M, K] in descending score order (column 0 = the best block; entries from
    `counts` on are padding), counts [B, H, C*M] (0 in a dense layer and with cfg.sgm False, where o = o_alm).
    """
    hk, hv, hpool = hist
    b, s, h, d = q.shape
    m, slots = layout.blocks, layout.slots
    c = s // layout.tokens_per_frame
    cap_blocks = hpool.shape[2]
    if cfg.window < c:
        raise ValueError(f"MemoryConfig.window={cfg.window} is shorter than the chunk ({c} latents)")
    qb, kb, vb = (layout.to_blocks(x) for x in (q, k, v))
    qs, ks = _score_blocks(q, k, qb, kb, score, layout)  # what SGM pools (`score`: see decmem_attention)
    own_len = jnp.broadcast_to(jnp.asarray(layout.block_lengths(c)), (b, c * m))
    hist_len = jnp.broadcast_to(jnp.asarray(layout.block_lengths(cap_blocks // m)), (hk.shape[0], cap_blocks))
    k_pool = pool_blocks(ks, layout.block_lengths(c), slots)
    length = jnp.asarray(length, jnp.int32)
    all_own = (jnp.broadcast_to(jnp.arange(c * m, dtype=jnp.int32), (b, h, c * m, c * m)),
               jnp.full((b, h, c * m), c * m, jnp.int32))

    def both(hist_list, own_list):
        o1, l1 = _history_attention(qb, hk, hv, *hist_list, hist_len, layout, cfg)
        o2, l2 = _sgm(qb, kb, vb, *own_list, own_len, layout, cfg, return_lse=True)
        # the kernels' lse is [B, H, T]; the merge takes the row layout [B, T, H] of the outputs
        return layout.from_blocks(merge_partial(o1, l1.transpose(0, 2, 1), o2, l2.transpose(0, 2, 1))[0])

    def memory():
        wh = cfg.window - c  # history frames inside the ALM window
        o_alm = _window_attention(q, k, v, hk, hv, layout, length, wh, attention_backend)
        if not cfg.sgm:  # inference switch: the ALM window alone, nothing retrieved
            return o_alm.astype(q.dtype), no_selection()

        q_pool = pool_blocks(qs, layout.block_lengths(c), slots)
        limit = length - max(wh, 0) if cfg.candidates == "outside_window" else length
        hist_ok = jnp.arange(cap_blocks) < limit * m
        own_ok = jnp.full((c * m,), cfg.candidates == "all")
        cand = jnp.concatenate([hist_ok, own_ok])[None, None, None]
        idx, cnt, ranked = select_blocks(q_pool, (hpool, k_pool), cand, cfg.top_k, ranked=True)
        # Selected ids are ascending and padded with an own-chunk id, so the history ids are a prefix.
        cnt_hist = jnp.minimum((idx < cap_blocks).sum(-1, dtype=jnp.int32), cnt)
        own_idx = jnp.clip(_take_suffix(idx, cnt_hist, cap_blocks), 0, c * m - 1)[..., : min(idx.shape[-1], c * m)]
        if cfg.candidates == "all":
            o_sgm = both((idx, cnt_hist), (own_idx, cnt - cnt_hist))
        else:  # the chunk's own blocks are never candidates: no own-block SGM call (it would attend to nothing)
            o_sgm = layout.from_blocks(_history_attention(qb, hk, hv, idx, cnt_hist, hist_len, layout, cfg)[0])
        o = (o_alm.astype(jnp.float32) + gate.astype(jnp.float32) * o_sgm.astype(jnp.float32)).astype(q.dtype)
        return o, (jnp.where(ranked < cap_blocks, ranked, length * m + ranked - cap_blocks), cnt)

    def no_selection():
        k_sel = min(cfg.top_k, cap_blocks + c * m)
        return jnp.zeros((b, h, c * m, k_sel), jnp.int32), jnp.zeros((b, h, c * m), jnp.int32)

    def dense():
        ids = jnp.broadcast_to(jnp.arange(cap_blocks, dtype=jnp.int32), (b, h, c * m, cap_blocks))
        o = both((ids, jnp.broadcast_to(length * m, (b, h, c * m)).astype(jnp.int32)), all_own)
        return o, no_selection()

    if isinstance(use_memory, (bool, np.bool_)):
        o, selection = memory() if use_memory else dense()
    else:
        o, selection = jax.lax.cond(use_memory, memory, dense)
    return o, (kb, vb, k_pool), selection
