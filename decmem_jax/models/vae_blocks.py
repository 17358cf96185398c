"""Building blocks of the Wan2.1 causal video VAE in Flax NNX (`docs/method.md` §3).

Video is channels-last, [B, T, H, W, C]. Every block is written for the whole-sequence formulation: causal
convolutions see the full sequence with zero frames in front, and the first frame bypasses temporal resampling.
Given a `StreamStep` (`cache`), the same blocks run one step of streaming encode/decode instead (`vae_stream.py`):
each causal conv and temporal resampler continues from the frames the previous step left it.
Parameter names follow diffusers' `AutoencoderKLWan` so that the key table (`convert/vae_keymap.py`) stays a list of
renames: convolutions hold `kernel` (DHWIO / HWIO) and `bias`, norms hold `gamma` of shape (C,).
With a float32 compute dtype the convolutions and attention einsums ask for `Precision.HIGHEST` (GPUs would otherwise
round float32 operands to TF32); on CPU that changes nothing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decmem_jax.models.layers import matmul_precision


def _kernel_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> jax.Array:
    """LeCun normal over all input axes (spatial + C_in); values are overwritten when a checkpoint is loaded.

    With a concrete key the draw is done in NumPy (seeded from the key): XLA compiles a random-normal program per
    distinct shape, which made building even the tiny VAE take ~30 s on CPU. Under tracing (eval_shape, jit) the
    JAX sampler is used, which costs nothing in eval_shape.
    """
    key, fan_in = rngs.params(), math.prod(shape[:-1])
    if isinstance(key, jax.core.Tracer):
        return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    return jnp.asarray((rng.standard_normal(shape, np.float32) / np.float32(math.sqrt(fan_in))), dtype)


def _triple(v) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(int(u) for u in v)


StreamCache = dict[str, jax.Array]  # module path -> the input frames before a streaming step's chunk


class StreamStep:
    """What one streaming step (`vae_stream.py`) reads and leaves: for every kernel-3 causal conv the last 2 frames
    of its input so far, for every temporal downsampler its last frame, by module path (`encoder.conv_in`,
    `decoder.up_blocks.0.upsamplers.0.time_conv`, ...). `old=None` stands for all zeros (the layout is derived from
    it under `jax.eval_shape`); `new` collects the state for the next step. `first`: the warm-up step, frame 0 (or
    latent 0) alone, which the temporal resamplers pass through. A block hands each child `scope(attribute name)`,
    so the paths are the module paths."""

    def __init__(self, old: StreamCache | None, first: bool, *, path: str = "", new: StreamCache | None = None):
        self.old, self.first, self.path = old, first, path
        self.new = {} if new is None else new

    def scope(self, name: str) -> StreamStep:
        return StreamStep(self.old, self.first, path=self._key(name), new=self.new)

    def _key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def read(self, name: str, like: jax.Array, frames: int) -> jax.Array:
        """The `frames` input frames of module `name` that precede this step (shaped like `like` otherwise)."""
        if self.old is None:
            return jnp.zeros((like.shape[0], frames, *like.shape[2:]), like.dtype)
        return self.old[self._key(name)]

    def write(self, name: str, frames: jax.Array) -> None:
        self.new[self._key(name)] = frames

    def conv(self, name: str, conv: CausalConv3d, x: jax.Array) -> jax.Array:
        """Causal conv `name` over this step's frames x, continuing from its cached input frames."""
        front = 2 * conv.padding[0]
        if front == 0:  # 1x1x1 (or unpadded) conv: frame-local, no state
            return conv(x)
        prev = self.read(name, x, front)
        self.write(name, jnp.concatenate([prev.astype(x.dtype), x], axis=1)[:, -front:])
        return conv(x, cache=prev)


def scope(cache: StreamStep | None, name: str) -> StreamStep | None:
    """A child's view of a streaming step (None: the whole sequence)."""
    return None if cache is None else cache.scope(name)


def causal_conv(conv: CausalConv3d, x: jax.Array, cache: StreamStep | None, name: str) -> jax.Array:
    """conv over the whole sequence x, or over one streaming step's frames (`StreamStep.conv`)."""
    return conv(x) if cache is None else cache.conv(name, conv, x)


class CausalConv3d(nnx.Module):
    """Conv3d with causal time padding: 2*pad_t zero frames in front, none behind; spatial padding symmetric.

    `cache` (for streaming) is a [B, c, H, W, C_in] block of preceding input frames; it replaces c of the front zero
    frames, exactly as in the reference's chunked mode.
    """

    def __init__(self, din: int, dout: int, kernel, stride=1, padding=0, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel_size, self.stride, self.padding = _triple(kernel), _triple(stride), _triple(padding)
        self.kernel = nnx.Param(_kernel_init(rngs, (*self.kernel_size, din, dout), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array, cache: jax.Array | None = None) -> jax.Array:
        pt, ph, pw = self.padding
        front = 2 * pt
        if cache is not None and front > 0:
            x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
            front = max(front - cache.shape[1], 0)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel.get_value().astype(self.dtype), window_strides=self.stride,
            padding=[(front, 0), (ph, ph), (pw, pw)], dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
            precision=matmul_precision(self.dtype))
        return y + self.bias.get_value().astype(self.dtype)


class Conv2d(nnx.Module):
    """Per-frame 2D convolution (kernel HWIO) applied to [B, T, H, W, C] by folding time into the batch."""

    def __init__(self, din: int, dout: int, kernel: int, stride: int = 1, padding=((0, 0), (0, 0)), *, dtype,
                 param_dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_kernel_init(rngs, (kernel, kernel, din, dout), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype))
        self.stride, self.padding, self.dtype = stride, padding, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, *x.shape[2:]).astype(self.dtype), self.kernel.get_value().astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=matmul_precision(self.dtype))
        y = y + self.bias.get_value().astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])


class L2ChannelNorm(nnx.Module):
    """x / max(||x||_2, eps) over channels, times sqrt(C) and gamma; no bias; statistics in float32. Wan calls it
    RMS_norm, but it is F.normalize (eps clamps the L2 norm, 1e-12), not the DiT's RMSNorm (`layers.RMSNorm`:
    rsqrt(mean(x^2) + eps), eps 1e-6), hence its own name."""

    def __init__(self, dim: int, *, eps: float, param_dtype):
        self.gamma = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps, self.scale = eps, dim ** 0.5

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, self.eps) * self.scale * self.gamma.get_value().astype(xf.dtype)
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """norm1 -> SiLU -> conv1 (k3) -> norm2 -> SiLU -> (dropout 0) -> conv2 (k3); 1x1x1 shortcut if din != dout."""

    def __init__(self, din: int, dout: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = L2ChannelNorm(din, eps=eps, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(din, dout, 3, padding=1, **kw)
        self.norm2 = L2ChannelNorm(dout, eps=eps, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(dout, dout, 3, padding=1, **kw)
        self.conv_shortcut = CausalConv3d(din, dout, 1, **kw) if din != dout else None

    def __call__(self, x: jax.Array, cache: StreamStep | None = None) -> jax.Array:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)  # 1x1x1: frame-local
        x = causal_conv(self.conv1, jax.nn.silu(self.norm1(x)), cache, "conv1")
        x = causal_conv(self.conv2, jax.nn.silu(self.norm2(x)), cache, "conv2")
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the h*w pixels of each frame separately (never across time), residual; frame-
    local, so a streaming step needs no state for it."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = L2ChannelNorm(dim, eps=eps, param_dtype=param_dtype)
        self.to_qkv = Conv2d(dim, 3 * dim, 1, **kw)
        self.proj = Conv2d(dim, dim, 1, **kw)
        self.dim, self.dtype = dim, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # output channels are laid out q | k | v
        prec = matmul_precision(self.dtype)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=prec)
        logits = logits.astype(jnp.promote_types(q.dtype, jnp.float32)) / math.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        o = jnp.einsum("bqk,bkc->bqc", probs, v, precision=prec).reshape(b, t, h, w, c)
        return self.proj(o) + x


class MidBlock(nnx.Module):
    """resnets[0] -> attentions[0] -> resnets[1] at constant width."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kw), ResidualBlock(dim, dim, **kw)])
        self.attentions = nnx.List([AttentionBlock(dim, **kw)])

    def __call__(self, x: jax.Array, cache: StreamStep | None = None) -> jax.Array:
        x = self.resnets[0](x, scope(cache, "resnets.0"))
        for i, (attn, resnet) in enumerate(zip(self.attentions, self.resnets[1:]), 1):
            x = resnet(attn(x), scope(cache, f"resnets.{i}"))
        return x


RESAMPLE_MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")


class Resample(nnx.Module):
    """Spatial (and temporal, for the *3d modes) resampling by 2.

    downsample: per frame, zero-pad right/bottom by 1, 3x3 conv stride 2; downsample3d then keeps frame 0 and appends
    `time_conv` (kernel 3, stride 2, no padding) over the whole spatially downsampled sequence: 1+2k -> 1+k frames.
    upsample3d: frame 0 bypasses `time_conv`; frames 1.. go through it as their own causal sequence (2 leading zeros),
    each giving two frames (channel halves a | b, interleaved a0 b0 a1 b1 ...): 1+k -> 1+2k frames. Then, for both
    upsample modes, per frame nearest x2 and a 3x3 conv to dim // 2 channels.

    A streaming step (`cache`): the warm-up step is frame 0 alone, passed through (upsample3d leaves time_conv's
    cache at zero: frames 1.. start their own sequence); later steps send every frame through time_conv, which for
    downsample3d starts at the previous step's last frame (its stride-2 windows overlap by one frame).
    """

    def __init__(self, dim: int, mode: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"Resample mode {mode!r}; expected one of {RESAMPLE_MODES}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mode = mode
        if mode.startswith("down"):
            self.resample = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **kw) if mode == "downsample3d" \
                else None
        else:
            self.resample = Conv2d(dim, dim // 2, 3, padding=((1, 1), (1, 1)), **kw)
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), **kw) if mode == "upsample3d" \
                else None

    def __call__(self, x: jax.Array, cache: StreamStep | None = None) -> jax.Array:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest(-exact) x2: pixel i <- i // 2
        x = self.resample(x)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: jax.Array, cache: StreamStep | None) -> jax.Array:
        if cache is None:  # the whole sequence: frame 0 passes through, frames 1.. are time_conv's sequence
            if x.shape[1] == 1:
                return x
            head, rest = x[:, :1], x[:, 1:]
        elif cache.first:  # frame 0 alone; time_conv's cache stays zero for frame 1 on
            cache.write("time_conv", cache.read("time_conv", x, 2))
            return x
        else:
            head, rest = None, x
        rest = causal_conv(self.time_conv, rest, cache, "time_conv")
        b, t, h, w, c2 = rest.shape
        rest = rest.reshape(b, t, h, w, 2, c2 // 2)  # channel halves: a = [:C], b = [C:]
        rest = jnp.moveaxis(rest, 4, 2).reshape(b, 2 * t, h, w, c2 // 2).astype(x.dtype)  # a0 b0 a1 b1 ...
        return rest if head is None else jnp.concatenate([head, rest], axis=1)

    def _downsample_time(self, x: jax.Array, cache: StreamStep | None) -> jax.Array:
        if cache is None:  # frame 0 passes through, then y0 y1 y2 -> one frame, y2 y3 y4 -> the next, ...
            return jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1) if x.shape[1] >= 3 else x
        prev = None if cache.first else cache.read("time_conv", x, 1)
        cache.write("time_conv", x[:, -1:])  # the next stride-2 window starts at this chunk's last frame
        if cache.first:
            return x
        return self.time_conv(jnp.concatenate([prev.astype(x.dtype), x], axis=1))
