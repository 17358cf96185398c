"""The feed-forward's tanh-GELU behind one switch: XLA (the reference) or a Pallas Triton kernel for NVIDIA GPUs.

    gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)

Why a kernel: in the rollout the GELU of the FFN's hidden layer ([tokens, 8960], bf16) is the largest elementwise
pass of a DiT block. XLA evaluates the float32 tanh as a rational polynomial with a division, which makes the pass
arithmetic-bound (about 100 us per call at the rollout's 7,040 x 8,960 on an H200, some 2.5 TB/s; docs/benchmarks.md).
The kernel uses the GPU's one-instruction approximate tanh (`tanh.approx.f32`, relative error about 2^-11), below
the bf16 rounding of the result, so the pass runs at the memory's pace. Its backward is the exact derivative in XLA.

Backends: `xla` (jax.nn.gelu, approximate form: any platform, any dtype), `triton` (NVIDIA GPU, bf16/fp16 inputs),
`auto` (triton on a GPU for bf16/fp16, xla otherwise; logged once). `triton` on another platform or dtype raises:
no silent fallback.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

log = logging.getLogger(__name__)
_announced: set[tuple[str, str]] = set()
BACKENDS = ("auto", "xla", "triton")
_C = math.sqrt(2.0 / math.pi)
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
COLS = 1024  # elements per kernel row; the flat input is viewed as [n / COLS, COLS]
ROWS = 8  # rows per program (8 x 1024 elements: 16 KB of bf16 in, 16 KB out)


def gelu_reference(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def resolve_gelu_backend(name: str, dtype) -> str:
    """`auto` -> a concrete backend for the default platform and `dtype`; checks that a named one can run."""
    if name not in BACKENDS:
        raise ValueError(f"unknown GELU backend {name!r}; expected one of {BACKENDS}")
    platform = jax.default_backend()
    if name == "auto":
        resolved = "triton" if platform == "gpu" and jnp.dtype(dtype) in _HALF else "xla"
        if (resolved, platform) not in _announced:
            log.info("GELU backend 'auto' resolved to %r (platform %r, dtype %s)", resolved, platform, dtype)
            _announced.add((resolved, platform))
        return resolved
    if name == "triton" and (platform != "gpu" or jnp.dtype(dtype) not in _HALF):
        raise ValueError(f"GELU backend 'triton' needs an NVIDIA GPU and bfloat16/float16 input; the platform is "
                         f"{platform!r} and the dtype {jnp.dtype(dtype)}. Use 'xla' or 'auto'.")
    return name


def gelu_tanh(x: jax.Array, *, backend: str = "xla", interpret: bool = False) -> jax.Array:
    """The tanh-approximated GELU of x in x's dtype. `interpret=True` runs the Triton kernel's body in Pallas'
    interpreter on any platform (with an exact tanh: the approximate one is a GPU instruction), for tests."""
    if interpret:
        return _gelu_kernel(x, True)
    if resolve_gelu_backend(backend, x.dtype) == "xla":
        return gelu_reference(x)
    return _gelu_kernel(x, False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gelu_kernel(x, interpret):
    return _forward(x, interpret)


def _fwd(x, interpret):
    return _forward(x, interpret), x


def _bwd(interpret, x, g):
    """d/dx of 0.5 x (1 + tanh u) = 0.5 (1 + t) + 0.5 x (1 - t^2) u', in float32 with the exact tanh."""
    xf = x.astype(jnp.float32)
    t = jnp.tanh(_C * (xf + 0.044715 * xf * xf * xf))
    du = _C * (1.0 + 3 * 0.044715 * xf * xf)
    return ((g.astype(jnp.float32) * (0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * du)).astype(x.dtype),)


_gelu_kernel.defvjp(_fwd, _bwd)


def _body(x_ref, o_ref, *, interpret):
    x = x_ref[...].astype(jnp.float32)
    u = _C * (x + 0.044715 * x * x * x)
    if interpret:
        t = jnp.tanh(u)
    else:
        from jax.experimental.pallas import triton as plt  # the GPU-only instruction
        t = plt.approx_tanh(u)
    o_ref[...] = (0.5 * x * (1.0 + t)).astype(o_ref.dtype)


def _forward(x, interpret):
    n = x.size
    tile = ROWS * COLS
    flat = x.reshape(-1)
    padded = -(-n // tile) * tile
    if padded != n:  # a ragged size: pad to whole programs (the FFN's sizes are multiples of 8,192 elements)
        flat = jnp.pad(flat, (0, padded - n))
    x2 = flat.reshape(padded // COLS, COLS)
    kw = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt
        kw["compiler_params"] = plt.CompilerParams(num_warps=4, num_stages=1)
    out = pl.pallas_call(
        functools.partial(_body, interpret=interpret),
        out_shape=jax.ShapeDtypeStruct(x2.shape, x.dtype),
        grid=(x2.shape[0] // ROWS,),
        in_specs=[pl.BlockSpec((ROWS, COLS), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((ROWS, COLS), lambda i: (i, 0)),
        interpret=interpret,
        **kw,
    )(x2)
    return out.reshape(-1)[:n].reshape(x.shape)
