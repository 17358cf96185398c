"""Softmax attention behind one config field.

Backends:
- `xla`: plain einsum + float32 softmax; any dtype, any platform; the reference.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`: fused flash attention on NVIDIA GPUs, bf16/fp16.
- `auto`: cudnn on GPU, xla elsewhere; the choice is logged once.

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


def resolve_backend(name: str) -> str:
    """Maps `auto` to a concrete backend for the default device and checks that the named one can run here."""
    platform = jax.default_backend()
    if name == "auto":
        resolved = "cudnn" if platform == "gpu" else "xla"
        if resolved not in _announced:
            log.info("attention backend 'auto' resolved to %r on platform %r", resolved, platform)
            _announced.add(resolved)
        return resolved
    if name == "cudnn" and platform != "gpu":
        raise ValueError(f"attention backend 'cudnn' needs an NVIDIA GPU; the default JAX platform is {platform!r}. "
                         "Use attention='xla' (or 'auto').")
    if name not in ("xla", "cudnn"):
        raise ValueError(f"unknown attention backend {name!r}; expected 'auto', 'xla' or 'cudnn'")
    return name


def _xla_attention(q, k, v, kv_length, scale):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_length is not None:
        valid = jnp.arange(k.shape[1]) < kv_length[:, None]  # [B, Sk]
        logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _cudnn_attention(q, k, v, kv_length, scale):
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention backend 'cudnn' supports bfloat16/float16 only, got {q.dtype}; "
                         "use DiTConfig(dtype='bfloat16') or attention='xla'")
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=kv_length, implementation="cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str,
              kv_length: jax.Array | int | None = None) -> jax.Array:
    """Softmax attention of q [B, Sq, H, D] over k, v [B, Sk, H, D]; keys at positions >= kv_length are ignored.

    `kv_length` is an int32 scalar or [B] array (may be traced: no recompilation as it changes), or None for all keys.
    """
    backend = resolve_backend(backend)
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
