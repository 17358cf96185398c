"""The FFN's tanh-GELU kernel (pallas_kernels/gelu.py): its body in Pallas' interpreter against jax.nn.gelu, its
custom backward against autodiff of the reference, and the backend switch (no silent fallback off the GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decmem_jax.models.config import DiTConfig
from pallas_kernels.gelu import gelu_reference, gelu_tanh, resolve_gelu_backend


@pytest.mark.parametrize("shape", [(2, 8192), (3, 5000)])  # whole programs, and a ragged size (padded)
def test_kernel_body_matches_reference(shape):
    x = 3.0 * jax.random.normal(jax.random.key(0), shape, jnp.float32)  # reaches the saturated tails of tanh
    y = gelu_tanh(x, interpret=True)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(y), np.asarray(gelu_reference(x)), rtol=1e-5, atol=1e-6)
    xb = x.astype(jnp.bfloat16)
    assert gelu_tanh(xb, interpret=True).dtype == jnp.bfloat16
    yb = np.asarray(gelu_tanh(xb, interpret=True).astype(jnp.float32))
    exact = np.asarray(gelu_reference(xb.astype(jnp.float32)))  # the function at the bf16 inputs, in float32
    # Within one bf16 ulp of the float32 value (a rounding of it), and 1e-3 absolute where 1 + tanh cancels (large
    # negative inputs, outputs near 0).
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
    assert np.all(np.abs(yb - exact) <= ulp + 1e-3), float(np.max(np.abs(yb - exact) - ulp))


def test_backward_is_the_exact_derivative():
    x = 2.5 * jax.random.normal(jax.random.key(1), (4, 3000), jnp.float32)
    w = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    g = jax.grad(lambda v: jnp.sum(gelu_tanh(v, interpret=True) * w))(x)
    ref = jax.grad(lambda v: jnp.sum(gelu_reference(v) * w))(x)
    # atol: near x = -0.75 the derivative crosses 0, where float32 rounding of the two formulas differs in relative
    # terms (the largest gradients are ~1.1)
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=2e-5)
    gb = jax.grad(lambda v: jnp.sum(gelu_tanh(v, interpret=True).astype(jnp.float32)))(x.astype(jnp.bfloat16))
    assert gb.dtype == jnp.bfloat16


def test_backend_switch_refuses_what_cannot_run():
    assert resolve_gelu_backend("auto", jnp.bfloat16) == ("triton" if jax.default_backend() == "gpu" else "xla")
    assert resolve_gelu_backend("auto", jnp.float32) == "xla"
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'triton' needs an NVIDIA GPU"):
            gelu_tanh(jnp.ones((8,), jnp.bfloat16), backend="triton")
    with pytest.raises(ValueError, match="unknown GELU backend 'fast'"):
        gelu_tanh(jnp.ones((8,)), backend="fast")
    with pytest.raises(ValueError, match="DiTConfig.gelu='fast'"):
        DiTConfig(gelu="fast")
    x = jnp.linspace(-5.0, 5.0, 64)
    np.testing.assert_array_equal(np.asarray(gelu_tanh(x, backend="xla")), np.asarray(gelu_reference(x)))
