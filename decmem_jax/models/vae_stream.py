"""Streaming encode/decode for the Wan2.1 VAE: chunk by chunk, with a fixed-size cache (bounded memory).

`stream_decode` turns normalised latents (one array, or an iterable of pieces) into pixel frames and yields them as
soon as they are ready; `stream_encode` does the reverse. Both reproduce `WanVAE.encode` / `WanVAE.decode` of the
whole clip (same function, float rounding aside) while holding only the cache and one chunk, so a minute of video
(600 frames at 352x640) never has to exist at once. Lower-level pieces, for callers that drive the loop themselves
(e.g. a rollout that decodes each generated chunk): `init_decode_state` / `init_encode_state` and `decode_steps` /
`encode_steps`, which return the jitted `(state, chunk) -> (state, out)` warm-up and steady-state steps.

Streaming
---------
The whole-sequence formulation (`docs/method.md` §3) makes every part of the VAE causal in time:
channel norms, SiLU, 1x1 convolutions, the spatial resample convolutions and the attention blocks act on each frame alone,
and each kernel-3 `CausalConv3d` computes output frame t from input frames t-2, t-1, t (zeros before frame 0). So
the cache (a dict `StreamCache`, key = the conv's module path, fixed shapes) holds:

* every kernel-3 CausalConv3d (conv_in, both convs of every residual block, conv_out, and upsample3d's `time_conv`):
  the last 2 frames of its input, [B, 2, h, w, C_in], initially zeros. A chunk is convolved with those 2 frames in
  front instead of the zero padding (`CausalConv3d(x, cache=...)`), which gives exactly the outputs the whole
  sequence gives at those positions; the new cache is the last 2 frames of cache ++ chunk (also right for 1-frame
  chunks). 1x1 convolutions (shortcuts, quant/post-quant) need no cache.
* downsample3d (encoder): `time_conv` is kernel 3, stride 2, unpadded over the spatially downsampled sequence y, with
  y[0] passed through: out = y[0], tc(y0 y1 y2), tc(y2 y3 y4), ... Window j starts at y[2j], the last frame of the
  previous window, so the state is 1 frame, [B, 1, h, w, C]: the warm-up stores y[0] and emits it; a steady step
  convolves y_prev ++ chunk (an even number of frames, 2m) into m frames and keeps the chunk's last frame.
* upsample3d (decoder): frame 0 bypasses `time_conv`, frames 1.. form their own causal sequence with 2 leading
  zeros. The warm-up passes frame 0 through and leaves the (zero) time_conv cache as it is; steady steps run every
  frame through time_conv with its 2-frame cache, each giving 2 interleaved frames.

A step is the VAE's own forward: `WanVAE.encode` / `decode` given a `vae_blocks.StreamStep` (the old cache, the warm-up
flag) hand it down the blocks, which read and write their entries. So the first frame is special only in the temporal
resamplers: the warm-up step (`first=True`, exactly one frame:
latent 0 -> pixel frame 0, or pixel frame 0 -> latent 0) is compiled once, and the steady step, whose cache pytree
has the same shapes and dtypes at every call, is compiled once per chunk size. Steady steps take `chunk` latent
frames (decode, -> 4*chunk pixel frames) or `chunk` pixel frames (encode, a multiple of 4, -> chunk/4 latents). A
last chunk that is short is zero-padded to `chunk` frames and the outputs of the padding are dropped: everything is
causal, so the padding cannot change earlier outputs (it only spoils the cache, which is discarded), and the step is
not recompiled for the tail. This is what the reference's chunked mode (`feat_cache`, CACHE_T = 2) computes, minus
its "Rep" marker and 1-frame special cases, which the fixed-shape zero-initialised cache makes unnecessary.

Cache size: sum over the cached convs of B * frames * h * w * C_in * itemsize (frames = 2, or 1 for downsample3d).
For the real VAE at 352x640 in float32, per batch element: decode 32 caches, 2,130,698,240 bytes (1.98 GiB; the 7
full-resolution 96-channel convs alone are 7 x 165 MiB); encode 24 caches, 1,265,172,480 bytes (1.18 GiB). bfloat16
halves that; `state_nbytes` reports it. One steady step's activations come on top.

The step functions donate their `state` argument (the old cache buffers are reused for the new one): do not reuse a
state after passing it to a step.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decmem_jax.models.vae import WanVAE
from decmem_jax.models.vae_blocks import StreamCache, StreamStep

Step = Callable[[StreamCache, jax.Array], tuple[StreamCache, jax.Array]]

# Incremented when a step function is traced (= compiled, for a new shape); tests use it to check compile counts.
TRACE_COUNTS: collections.Counter = collections.Counter()


# --------------------------------------------------------------------------------------------------------------------
# One step: the VAE's own modules, given a StreamStep (traced inside the jitted steps)
# --------------------------------------------------------------------------------------------------------------------

def _encode_chunk(graphdef, params, state, frames, first):
    step = StreamStep(state, first)
    latents = nnx.merge(graphdef, params).encode(frames, step)
    return step.new, latents


def _decode_chunk(graphdef, params, state, latents, first):
    step = StreamStep(state, first)
    frames = nnx.merge(graphdef, params).decode(latents, step)
    return step.new, frames


def _counted(fn, kind):
    def run(params, state, x, *, graphdef, first):
        TRACE_COUNTS[f"{kind}_{'first' if first else 'step'}"] += 1
        return fn(graphdef, params, state, x, first)
    return jax.jit(run, static_argnames=("graphdef", "first"), donate_argnames=("state",))


_ENCODE_JIT = _counted(_encode_chunk, "encode")
_DECODE_JIT = _counted(_decode_chunk, "decode")


# --------------------------------------------------------------------------------------------------------------------
# State and steps
# --------------------------------------------------------------------------------------------------------------------

def _init_state(fn, vae: WanVAE, shape: tuple[int, ...]) -> StreamCache:
    graphdef, params = nnx.split(vae)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    layout, _ = jax.eval_shape(lambda p, x: fn(graphdef, p, None, x, True), params, x)
    return {k: jnp.zeros(s.shape, s.dtype) for k, s in layout.items()}


def init_encode_state(vae: WanVAE, batch: int, hw: tuple[int, int]) -> StreamCache:
    """Zero cache for encoding video of `batch` x (H, W) = `hw` pixels (both divisible by the spatial factor 8)."""
    h, w = hw
    sf = vae.cfg.spatial_factor
    if h % sf or w % sf:
        raise ValueError(f"video is {h}x{w}; height and width must be divisible by {sf}")
    return _init_state(_encode_chunk, vae, (batch, 1, h, w, vae.cfg.in_channels))


def init_decode_state(vae: WanVAE, batch: int, hw: tuple[int, int]) -> StreamCache:
    """Zero cache for decoding latents of `batch` x (h, w) = `hw` (the latent grid, 1/8 of the pixels)."""
    return _init_state(_decode_chunk, vae, (batch, 1, *hw, vae.cfg.z_dim))


def state_nbytes(state: StreamCache) -> int:
    """Bytes held by a cache (works on arrays and on `jax.eval_shape` results)."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in state.values())


def _steps(jitted, vae: WanVAE) -> tuple[Step, Step]:
    graphdef, params = nnx.split(vae)
    return (functools.partial(jitted, params, graphdef=graphdef, first=True),
            functools.partial(jitted, params, graphdef=graphdef, first=False))


def encode_steps(vae: WanVAE) -> tuple[Step, Step]:
    """(first, step): `first(state, frames[B, 1, H, W, 3])` encodes pixel frame 0 (-> 1 latent); `step(state,
    frames[B, 4m, H, W, 3])` the following frames (-> m latents). Both return (new state, normalised latents) and
    donate `state`."""
    return _steps(_ENCODE_JIT, vae)


def decode_steps(vae: WanVAE) -> tuple[Step, Step]:
    """(first, step): `first(state, latents[B, 1, h, w, z])` decodes latent 0 (-> 1 pixel frame); `step(state,
    latents[B, n, h, w, z])` the following latents (-> 4n frames). Both return (new state, frames in [-1, 1]) and
    donate `state`."""
    return _steps(_DECODE_JIT, vae)


# --------------------------------------------------------------------------------------------------------------------
# Streaming drivers
# --------------------------------------------------------------------------------------------------------------------

def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, jax.Array))


def _concat(parts: list) -> jax.Array | np.ndarray:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts, axis=1)
    return jnp.concatenate([jnp.asarray(p) for p in parts], axis=1)


def _pad_frames(x, n: int):
    zeros = (np.zeros if isinstance(x, np.ndarray) else jnp.zeros)((x.shape[0], n, *x.shape[2:]), x.dtype)
    return _concat([x, zeros])


class _FrameQueue:
    """Pending input frames as a list of pieces (never concatenated beyond what one step takes)."""

    def __init__(self):
        self.parts: collections.deque = collections.deque()
        self.n = 0

    def push(self, piece) -> None:
        self.parts.append(piece)
        self.n += piece.shape[1]

    def take(self, n: int):
        out = []
        while n:
            piece = self.parts[0]
            if piece.shape[1] <= n:
                out.append(self.parts.popleft())
                n -= piece.shape[1]
                self.n -= piece.shape[1]
            else:
                out.append(piece[:, :n])
                self.parts[0] = piece[:, n:]
                self.n -= n
                n = 0
        return _concat(out)


def _stream(what: str, pieces: Iterable, *, chunk: int, channels: int, first: Step, step: Step,
            init: Callable[[int, tuple[int, int]], StreamCache], out_frames: Callable[[int], int],
            leftover: Callable[[int], int], chunk_unit: int) -> Iterator[jax.Array]:
    queue, state, ref, total = _FrameQueue(), None, None, 0
    for i, piece in enumerate(pieces):
        if not _is_array(piece):
            piece = np.asarray(piece)
        if piece.ndim != 5 or piece.shape[-1] != channels:
            raise ValueError(f"{what}: piece {i} has shape {tuple(piece.shape)}; expected [B, n, H, W, {channels}]")
        key = (piece.shape[0], *piece.shape[2:4])
        if ref is None:
            ref = key
        elif key != ref:
            raise ValueError(f"{what}: piece {i} has batch/height/width {key}, earlier pieces {ref}")
        if piece.shape[1] == 0:
            continue
        queue.push(piece)
        total += piece.shape[1]
        if state is None:
            state, out = first(init(ref[0], ref[1:]), queue.take(1))
            yield out
        while queue.n >= chunk:
            state, out = step(state, queue.take(chunk))
            yield out
    if state is None:
        raise ValueError(f"{what}: got no frames")
    n = queue.n - leftover(total)
    if n:  # short last chunk: zero-pad to `chunk` (no recompile); causality keeps the real outputs exact
        _, out = step(state, _pad_frames(queue.take(n), chunk - n))
        yield out[:, : out_frames(n)]
    if leftover(total):
        raise ValueError(f"{what}: the pieces held T={total} frames; the VAE needs T = 1 + {chunk_unit}k "
                         f"({leftover(total)} trailing frames cannot form a latent and were not encoded)")


def _as_pieces(x, chunk: int) -> Iterator:
    """An array [B, T, ...] as pieces: frame 0, then `chunk` frames at a time (slices, so a host array stays on the
    host until each piece is used)."""
    yield x[:, :1]
    for s in range(1, x.shape[1], chunk):
        yield x[:, s: s + chunk]


def stream_decode(vae: WanVAE, latents, *, chunk: int = 1) -> Iterator[jax.Array]:
    """latents: normalised [B, F, h, w, z] array, or an iterable of [B, n, h, w, z] pieces (any n >= 1).
    Yields decoded pixel frames [B, t, H, W, 3] float32 in [-1, 1] as soon as they are ready: the first latent
    frame gives 1 pixel frame, every later latent frame 4; processing `chunk` latent frames per step.

    Array input is checked when called; pieces are checked as they arrive. Not a generator function itself, so bad
    arguments raise here rather than at the first `next`."""
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"stream_decode: chunk={chunk!r}; expected a positive number of latent frames")
    z_dim, tf = vae.cfg.z_dim, vae.cfg.temporal_factor
    if _is_array(latents):
        vae._check_latents(latents)
        latents = _as_pieces(latents, chunk)
    first, step = decode_steps(vae)
    return _stream("stream_decode", latents, chunk=int(chunk), channels=z_dim, first=first, step=step,
                   init=lambda b, hw: init_decode_state(vae, b, hw), out_frames=lambda n: tf * n,
                   leftover=lambda total: 0, chunk_unit=1)


def stream_encode(vae: WanVAE, frames, *, chunk: int = 4) -> Iterator[jax.Array]:
    """frames: [B, T, H, W, 3] in [-1, 1] (T = 1 + 4k), or an iterable of [B, n, H, W, 3] pieces. Yields normalised
    latents [B, m, h, w, z]: the first pixel frame gives 1 latent, every later 4 pixel frames 1 latent.

    `chunk` pixel frames (a multiple of 4) are encoded per step. An array whose T is not 1 + 4k raises ValueError
    when called; for an iterable, a total that leaves frames over raises ValueError once the iterable is exhausted
    (after the complete latents have been yielded)."""
    tf = vae.cfg.temporal_factor
    if not isinstance(chunk, (int, np.integer)) or chunk < tf or chunk % tf:
        raise ValueError(f"stream_encode: chunk={chunk!r}; expected a positive multiple of {tf} pixel frames")
    if _is_array(frames):
        vae._check_video(frames)  # T = 1 + 4k, channels, spatial size: known before any work is done
        frames = _as_pieces(frames, chunk)
    first, step = encode_steps(vae)
    return _stream("stream_encode", frames, chunk=int(chunk), channels=vae.cfg.in_channels, first=first,
                   step=step, init=lambda b, hw: init_encode_state(vae, b, hw), out_frames=lambda n: n // tf,
                   leftover=lambda total: (total - 1) % tf, chunk_unit=tf)
