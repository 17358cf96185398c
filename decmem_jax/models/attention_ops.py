"""The attention primitives every backend builds on, in one place below `attention` and `attention_mgpu` (which both
import them, so neither imports the other's module for them): plain XLA attention (the reference), cuDNN's fused
attention, and the log-sum-exp merge of two partial results over disjoint keys.

All take q [B, Sq, H, D], k, v [B, Sk, H, D]; `kv_length` [B] masks keys at or past it, `mask` is a boolean
[B or 1, H or 1, Sq, Sk]; with `with_lse` they also return the natural-log log-sum-exp of the scaled logits,
[B, Sq, H].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decmem_jax.models.layers import matmul_precision


def xla_attention(q, k, v, kv_length, scale, with_lse=False, mask=None):
    precision = matmul_precision(q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32, precision=precision) * scale
    if kv_length is not None:
        valid = jnp.arange(k.shape[1]) < kv_length[:, None]  # [B, Sk]
        logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32,
                     precision=precision)
    if with_lse:
        return out.astype(q.dtype), jax.nn.logsumexp(logits, axis=-1).transpose(0, 2, 1)  # [B, Sq, H]
    return out.astype(q.dtype)


def cudnn_attention(q, k, v, kv_length, scale, with_lse=False, mask=None):
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention backend 'cudnn' supports bfloat16/float16 only, got {q.dtype}; "
                         "use DiTConfig(dtype='bfloat16') or attention='xla'")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, key_value_seq_lengths=kv_length,
                                        implementation="cudnn", return_residual=with_lse)


def merge_partial(o1, lse1, o2, lse2):
    """Exact softmax attention over the union of two disjoint key sets from the two partial results: the one
    log-sum-exp merge of the project (dense history + chunk here, ALM + SGM in `memory`, key splits in the Mosaic
    wrapper).

    o: [B, Sq, H, D]; lse: natural-log log-sum-exp of the scaled logits, [B, Sq, H], -inf for a row without keys
    (it gets zero weight; a row empty on both sides gives zeros). Returns (o, lse)."""
    lse1, lse2 = lse1.astype(jnp.float32), lse2.astype(jnp.float32)
    lse = jnp.logaddexp(lse1, lse2)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # exp(-inf - 0) = 0 instead of exp(nan)
    w1, w2 = jnp.exp(lse1 - safe)[..., None], jnp.exp(lse2 - safe)[..., None]
    return (w1 * o1.astype(jnp.float32) + w2 * o2.astype(jnp.float32)).astype(o1.dtype), lse
