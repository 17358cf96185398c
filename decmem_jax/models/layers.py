"""Small layers with Wan's dtype policy: statistics and modulation in float32, matmuls in the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint

from pallas_kernels import gelu as gelu_kernels


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * scale, statistics in float32, over the last axis (all heads at once for qk-norm)."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale.get_value().astype(jnp.float32)).astype(out_dtype or x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 and returned in float32; affine parameters only when `affine` (Wan's norm3)."""

    def __init__(self, dim: int, *, eps: float, affine: bool, param_dtype=jnp.float32):
        self.eps = eps
        self.affine = affine
        if affine:
            self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
            self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return y


def matmul_precision(dtype) -> jax.lax.Precision | None:
    """float32 compute means float32 matmuls: GPUs otherwise round operands to TF32 (~1e-3 relative error)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def pin_row_major(x: jax.Array) -> jax.Array:
    """x with its layout pinned to row-major (last axis minor); the constraint's transpose pins the cotangent too.
    Values are untouched: only where XLA puts the bytes."""
    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


class Linear(nnx.Linear):
    """nnx.Linear whose output (and so the cotangent entering its backward) can be pinned row-major.

    Why: left free, XLA on GPU gives some GEMM outputs of a rematerialised forward a column-major layout (tokens
    minor) and then runs the norm/modulation backward on transposed float32 copies; pinned, the same training step
    is 4-5% faster on an H100 (DiTConfig.linear_layout, docs/performance.md). A forward alone gains nothing (the
    rollout chunk was 0.3-0.6% slower), so inference configs leave it off. Same parameters as nnx.Linear."""

    def __init__(self, *args, row_major: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.row_major = row_major

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        return pin_row_major(y) if self.row_major else y


def linear(din: int, dout: int, *, dtype, param_dtype, rngs: nnx.Rngs, row_major: bool = False) -> Linear:
    """A biased Linear (kernel [in, out]) that casts its input and weights to the compute dtype `dtype`;
    `row_major` pins its output layout (`Linear`)."""
    return Linear(din, dout, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                  precision=matmul_precision(dtype), rngs=rngs, row_major=row_major)


def gelu_tanh(x: jax.Array, backend: str = "xla") -> jax.Array:
    """The tanh-approximated GELU; `backend` picks XLA or the Pallas Triton kernel (pallas_kernels/gelu.py)."""
    return gelu_kernels.gelu_tanh(x, backend=backend)


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Wan's timestep sinusoid in float32: [cos(t*f_i), sin(t*f_i)], f_i = max_period^(-i/half), cos first."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(jnp.float32(max_period)) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
