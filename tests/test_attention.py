"""Attention backends against an explicit-mask float64 softmax reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decmem_jax.models import attention as attn


def reference(q, k, v, mask):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def qkv(seed, b=2, sq=24, sk=24, h=3, d=16):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, sq, h, d)) * 2, jax.random.normal(ks[1], (b, sk, h, d)) * 2,
            jax.random.normal(ks[2], (b, sk, h, d)))


def test_block_causal_matches_explicit_mask():
    q, k, v = qkv(0, sq=22, sk=22)  # 22 tokens in chunks of 6: the last chunk is short
    chunk = np.arange(22) // 6
    mask = (chunk[None, :] <= chunk[:, None])[None, None]
    got = attn.block_causal_attention(q, k, v, chunk_tokens=6, backend="xla")
    np.testing.assert_allclose(got, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_kv_length_masks_the_tail_per_batch_row():
    q, k, v = qkv(1, sq=8, sk=20)
    lengths = jnp.array([5, 17], jnp.int32)
    mask = (np.arange(20)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]
    got = attn.attention(q, k, v, backend="xla", kv_length=lengths)
    np.testing.assert_allclose(got, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    # Garbage (even NaN) past the valid length must not leak in.
    k_bad = k.at[:, 17:].set(jnp.nan)
    np.testing.assert_allclose(attn.attention(q, k_bad, v, backend="xla", kv_length=lengths), got, atol=0)


def test_backend_selection_is_explicit():
    if jax.default_backend() == "cpu":
        assert attn.resolve_backend("auto") == "xla"
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            attn.resolve_backend("cudnn")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.resolve_backend("flash")
