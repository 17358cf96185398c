"""Softmax attention behind one config field.

Backends:
- `xla`: plain einsum + float32 softmax; any dtype, any platform; the reference.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`: fused flash attention on NVIDIA GPUs, bf16/fp16.
- `mosaic`: jax's Pallas Mosaic-GPU flash attention (`attention_mgpu`, H100/H200, bf16/fp16, forward only, for
  inference) for unmasked attention, made exact for any length (see `attention_mgpu.py`); attention with a key-length
  mask (the KV-cache history) has no Mosaic kernel yet and runs on cuDNN.
- `auto`: cudnn on GPU for bf16/fp16, xla otherwise; the choice is logged once.

Masks: a valid-key prefix length (`kv_length`) covers padding and the KV cache. A frame-level pattern (block-causal,
teacher forcing) runs as ONE call with a materialised boolean mask while the score matrix is small
(`frame_masked_attention`, up to `MASK_LIMIT` query x key pairs: small models, where one call per chunk would leave the
GPU idle between tiny kernels), and as a loop over query chunks beyond that (each chunk attends to the key prefix that
ends with its own chunk), which never builds an S x S matrix.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from decmem_jax.models.attention_mgpu import mosaic_attention
from decmem_jax.models.attention_ops import cudnn_attention, merge_partial, xla_attention

log = logging.getLogger(__name__)
_announced: set[str] = set()
# Query x key pairs up to which a frame-level mask is materialised (64 Mi booleans: a 8192-token sequence). Beyond it
# the per-chunk loops run; at that size each chunk's call is large enough to keep the device busy.
MASK_LIMIT = 1 << 26


def resolve_attention_backend(name: str, dtype=None) -> str:
    """Maps `auto` to a concrete backend for the default device and dtype, and checks that the named one can run.

    auto = cudnn on an NVIDIA GPU for bfloat16/float16 inputs, xla otherwise (cuDNN has no float32 flash kernel).
    """
    platform = jax.default_backend()
    if name == "auto":
        half = dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        resolved = "cudnn" if platform == "gpu" and half else "xla"
        if (resolved, platform) not in _announced:
            log.info("attention backend 'auto' resolved to %r (platform %r, dtype %s)", resolved, platform, dtype)
            _announced.add((resolved, platform))
        return resolved
    if name in ("cudnn", "mosaic") and platform != "gpu":
        raise ValueError(f"attention backend {name!r} needs an NVIDIA GPU; the default JAX platform is {platform!r}. "
                         "Use attention='xla' (or 'auto').")
    if name not in ("xla", "cudnn", "mosaic"):
        raise ValueError(f"unknown attention backend {name!r}; expected 'auto', 'xla', 'cudnn' or 'mosaic'")
    return name


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str,
              kv_length: jax.Array | int | None = None, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention of q [B, Sq, H, D] over k, v [B, Sk, H, D]; keys at positions >= kv_length are ignored.

    `kv_length` is an int32 scalar or [B] array (may be traced: no recompilation as it changes), or None for all keys.
    `mask` is any boolean mask broadcastable to [B, H, Sq, Sk] (True = may attend; every query row needs at least one
    allowed key). It is a materialised matrix: prefer `kv_length` where it fits. Like a `kv_length` mask, an explicit
    mask runs on cuDNN under the `mosaic` backend (the Mosaic kernel is unmasked).
    """
    backend = resolve_attention_backend(backend, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if kv_length is not None:
        kv_length = jnp.broadcast_to(jnp.asarray(kv_length, jnp.int32), (q.shape[0],))
    if mask is not None:
        return _masked(backend)(q, k, v, kv_length, scale, mask=jnp.asarray(mask, bool))
    if kv_length is None:
        return _unmasked(backend)(q, k, v, None, scale)
    return _masked(backend)(q, k, v, kv_length, scale)


def _masked(backend):
    """The implementation used for attention with a key-length mask (the Mosaic kernel has no mask: cuDNN)."""
    return xla_attention if backend == "xla" else cudnn_attention


def _unmasked(backend):
    if backend == "mosaic":
        return mosaic_attention
    return _masked(backend)


def frame_masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: np.ndarray, *, tokens_per_frame: int,
                           backend: str) -> jax.Array:
    """Self-attention over [B, F*T, H, D] in ONE call under a static frame-level pattern: visible bool [F, F] says
    which key frames each query frame sees (every frame must see at least one). The token mask [1, 1, S, S] is a
    compile-time constant (cuDNN takes it as a constant additive bias, with no bias gradient)."""
    t = tokens_per_frame
    if q.shape[1] != visible.shape[0] * t or k.shape[1] != visible.shape[1] * t:
        raise ValueError(f"frame mask {visible.shape} x {t} tokens does not match q {q.shape} / k {k.shape}")
    mask = np.repeat(np.repeat(np.asarray(visible, bool), t, axis=0), t, axis=1)
    return attention(q, k, v, backend=backend, mask=mask[None, None])


def fits_mask(q_tokens: int, k_tokens: int) -> bool:
    """Whether a frame-level pattern of this size runs as one masked call (see MASK_LIMIT)."""
    return q_tokens * k_tokens <= MASK_LIMIT


def block_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk_tokens: int,
                           backend: str) -> jax.Array:
    """Block-causal self-attention over [B, S, H, D]: query chunk i (chunk_tokens rows) sees keys of chunks 0..i.

    The last chunk may be shorter. Each chunk attends to a static key prefix, so no mask is materialised and about
    half of the dense FLOPs are spent. (Small sequences run faster as one `frame_masked_attention` call.)
    """
    seq = q.shape[1]
    outs = []
    for start in range(0, seq, chunk_tokens):
        end = min(start + chunk_tokens, seq)
        outs.append(attention(q[:, start:end], k[:, :end], v[:, :end], backend=backend))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def attention_with_history(q: jax.Array, k: jax.Array, v: jax.Array, hist_k: jax.Array, hist_v: jax.Array,
                           hist_length: jax.Array, *, backend: str) -> jax.Array:
    """Attention of a chunk's queries over [history prefix ; the chunk itself] without concatenating the two.

    The history (a KV cache, only its first `hist_length` rows valid) is read where it lies; the two partial results
    are merged exactly through their log-sum-exps. This avoids copying the cache on every denoising step. A history of
    batch 1 serves queries of any batch (CFG branches sharing one cache): the query batch is folded into the rows.
    """
    backend = resolve_attention_backend(backend, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    fn = _masked(backend)
    b, sq, h, d = q.shape
    shared = hist_k.shape[0] == 1 and b > 1
    if hist_k.shape[0] != b and not shared:
        raise ValueError(f"history batch {hist_k.shape[0]} must be 1 (shared) or equal the query batch {b}")
    qh = q.reshape(1, b * sq, h, d) if shared else q
    hist_len = jnp.broadcast_to(jnp.asarray(hist_length, jnp.int32), (qh.shape[0],))
    o_hist, lse_hist = fn(qh, hist_k, hist_v, hist_len, scale, with_lse=True)
    if shared:
        o_hist, lse_hist = o_hist.reshape(b, sq, h, d), lse_hist.reshape(b, sq, h)
        hist_len = jnp.broadcast_to(hist_len, (b,))
    o_self, lse_self = _unmasked(backend)(q, k, v, None, scale, with_lse=True)
    # With no history (first chunk) the history half is undefined (all keys masked): give it zero weight.
    has_hist = (hist_len > 0)[:, None, None]
    lse_hist = jnp.where(has_hist, lse_hist.astype(jnp.float32), -jnp.inf)
    o_hist = jnp.where(has_hist[..., None], o_hist, 0)
    return merge_partial(o_hist, lse_hist, o_self, lse_self)[0]


def teacher_forcing_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk_tokens: int,
                              backend: str) -> jax.Array:
    """Dense attention over a [clean ; noisy] teacher-forcing sequence [B, 2S, H, D] (docs/method.md §11).

    Clean chunk c sees clean chunks <= c (block-causal); noisy chunk c sees clean chunks < c and itself, i.e. exactly
    what the chunk sees at inference against a cache of the clean chunks before it."""
    s = q.shape[1] // 2
    outs = [block_causal_attention(q[:, :s], k[:, :s], v[:, :s], chunk_tokens=chunk_tokens, backend=backend)]
    for start in range(0, s, chunk_tokens):
        rows = slice(s + start, s + min(start + chunk_tokens, s))
        if start == 0:
            outs.append(attention(q[:, rows], k[:, rows], v[:, rows], backend=backend))
        else:
            outs.append(attention_with_history(q[:, rows], k[:, rows], v[:, rows], k[:, :start], v[:, :start],
                                               start, backend=backend))
    return jnp.concatenate(outs, axis=1)
