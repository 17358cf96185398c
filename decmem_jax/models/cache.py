"""Fixed-capacity KV caches for block-causal (chunk-by-chunk autoregressive) inference.

Keys are stored after RoPE, so a committed frame never needs re-rotation. Shapes never change while a cache fills
(only the traced `length` does), so a jitted chunk step compiles once for the whole rollout.

- `KVCache`: token-major, for the dense model (every committed token is attended).
- `BlockKVCache`: DecMem's block-major layout (`memory.BlockLayout`: a block is one contiguous [P, H, D] slab, so
  kernels address selected blocks directly) plus the per-head mean-pooled key of every committed block, computed
  once at commit time (SGM scores every query block against them).

A cache of batch 1 can serve a forward of batch B (the CFG branches share one history, docs/method.md §9):
attention folds the batch into the queries instead of broadcasting the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


def _on_device(x):
    # Committed to a device, like the outputs of a jitted commit: otherwise the first and second chunk steps see
    # different argument placements and compile twice.
    return jax.device_put(x, jax.devices()[0])


def _check_room(length, capacity: int, frames: int) -> jax.Array:
    fits = length + frames <= capacity
    if not isinstance(fits, jax.core.Tracer) and not bool(fits):
        raise ValueError(f"KV cache is full: {int(length)} of {capacity} frames committed, "
                         f"cannot add a chunk of {frames}; create the cache with a larger capacity")
    return fits


@struct.dataclass
class KVCache:
    """Self-attention keys/values of every layer for `capacity` latent frames.

    k, v: [num_layers, B, capacity * tokens_per_frame, num_heads, head_dim] in the compute dtype.
    length: int32 scalar, number of committed latent frames (slots [0, length * tokens_per_frame) are valid).
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array
    tokens_per_frame: int = struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:
        return self.k.shape[2] // self.tokens_per_frame

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @classmethod
    def create(cls, *, num_layers: int, batch: int, capacity: int, tokens_per_frame: int, num_heads: int,
               head_dim: int, dtype) -> "KVCache":
        if capacity <= 0:
            raise ValueError(f"KV cache capacity must be a positive number of latent frames, got {capacity}")
        shape = (num_layers, batch, capacity * tokens_per_frame, num_heads, head_dim)
        return cls(k=_on_device(jnp.zeros(shape, dtype)), v=_on_device(jnp.zeros(shape, dtype)),
                   length=_on_device(jnp.zeros((), jnp.int32)), tokens_per_frame=tokens_per_frame)

    def check_room(self, frames: int) -> jax.Array:
        """True when `frames` more frames fit. Raises at once when the length is concrete (outside jit)."""
        return _check_room(self.length, self.capacity, frames)

    def layers(self):
        """Per-layer history, scanned over the layer axis."""
        return (self.k, self.v)

    def write(self, new, frames: int) -> "KVCache":
        """Appends a chunk: new = (k, v) [L, B, frames*T, H, D] from the blocks."""
        offset = self.length * self.tokens_per_frame
        k, v = (jax.lax.dynamic_update_slice_in_dim(old, x.astype(old.dtype), offset, axis=2)
                for old, x in zip((self.k, self.v), new))
        return self.replace(k=k, v=v, length=self.length + frames)


@struct.dataclass
class BlockKVCache:
    """DecMem cache: block-major keys/values and pooled keys of every layer for `capacity` latent frames.

    k, v: [num_layers, B, capacity * M * P, num_heads, head_dim] (padding slots hold zeros);
    pool: [num_layers, B, num_heads, capacity * M, head_dim] float32 per-head mean of each block's valid keys;
    length: int32 scalar, committed latent frames.
    """

    k: jax.Array
    v: jax.Array
    pool: jax.Array
    length: jax.Array
    tokens_per_frame: int = struct.field(pytree_node=False)
    blocks: int = struct.field(pytree_node=False)
    slots: int = struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:
        return self.pool.shape[3] // self.blocks

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @classmethod
    def create(cls, *, num_layers: int, batch: int, capacity: int, tokens_per_frame: int, blocks: int, slots: int,
               num_heads: int, head_dim: int, dtype) -> "BlockKVCache":
        if capacity <= 0:
            raise ValueError(f"KV cache capacity must be a positive number of latent frames, got {capacity}")
        shape = (num_layers, batch, capacity * blocks * slots, num_heads, head_dim)
        pool = (num_layers, batch, num_heads, capacity * blocks, head_dim)
        return cls(k=_on_device(jnp.zeros(shape, dtype)), v=_on_device(jnp.zeros(shape, dtype)),
                   pool=_on_device(jnp.zeros(pool, jnp.float32)), length=_on_device(jnp.zeros((), jnp.int32)),
                   tokens_per_frame=tokens_per_frame, blocks=blocks, slots=slots)

    def check_room(self, frames: int) -> jax.Array:
        return _check_room(self.length, self.capacity, frames)

    def layers(self):
        return (self.k, self.v, self.pool)

    def write(self, new, frames: int) -> "BlockKVCache":
        """Appends a chunk: new = (k, v) [L, B, frames*M*P, H, D] block-major and pooled keys [L, B, H, frames*M, D]."""
        kb, vb, pool = new
        offset = self.length * self.blocks * self.slots
        k = jax.lax.dynamic_update_slice_in_dim(self.k, kb.astype(self.k.dtype), offset, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(self.v, vb.astype(self.v.dtype), offset, axis=2)
        p = jax.lax.dynamic_update_slice_in_dim(self.pool, pool.astype(jnp.float32), self.length * self.blocks, axis=3)
        return self.replace(k=k, v=v, pool=p, length=self.length + frames)
