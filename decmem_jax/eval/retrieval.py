"""Retrieval precision of Sparse Global Memory on revisit frames, and the retrieval heatmap, from the commit-pass
selections a DecMem rollout records (the `--diagnostics` file of `python -m decmem_jax.rollout`; its fields are
documented in docs/memory.md).

Selections: ids int [chunks, L, H, C*M, K]: per generated chunk, layer, head and query block (C latents of M
blocks), the K global block ids (latent * M + m) SGM retrieved, best score first; counts int [chunks, L, H, C*M]: how
many of the K are real (the rest is padding).

Precision, for each query latent q that holds a revisit frame (`revisits.Revisits.query_targets`): its relevant
history latents R(q) are those holding a ground-truth source of one of its revisit frames. For every layer, head
and query block of q: top-k precision = (retrieved blocks whose latent is in R(q)) / (blocks retrieved); top-1 =
whether the best-scoring block's latent is in R(q). Both are averaged over heads and the M blocks of q, then over
the query latents of the clip (each weighs the same), per layer.

Two references come with it: `chance`, the precision of a uniformly random choice among the candidates (|R(q)| /
latents before the window start), and `ceiling`, the best top-k precision possible (min(K, |R(q)| M) / K): when a
view was seen in fewer than K latents, even a perfect retrieval fills the rest of its K picks with other blocks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from decmem_jax.eval.revisits import Timeline


@dataclasses.dataclass(frozen=True)
class Precision:
    """Retrieval precision of one clip: per layer (NaN without revisit queries), and the references."""

    top1: np.ndarray  # [L]
    topk: np.ndarray  # [L]
    queries: int  # query latents scored
    chance: float
    ceiling: float

    def to_json(self) -> dict:
        clean = lambda x: None if not np.isfinite(x) else round(float(x), 6)  # noqa: E731
        return {"top1_per_layer": [clean(v) for v in self.top1], "topk_per_layer": [clean(v) for v in self.topk],
                "queries": self.queries, "chance": clean(self.chance), "ceiling": clean(self.ceiling)}


def check_selections(ids, counts, timeline: Timeline, blocks_per_frame: int, what: str = "selections"):
    """(ids, counts) as int arrays of the documented shapes; ValueError naming `what` otherwise."""
    ids, counts = np.asarray(ids), np.asarray(counts)
    if ids.ndim != 5 or counts.shape != ids.shape[:4]:
        raise ValueError(f"{what}: expected ids [chunks, L, H, C*M, K] and counts [chunks, L, H, C*M], got "
                         f"{ids.shape} and {counts.shape}")
    if ids.shape[3] != timeline.chunk * blocks_per_frame:
        raise ValueError(f"{what}: {ids.shape[3]} query blocks per chunk, expected chunk {timeline.chunk} x "
                         f"blocks_per_frame {blocks_per_frame}")
    if counts.min(initial=0) < 0 or counts.max(initial=0) > ids.shape[4]:
        raise ValueError(f"{what}: counts outside [0, K={ids.shape[4]}]")
    return ids.astype(np.int64), counts.astype(np.int64)


def precision(ids, counts, targets: dict[int, np.ndarray], timeline: Timeline, blocks_per_frame: int) -> Precision:
    """Retrieval precision (module docstring) of one clip's selections for the query latents in `targets`."""
    ids, counts = check_selections(ids, counts, timeline, blocks_per_frame)
    m, k_max, layers = blocks_per_frame, ids.shape[4], ids.shape[1]
    top1, topk, chance, ceiling = [], [], [], []
    for q, relevant in targets.items():
        c = int(timeline.chunk_of(q))
        if c >= ids.shape[0]:
            raise ValueError(f"query latent {q} is in chunk {c}, but the selections cover {ids.shape[0]} chunks")
        row = (q - int(timeline.chunk_start(q))) * m
        sel = ids[c, :, :, row:row + m] // m  # [L, H, M, K] latents of the retrieved blocks
        cnt = counts[c, :, :, row:row + m]  # [L, H, M]
        if (cnt == 0).any():
            raise ValueError(f"query latent {q}: a layer retrieved nothing (counts 0); were these selections "
                             "recorded with SGM on?")
        real = np.arange(k_max) < cnt[..., None]
        hit = np.isin(sel, relevant) & real
        topk.append((hit.sum(-1) / cnt).mean(axis=(1, 2)))
        top1.append(hit[..., 0].mean(axis=(1, 2)))
        candidates = int(timeline.window_start(q))
        chance.append(len(relevant) / candidates)
        ceiling.append((np.minimum(cnt, len(relevant) * m) / cnt).mean())
    if not targets:
        nan = np.full(layers, np.nan)
        return Precision(nan, nan.copy(), 0, float("nan"), float("nan"))
    return Precision(np.mean(top1, 0), np.mean(topk, 0), len(targets), float(np.mean(chance)),
                     float(np.mean(ceiling)))


def heatmap(ids, counts, timeline: Timeline, blocks_per_frame: int, history_latents: int) -> np.ndarray:
    """float [chunks, history_latents]: for each generated chunk, the share of all its retrievals (every layer,
    head, query block and pick) that fell on each history latent. Rows sum to 1 (0 for a chunk with none)."""
    ids, counts = check_selections(ids, counts, timeline, blocks_per_frame)
    out = np.zeros((ids.shape[0], history_latents))
    real = np.arange(ids.shape[4]) < counts[..., None]
    for c in range(ids.shape[0]):
        lat = ids[c][real[c]] // blocks_per_frame
        np.add.at(out[c], lat[lat < history_latents], 1.0)
        total = real[c].sum()
        if total:
            out[c] /= total
    return out
