"""The `mosaic` attention backend: jax's Pallas Mosaic-GPU flash attention kernel, exact for any sequence length.

The kernel (`jax.experimental.pallas.ops.gpu.attention_mgpu`, shipped with jax) needs the query length to be a
multiple of 2*block_q and the key length a multiple of block_kv, has no mask and no softmax scale. Wan's lengths
(e.g. 32,760 = 21 x 1560 tokens) are not, so: queries are zero-padded (padded rows are dropped), the kernel runs on
the longest key prefix that divides, the short key tail runs through cuDNN, and the two partial results are merged
exactly through their log-sum-exps. The scale is applied to q before the kernel (one extra rounding of q;
forward/inference only: the kernel's backward is not wired up here, train with `cudnn`).

The kernel's shared-memory buffers are float16 in jax 0.11.2 (bf16 inputs fail its TMA dtype check), so q, k, v are
converted to float16: exact for bf16 values of magnitude in [6e-5, 65504] (fp16 has more mantissa bits than bf16),
which holds for Wan's RMS-normalised q/k and its v; the output returns in the caller's dtype.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp

from decmem_jax.models.attention_ops import cudnn_attention, merge_partial

BLOCK_Q, BLOCK_KV, STAGES = 64, 128, 2  # 633 TFLOP/s fp16 at S=49152 on H100 (jax's published figure for this kernel)


def _kernel(q, k, v):
    """(out [B, Sq, H, D], lse [B, H, Sq] in log2 units) of unscaled attention; Sq % 128 == Sk % 128 == 0."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(block_q=BLOCK_Q, block_kv=BLOCK_KV, max_concurrent_steps=STAGES)
    out, (lse,) = attention_mgpu.attention(q, k, v, config, save_residuals=True)
    return out, lse


def mosaic_attention(q, k, v, kv_length, scale, with_lse=False, *, kernel=_kernel, tail=None):
    """Unmasked softmax attention of q [B, Sq, H, D] over k, v [B, Sk, H, D] (bf16/fp16, D % 64 == 0).

    `kernel` and `tail` (the cuDNN attention of the key tail) are parameters so the padding and merging logic can be
    checked on CPU against stand-ins."""
    tail = tail or cudnn_attention
    if kv_length is not None:
        raise ValueError("the mosaic attention kernel has no key-length mask; use the cudnn backend for masked calls")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] % 64:
        raise ValueError(f"attention backend 'mosaic' needs bfloat16/float16 and a head dim divisible by 64, got "
                         f"{q.dtype} and {q.shape[-1]}")
    b, sq, h, d = q.shape
    main = (k.shape[1] // BLOCK_KV) * BLOCK_KV
    pad = -sq % (2 * BLOCK_Q)
    partial = []
    if main:
        f16 = jnp.float16
        qs = jnp.pad((q.astype(jnp.float32) * scale).astype(f16), ((0, 0), (0, pad), (0, 0), (0, 0)))
        out, lse2 = kernel(qs, k[:, :main].astype(f16), v[:, :main].astype(f16))
        lse = (lse2 * math.log(2.0)).transpose(0, 2, 1)[:, :sq]  # log2 -> natural log, [B, Sq, H]
        partial.append((out[:, :sq].astype(q.dtype), lse))
    if main < k.shape[1]:
        partial.append(tail(q, k[:, main:], v[:, main:], None, scale, with_lse=True))
    out, lse = functools.reduce(lambda a, b_: merge_partial(*a, *b_), partial)
    return (out, lse) if with_lse else out
