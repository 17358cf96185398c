"""The five variants of the memory benchmark, built from two checkpoints, and their batched rollouts.

    decmem        the stage-3 DecMem model: o = o_alm + G * o_sgm
    alm_only      the same weights with SGM switched off (MemoryConfig.sgm=False): o = o_alm, the ALM window alone
    dense_full    the stage-2 dense block-causal model attending to the whole history (token-major KV cache)
    dense_window  the stage-2 dense weights in a DecMem model with SGM off and zero gates: dense attention over the
                  ALM window only (same window, chunk and cache layout as ALM; tests/test_eval_variants.py checks it
                  against a dense model under a sliding-window mask)
    copy_last     the last context frame, repeated (no model)

Every model variant rolls out the same clips under the clips' own actions (and poses), from the same VAE-encoded
context, with the same per-clip noise: chunk i of clip n uses `engine.chunk_noise(seed + n, i, ...)`, so a clip's
noise does not depend on which clips share its batch. Several clips run in one forward (`batch` clips, each with its
own cache row; the last batch is padded with copies), and every model compiles its segment function once: the
segments all have `segment_chunks` chunks (the cache has room for the padding chunks past the last one, whose frames
are dropped).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decmem_jax.errors import DecMemError
from decmem_jax.eval.revisits import Timeline
from decmem_jax.rollout.load import architecture_differences, with_memory

VARIANTS = ("decmem", "alm_only", "dense_full", "dense_window", "copy_last")
MODEL_VARIANTS = VARIANTS[:4]


class VariantError(DecMemError, ValueError):
    """A checkpoint that cannot make the requested variant; the message names it."""


def dense_in_window(dense, memory):
    """The dense model's parameters in a DecMem model (`memory` with SGM off): ALM's window over dense weights. The
    DecMem model is built concretely so that its gates (absent from the dense checkpoint) keep their zero init."""
    from decmem_jax.models.dit import WanDiT

    if dense.cfg.memory is not None:
        raise VariantError("dense_in_window needs a dense model (DiTConfig.memory None)")
    model = WanDiT(dense.cfg.replace(memory=dataclasses.replace(memory, sgm=False)), rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(dense))
    gates = nnx.state(model.blocks.gate, nnx.Param)
    if any(float(jnp.abs(g).max()) != 0.0 for g in jax.tree.leaves(gates)):
        raise VariantError("dense_window: the DecMem gates are not zero after loading the dense weights")
    return model


def load_models(c, dense_checkpoint: str, names) -> tuple[dict, object]:
    """({variant: WanDiT} for the model variants in `names`, VAE) from the run config `c` (its checkpoint: stage 3,
    vae_checkpoint, model.memory settings, rollout.dtype) and the stage-2 `dense_checkpoint`."""
    from decmem_jax.convert.vae import load_vae
    from decmem_jax.run_config import dit_config, runtime_overrides
    from decmem_jax.weights import load_model

    dtype = c.rollout.dtype
    run_cfg = dit_config(c, inference=True)
    overrides = runtime_overrides(run_cfg)
    models, decmem, memory = {}, None, None
    if {"decmem", "alm_only", "dense_window"} & set(names):  # dense_window takes the DecMem model's memory layout
        decmem = load_model(c.checkpoint, **overrides)
        if decmem.cfg.memory is None:
            raise VariantError(f"config.checkpoint {c.checkpoint}: a dense model; decmem and alm_only need a stage-3 "
                               "DecMem checkpoint")
        memory = run_cfg.memory or decmem.cfg.memory
        if memory != decmem.cfg.memory:  # e.g. --config.model.memory.top_k=16: same parameters
            decmem = with_memory(decmem, memory)
        if "decmem" in names:
            models["decmem"] = decmem
        if "alm_only" in names:
            models["alm_only"] = with_memory(decmem, dataclasses.replace(memory, sgm=False))
    if {"dense_full", "dense_window"} & set(names):
        dense = load_model(dense_checkpoint, **overrides)
        if dense.cfg.memory is not None:
            raise VariantError(f"--dense_checkpoint {dense_checkpoint}: a DecMem model; dense_full and dense_window "
                               "need the stage-2 dense checkpoint")
        if decmem is not None:
            differ = architecture_differences(dense.cfg, decmem.cfg, names=("dense", "decmem"))
            if differ:
                raise VariantError(f"--dense_checkpoint {dense_checkpoint}: its architecture differs from "
                                   f"config.checkpoint {c.checkpoint} ({'; '.join(differ)})")
        if "dense_full" in names:
            models["dense_full"] = dense
        if "dense_window" in names:
            models["dense_window"] = dense_in_window(dense, memory)
    vae = load_vae(c.vae_checkpoint, **({} if dtype == "auto" else {"dtype": dtype}))
    return models, vae


@dataclasses.dataclass
class ClipBatch:
    """Up to `batch` clips rolled out together. context: uint8 [B, context_frames, H, W, 3]; actions int32 [B, T, 8]
    and poses float32 [B, T, 5] normalised as in training (`pipeline.clip_conditioning`), T covering the context,
    the generated frames and the padding chunks; seeds: the noise seed of each clip; real: how many rows are clips
    (the rest repeat the last one)."""

    context: np.ndarray
    actions: np.ndarray
    poses: np.ndarray
    seeds: list[int]
    real: int


def make_batch(clips: list[dict], batch: int, frames_needed: int) -> ClipBatch:
    """clips: dicts with "context" uint8 [Tc, H, W, 3], "actions" [T, 8], "poses" [T, 5] (raw), "seed"."""
    from decmem_jax.data.pipeline import clip_conditioning

    if not 1 <= len(clips) <= batch:
        raise ValueError(f"a batch holds 1..{batch} clips, got {len(clips)}")
    rows = clips + [clips[-1]] * (batch - len(clips))
    acts, poses = [], []
    for clip in rows:
        a, p = clip_conditioning(clip["actions"], clip["poses"])
        pad = max(0, frames_needed - len(a))  # padding chunks only: their frames are dropped
        acts.append(np.concatenate([a, np.repeat(a[-1:], pad, 0)])[:frames_needed])
        poses.append(np.concatenate([p, np.repeat(p[-1:], pad, 0)])[:frames_needed])
    return ClipBatch(np.stack([r["context"] for r in rows]), np.stack(acts), np.stack(poses),
                     [int(r["seed"]) for r in rows], len(clips))


class Roller:
    """Rolls out clip batches for any model variant with one settings: segment functions are made once and reused
    (nnx.jit compiles once per model graph and batch size)."""

    def __init__(self, settings, timeline: Timeline, segment_chunks: int, lat_hw: tuple[int, int], text_context):
        from decmem_jax.rollout import engine

        self.settings, self.timeline, self.segment_chunks, self.lat_hw = settings, timeline, segment_chunks, lat_hw
        self.text = np.asarray(text_context, np.float32)  # [1, L, text_dim]
        self._segments = {flag: engine.make_segment_fn(settings, with_selection=flag) for flag in (False, True)}

    def padded_chunks(self, num_frames: int) -> int:
        n = self.timeline.num_chunks(num_frames)
        return -(-n // self.segment_chunks) * self.segment_chunks

    def frames_needed(self, num_frames: int) -> int:
        """Action rows a batch needs: context + every (padded) generated chunk."""
        return self.timeline.context_frames + self.padded_chunks(num_frames) * self.timeline.frames_per_chunk

    def run(self, model, vae, batch: ClipBatch, latents: jax.Array, num_frames: int, *, decoder=None,
            with_selection=False, progress=None):
        """(frames uint8 [real, num_frames, H, W, 3], selections (ids [chunks, L, real, H, C*M, K], counts) or None).
        latents: the batch's encoded context (`rollout.generate.encode`); decoder: its warm decoder state
        (`rollout.generate.warm_decoder`, shared by the variants of a batch; made here when None). progress(n):
        called with the frames done after each segment."""
        from decmem_jax.rollout.generate import generate

        b = batch.context.shape[0]
        segments = generate(
            model, vae, latents=latents, actions=batch.actions, poses=batch.poses,
            text=np.repeat(self.text, b, axis=0), seeds=batch.seeds, num_frames=num_frames, chunk=self.timeline.chunk,
            segment_chunks=self.segment_chunks, segment_fn=self._segments[bool(with_selection)],
            # Padded segments: one compilation per model whatever num_frames; the whole span's conditioning embedded
            # at once: one dispatch for the batch.
            pad_segments=True, embed_all=True, decoder=decoder)
        next(segments)  # the memory bank
        out, ids, counts = [], [], []
        for segment in segments:
            out.append(segment.frames[:batch.real])
            if with_selection:
                ids.append(segment.selection[0])
                counts.append(segment.selection[1])
            if progress is not None:
                progress(segment.frames.shape[1] * batch.real)
        frames = np.concatenate(out, axis=1)
        if not with_selection:
            return frames, None
        n_chunks = self.timeline.num_chunks(num_frames)
        ids = np.concatenate(ids)[:n_chunks, :, :batch.real]
        counts = np.concatenate(counts)[:n_chunks, :, :batch.real]
        return frames, (ids, counts)

    def teacher_forced(self, model, batch: ClipBatch, latents: jax.Array):
        """SGM selections (ids [chunks, L, real, H, C*M, K], counts) when the TRUE continuation is committed chunk by
        chunk on the rollout's timeline: what SGM retrieves for the right content, apart from the model's drift.
        latents: the encoded truth, context first, then whole chunks (context_latents + chunks * C latents)."""
        from decmem_jax.rollout import engine

        tl, cfg = self.timeline, model.cfg
        b, chunk = latents.shape[0], tl.chunk
        n = (latents.shape[1] - tl.context_latents) // chunk
        text = jnp.asarray(np.repeat(self.text, b, axis=0))
        conds = None
        if cfg.conditioning is not None:
            frames = tl.context_frames + n * tl.frames_per_chunk
            p = jnp.asarray(batch.poses[:, :frames]) if cfg.conditioning.pose == "added" else None
            conds = model.embed_conditioning(jnp.asarray(batch.actions[:, :frames]), p)
        ctx = tl.context_latents
        cache = model.init_cache(b, ctx + n * chunk, self.lat_hw)
        cache = engine.prefill(model, cache, latents[:, :ctx], text, None if conds is None else conds[:, :ctx],
                               chunk=chunk)
        ids, counts = [], []
        for c in range(n):
            rows = slice(ctx + c * chunk, ctx + (c + 1) * chunk)
            cache, (i, k) = _commit_with_selection()(model, latents[:, rows], jnp.zeros((b, chunk)), text, cache,
                                                     None if conds is None else conds[:, rows])
            ids.append(np.asarray(i))
            counts.append(np.asarray(k))
        return np.stack(ids)[:, :, :batch.real], np.stack(counts)[:, :, :batch.real]


@functools.cache
def _commit_with_selection():
    @functools.partial(nnx.jit, donate_argnums=(4,))
    def commit(model, x, t, context, cache, cond):
        _, cache, selection = model.commit(x, t, context, cache, cond=cond, with_selection=True)
        return cache, selection

    return commit
