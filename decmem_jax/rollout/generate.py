"""The rollout procedure as a library: a context clip into the memory bank, then generated chunks, segment by segment,
each decoded by the streaming VAE as soon as it lands: a generator of frames.

    segments = generate(dit, vae, frames=context[None], actions=actions[None], poses=poses[None], text=text,
                        settings=SamplerSettings(steps=20), seeds=[0], num_frames=600, chunk=4, segment_chunks=4)
    context = next(segments)          # the memory bank is filled (context.seconds: encode + prefill)
    for segment in segments:          # segment.frames uint8 [B, t, H, W, 3], 4 * chunk * segment_chunks frames
        ...                           # (the last one truncated to num_frames), segment.seconds_per_chunk

1. The context (uint8 frames, or their latents) is VAE-encoded (streaming) and teacher-forced into a fresh KV cache
   at t = 0, chunk by chunk (`engine.prefill`); the streaming decoder's causal cache is warmed on the same latents, so
   the first generated frames follow on from the context.
2. Chunks of `chunk` latents are generated `segment_chunks` per jitted `lax.scan` call (`engine.make_segment_fn`).
   Chunk i of row b draws `engine.chunk_noise(seeds[b], i)`: a row's noise depends neither on the segmentation nor
   on the other rows of its batch. The segments are pipelined: segment s + 1 (denoising, commit, decode) is
   dispatched before segment s's frames are fetched to the host and handed out, so the accelerator works on the next
   segment while the caller writes frames, and its host work (the transfer, the finiteness check, the uint8
   conversion, an mp4 encoder) no longer leaves the device idle between segments. The cost: one segment's float
   pixels stay on the device a segment longer, and a caller that stops early has paid for one segment it never sees.

Three callers, one procedure: `python -m decmem_jax.rollout` (one clip into an mp4) and the memory benchmark's
`eval.variants.Roller` (a batch of clips, several models) iterate `generate`; the interactive `Session`, whose actions
arrive one chunk at a time, drives a `Rollout` (the state between segments) through `Rollout.step` and
`Rollout.decode`. Noise, conditioning slices, the segment call and the decoder steps are thus the same code, and the
same seeds give the same frames on every path.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decmem_jax.format import (FRAMES_PER_LATENT, frames_for_latents, from_model_range, latents_for_frames,
                               to_model_range)
from decmem_jax.rollout import engine
from decmem_jax.rollout.load import RolloutError


def encode(vae, frames: np.ndarray) -> jax.Array:
    """VAE latents [B, L, h, w, z] of uint8 frames [B, T, H, W, 3] (T = 1 + 4k; the streaming encoder, 4 frames a
    step, so a long context never sits in the encoder whole)."""
    from decmem_jax.models import vae_stream

    pixels = jnp.asarray(to_model_range(frames))
    return jnp.concatenate(list(vae_stream.stream_encode(vae, pixels, chunk=4)), axis=1)


def embed_frames(dit, actions, poses, first: int, count: int, first_latent: bool, *, embed=None):
    """Per-latent conditioning [B, n, dim] of frames [first, first + count) of `actions` int [B, T, 8] and `poses`
    float [B, T, 5] (normalised as in training: `pipeline.clip_conditioning`; poses are read only by a
    pose-conditioned model), or None for a model without conditioning. embed: `(dit, actions, poses, first_latent)
    -> conditioning`, default `dit.embed_conditioning` run eagerly (the session passes a jitted one)."""
    cond = dit.cfg.conditioning
    if cond is None:
        return None
    a = jnp.asarray(actions[:, first: first + count])
    p = jnp.asarray(poses[:, first: first + count]) if cond.pose == "added" else None
    if embed is None:
        return dit.embed_conditioning(a, p, first_latent=first_latent)
    return embed(dit, a, p, first_latent)


def segment_noise(seeds: Sequence[int], first: int, n: int, shape) -> jax.Array:
    """Noise [n, B, C, h, w, z] of chunks first .. first + n - 1, one row per seed; shape: one row's (1, C, h, w, z)."""
    return jnp.stack([jnp.concatenate([engine.chunk_noise(seed, i, shape) for seed in seeds])
                      for i in range(first, first + n)])


def to_host(x) -> np.ndarray:
    """A device array on the host (blocks until it is computed); one name for every fetch, so that a test can see
    when the rollout waits for the device."""
    return np.asarray(x)


def warm_decoder(vae, latents: jax.Array, *, piece: int = 4):
    """(streaming decoder state after the context latents [B, L, h, w, z], their pixels as a list of device pieces
    [B, t, H, W, 3] in [-1, 1]). Latent 0 first, then the rest `piece` latents a call (what is left over after
    whole pieces goes first): a long context never sits in the decoder whole (at 352x640, 55 latents in one call
    took 40 GB and minutes of compilation on an H200), and the compiled step is the one that then decodes the
    generated latents `piece` at a time (`generate`: the chunk; the play session: 1)."""
    from decmem_jax.models import vae_stream

    if int(piece) < 1:
        raise ValueError(f"warm_decoder: piece={piece!r}; expected a positive number of latents")
    first, step = vae_stream.decode_steps(vae)
    state, pixels = first(vae_stream.init_decode_state(vae, latents.shape[0], tuple(latents.shape[2:4])),
                          latents[:, :1])
    pieces = [pixels]
    rest = latents.shape[1] - 1
    starts = [1] + list(range(1 + rest % piece, latents.shape[1], piece))
    for s, e in zip(starts, starts[1:] + [latents.shape[1]]):
        if e > s:
            state, pixels = step(state, latents[:, s:e])
            pieces.append(pixels)
    return state, pieces


class Rollout:
    """A rollout between segments: the memory bank (the KV cache) and the streaming decoder's causal cache, each
    donated to and replaced by every call, and the number of chunks generated so far (the next chunk's noise
    index). One row per seed."""

    def __init__(self, dit, vae, cache, decoder, *, text, seeds: Sequence[int], chunk: int, grid: tuple[int, int],
                 segment_fn, shard=None):
        from decmem_jax.models import vae_stream

        self.dit, self.cache, self.decoder, self.text, self.segment_fn = dit, cache, decoder, text, segment_fn
        self.shard = shard  # a mesh placement (dit and cache on its mesh; the VAE on the default device) or None
        self.seeds, self.chunk, self.grid = [int(s) for s in seeds], int(chunk), tuple(grid)
        self.chunks = 0
        self._decode = vae_stream.decode_steps(vae)[1]

    def step(self, conds, n: int):
        """Generates and commits chunks `chunks` .. `chunks` + n - 1 under conds [n, B, C, dim] (None: a model
        without conditioning). Returns (latents [B, n * C, h, w, z] in video order, the segment's SGM selection
        (ids [n, L, B, H, C*M, K], counts) as device arrays, or None when segment_fn was made without it)."""
        noises = segment_noise(self.seeds, self.chunks, n, (1, self.chunk, *self.grid, self.dit.cfg.in_channels))
        if self.shard is not None:
            noises, conds = self.shard.replicate((noises, conds))
        result = self.segment_fn(self.dit, self.cache, noises, self.text, conds)
        new, self.cache = result[0], result[1]
        if self.shard is not None:  # the VAE decodes on the default device
            new = self.shard.to_host_device(new)
        self.chunks += n
        latents = new.transpose(1, 0, 2, 3, 4, 5).reshape(new.shape[1], n * self.chunk, *new.shape[3:])
        return latents, (result[2] if len(result) > 2 else None)

    def decode_async(self, latents) -> jax.Array:
        """float32 pixels [B, 4n, H, W, 3] in [-1, 1] of the next latents [B, n, h, w, z], as a device array: the
        decode is dispatched, not awaited."""
        self.decoder, pixels = self._decode(self.decoder, latents)
        return pixels

    def decode(self, latents) -> np.ndarray:
        """`decode_async`, fetched to the host."""
        return to_host(self.decode_async(latents))


@dataclasses.dataclass
class Segment:
    """What `generate` yields: first the context, then each segment of generated chunks."""

    frames: np.ndarray | None  # [B, t, H, W, 3] uint8, or float32 in [-1, 1] with raw=True; the context's only with
    #                            include_context=True
    chunks: range  # the generated chunks it holds (0 = the first after the context); empty for the context
    seconds: float  # wall time: the context's encode and prefill, or what the segment added to the generation's
    #                 wall time (its generation and decode, pipelined with the caller's work on the previous one)
    selection: tuple | None = None  # numpy (ids [n, L, B, H, C*M, K], counts [n, L, B, H, C*M]), with_selection

    @property
    def seconds_per_chunk(self) -> float:
        return self.seconds / max(len(self.chunks), 1)


def generate(dit, vae, *, frames=None, latents=None, actions=None, poses=None, text, seeds: Sequence[int],
             num_frames: int, chunk: int, segment_chunks: int, settings: engine.SamplerSettings | None = None,
             segment_fn=None, capacity: int = 0, pad_segments: bool = False, embed_all: bool = False,
             decoder=None, with_selection: bool = False, include_context: bool = False, raw: bool = False,
             progress: Callable[[int], None] | None = None, shard=None, pipeline: bool = True) -> Iterator[Segment]:
    """Rolls out B = len(seeds) rows for `num_frames` frames after their context (module docstring).

    frames uint8 [B, T, H, W, 3] or latents [B, L, h, w, z]: the context. actions int [B, T', 8] / poses float
    [B, T', 5]: normalised (`pipeline.clip_conditioning`), from the context's first frame, covering every chunk run
    (ignored by a model without conditioning). text [B or 1, L, text_dim]. settings: the sampler, or segment_fn: an
    `engine.make_segment_fn(settings, with_selection=...)` to reuse across calls (nnx.jit compiles once per
    function). capacity: the KV cache's length in latents (0: exactly context + generated chunks).

    pad_segments: every segment runs `segment_chunks` chunks, the frames past num_frames dropped (one compilation
    for any length; the cache holds the padding; actions must cover it). embed_all: the conditioning of every chunk
    run is embedded in one call before the first segment rather than per segment (one dispatch for a batch; a
    matmul over other row counts may round differently, so the two ways can differ in the last bits). decoder: a
    warm decoder state (`warm_decoder`) to start from, e.g. shared by several models rolling out one context;
    copied, since the decoder steps donate it.
    include_context: the first Segment carries the VAE-reconstructed context. raw: float frames, not uint8.
    progress(n): called with the latents committed after each prefill chunk. shard: a mesh placement
    (`decmem_jax.parallel.rollout.RolloutMesh`, dit already sharded by it; a given segment_fn must be made with it):
    the cache is created on its mesh and the inputs are replicated there; the VAE stays on the default device.
    pipeline=False: each segment's frames are fetched before the next segment is dispatched (the unpipelined order,
    for comparison: benchmarks/rollout_e2e.py).

    Not a generator function itself: bad arguments raise here, before any work. Non-finite frames raise
    RolloutError naming the segment's chunks."""
    if (frames is None) == (latents is None):
        raise ValueError("generate: pass the context as frames or as latents (exactly one)")
    if settings is None and segment_fn is None:
        raise ValueError("generate: pass settings or segment_fn")
    if include_context and decoder is not None:
        raise ValueError("generate: include_context decodes the context, a given decoder skips that")
    rows = (frames if latents is None else latents).shape[0]
    if len(seeds) != rows:
        raise ValueError(f"generate: {len(seeds)} seeds for {rows} context rows")
    chunk, segment_chunks = int(chunk), int(segment_chunks)
    frames_per_chunk = FRAMES_PER_LATENT * chunk
    n_chunks = -(-num_frames // frames_per_chunk)
    n_run = -(-n_chunks // segment_chunks) * segment_chunks if pad_segments else n_chunks
    ctx_latents = latents_for_frames(frames.shape[1]) if latents is None else latents.shape[1]
    ctx_frames = frames_for_latents(ctx_latents)
    needed = ctx_latents + n_run * chunk
    if capacity and capacity < needed:
        raise RolloutError(f"capacity {capacity} < context latents {ctx_latents} + generated {n_run * chunk}")
    if segment_fn is None:
        segment_fn = engine.make_segment_fn(settings, with_selection=with_selection, shard=shard)
    text = jnp.asarray(text) if shard is None else shard.replicate(jnp.asarray(text))

    def out(pixels):
        return pixels if raw else from_model_range(pixels)

    def segments():
        # 1. The memory bank.
        t0 = time.perf_counter()
        context = encode(vae, frames) if latents is None else latents
        cache = dit.init_cache(context.shape[0], capacity or needed, tuple(context.shape[2:4]))
        bank = context
        if shard is not None:
            cache, bank = shard.place_cache(cache), shard.replicate(context)
        cache = engine.prefill(dit, cache, bank, text, embed_frames(dit, actions, poses, 0, ctx_frames, True),
                               chunk=chunk, progress=progress, shard=shard)
        del bank
        jax.block_until_ready(cache.length)
        prefill_seconds = time.perf_counter() - t0
        if decoder is None:
            state, pieces = warm_decoder(vae, context, piece=chunk)
        else:
            state, pieces = jax.tree.map(jnp.copy, decoder), None
        rollout = Rollout(dit, vae, cache, state, text=text, seeds=seeds, chunk=chunk, grid=context.shape[2:4],
                          segment_fn=segment_fn, shard=shard)
        shown = out(np.concatenate([np.asarray(p) for p in pieces], axis=1)) if include_context else None
        del pieces  # the context's pixels leave the device before the first segment needs the room
        yield Segment(shown, range(0), prefill_seconds)

        # 2. The generated chunks, a segment at a time.
        if embed_all:
            every = embed_frames(dit, actions, poses, ctx_frames, n_run * frames_per_chunk, False)
            if every is not None:  # [B, n_run * C, dim] -> [n_run, B, C, dim]
                every = every.reshape(every.shape[0], n_run, chunk, -1).transpose(1, 0, 2, 3)
        done, pending, t_ready = 0, None, time.perf_counter()

        def finish(s, n, pixels, selection):
            # The segment's frames on the host. Its wall time runs from the previous segment's frames (or the start
            # of generation) to its own: with the segments pipelined, the sum over segments is the generation's
            # wall time, and each one is what the segment adds to it.
            nonlocal done, t_ready
            pixels = to_host(pixels)
            now = time.perf_counter()
            seconds, t_ready = now - t_ready, now
            if not np.isfinite(pixels).all():
                raise RolloutError(f"non-finite frames generated in chunks {s}..{s + n - 1} (check the checkpoint "
                                   f"and settings)")
            take = min(pixels.shape[1], num_frames - done)
            done += take
            return Segment(out(pixels[:, :take]), range(s, s + n), seconds,
                           None if selection is None else tuple(to_host(x) for x in selection))

        for s in range(0, n_chunks, segment_chunks):
            n = segment_chunks if pad_segments else min(segment_chunks, n_chunks - s)
            if embed_all:
                conds = None if every is None else every[s:s + n]
            else:
                per_chunk = [embed_frames(dit, actions, poses, ctx_frames + frames_per_chunk * i, frames_per_chunk,
                                          False) for i in range(s, s + n)]
                conds = None if per_chunk[0] is None else jnp.stack(per_chunk)
            new, selection = rollout.step(conds, n)
            dispatched = (s, n, rollout.decode_async(new), selection)
            if pending is not None:  # the previous segment, fetched while the device works on this one
                yield finish(*pending)
            pending = dispatched
            if not pipeline:
                yield finish(*pending)
                pending = None
        if pending is not None:
            yield finish(*pending)

    return segments()
