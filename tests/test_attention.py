"""Attention backends against an explicit-mask float64 softmax reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decmem_jax.models import attention as attn
from decmem_jax.models import attention_ops


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


def test_any_boolean_mask():
    q, k, v = qkv(3, sq=12, sk=16)
    rng = np.random.default_rng(0)
    mask = rng.random((2, 1, 12, 16)) < 0.5
    mask[..., 0] = True  # every query row keeps at least one key
    got = attn.attention(q, k, v, backend="xla", mask=jnp.asarray(mask))
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
        assert attn.resolve_attention_backend("auto") == "xla"
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            attn.resolve_attention_backend("cudnn")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.resolve_attention_backend("flash")


@pytest.mark.parametrize("sq,sk", [(200, 300), (64, 100), (130, 128)])
def test_mosaic_wrapper_pads_splits_and_merges_exactly(sq, sk):
    """The padding / key-prefix split / log-sum-exp merge around the Mosaic-GPU kernel, checked on CPU with jax's own
    reference for that kernel (same contract: no scale, log2 lse) and the xla backend standing in for cuDNN."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    from decmem_jax.models.attention_mgpu import mosaic_attention

    def kernel(q, k, v):
        assert q.shape[1] % 128 == 0 and k.shape[1] % 128 == 0
        out, (lse,) = attention_mgpu.attention_reference(q, k, v, save_residuals=True)
        return out.astype(q.dtype), lse

    q, k, v = (a.astype(jnp.float16) for a in qkv(sq + sk, sq=sq, sk=sk, d=64))
    got, lse = mosaic_attention(q, k, v, None, 1 / 8.0, with_lse=True, kernel=kernel, tail=attention_ops.xla_attention)
    expected = reference(q, k, v, np.ones((1, 1, sq, sk), bool))
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=5e-3, rtol=5e-3)
    _, lse_xla = attention_ops.xla_attention(*(a.astype(jnp.float32) for a in (q, k, v)), None, 1 / 8.0, with_lse=True)
    np.testing.assert_allclose(lse, lse_xla, atol=2e-3)


@pytest.mark.parametrize("plan_name", ["causal", "teacher_forcing"])
def test_frame_mask_equals_the_per_chunk_loop(plan_name):
    """Small sequences run as one masked call, large ones as a loop over chunks: both compute the same pattern."""
    from decmem_jax.models import memory

    frames, chunk, tpf = 6, 2, 4
    if plan_name == "causal":
        plan = memory.causal_plan(frames, chunk)
        loop = attn.block_causal_attention
    else:
        plan = memory.teacher_forcing_plan(frames, chunk)
        loop = attn.teacher_forcing_attention
    s = plan.frames * tpf
    q, k, v = qkv(7, sq=s, sk=s)
    one = attn.frame_masked_attention(q, k, v, plan.visible, tokens_per_frame=tpf, backend="xla")
    chunks = loop(q, k, v, chunk_tokens=chunk * tpf, backend="xla")
    token_mask = np.repeat(np.repeat(plan.visible, tpf, 0), tpf, 1)[None, None]
    np.testing.assert_allclose(one, reference(q, k, v, token_mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunks, one, rtol=1e-5, atol=1e-5)
    assert attn.fits_mask(s, s) and not attn.fits_mask(attn.MASK_LIMIT, 2)
