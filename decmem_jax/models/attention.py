"""Softmax attention behind one config field.

Backends:
- `xla`: plain einsum + float32 softmax; any dtype, any platform; the reference.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`: fused flash attention on NVIDIA GPUs, bf16/fp16.
- `auto`: cudnn on GPU for bf16/fp16, xla otherwise; the choice is logged once.

Masks are expressed without an S x S matrix: a valid-key prefix length (`kv_length`) covers padding and the KV cache,
and the block-causal pattern is a loop over query chunks, each attending to the key prefix that ends with its own
chunk (bidirectional inside a chunk, causal across chunks).
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)
_announced: set[str] = set()


def resolve_backend(name: str, dtype=None) -> str:
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
    if name == "cudnn" and platform != "gpu":
        raise ValueError(f"attention backend 'cudnn' needs an NVIDIA GPU; the default JAX platform is {platform!r}. "
                         "Use attention='xla' (or 'auto').")
    if name not in ("xla", "cudnn"):
        raise ValueError(f"unknown attention backend {name!r}; expected 'auto', 'xla' or 'cudnn'")
    return name


def _xla_attention(q, k, v, kv_length, scale, with_lse=False):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_length is not None:
        valid = jnp.arange(k.shape[1]) < kv_length[:, None]  # [B, Sk]
        logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    if with_lse:
        return out.astype(q.dtype), jax.nn.logsumexp(logits, axis=-1).transpose(0, 2, 1)  # [B, Sq, H]
    return out.astype(q.dtype)


def _cudnn_attention(q, k, v, kv_length, scale, with_lse=False):
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention backend 'cudnn' supports bfloat16/float16 only, got {q.dtype}; "
                         "use DiTConfig(dtype='bfloat16') or attention='xla'")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=kv_length,
                                        implementation="cudnn", return_residual=with_lse)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str,
              kv_length: jax.Array | int | None = None) -> jax.Array:
    """Softmax attention of q [B, Sq, H, D] over k, v [B, Sk, H, D]; keys at positions >= kv_length are ignored.

    `kv_length` is an int32 scalar or [B] array (may be traced: no recompilation as it changes), or None for all keys.
    """
    backend = resolve_backend(backend, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if kv_length is not None:
        kv_length = jnp.broadcast_to(jnp.asarray(kv_length, jnp.int32), (q.shape[0],))
    fn = _cudnn_attention if backend == "cudnn" else _xla_attention
    return fn(q, k, v, kv_length, scale)


def block_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk_tokens: int,
                           backend: str) -> jax.Array:
    """Block-causal self-attention over [B, S, H, D]: query chunk i (chunk_tokens rows) sees keys of chunks 0..i.

    The last chunk may be shorter. Each chunk attends to a static key prefix, so no mask is materialised and about
    half of the dense FLOPs are spent.
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
    are merged exactly through their log-sum-exps. This avoids copying the cache on every denoising step.
    """
    backend = resolve_backend(backend, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    fn = _cudnn_attention if backend == "cudnn" else _xla_attention
    hist_len = jnp.broadcast_to(jnp.asarray(hist_length, jnp.int32), (q.shape[0],))
    o_hist, lse_hist = fn(q, hist_k, hist_v, hist_len, scale, with_lse=True)
    o_self, lse_self = fn(q, k, v, None, scale, with_lse=True)
    lse_hist = lse_hist.astype(jnp.float32)
    # With no history (first chunk) the history half is undefined (all keys masked): give it zero weight.
    has_hist = (hist_len > 0)[:, None, None]
    lse_hist = jnp.where(has_hist, lse_hist, -jnp.inf)
    lse = jnp.logaddexp(lse_hist, lse_self.astype(jnp.float32))
    w_hist = jnp.exp(lse_hist - lse)[..., None]
    w_self = jnp.exp(lse_self.astype(jnp.float32) - lse)[..., None]
    o_hist = jnp.where(has_hist[..., None], o_hist.astype(jnp.float32), 0.0)
    return (w_hist * o_hist + w_self * o_self.astype(jnp.float32)).astype(q.dtype)
