"""Fixed-capacity KV cache for block-causal (chunk-by-chunk autoregressive) inference.

Keys are stored after RoPE, so a committed frame never needs re-rotation. Shapes never change while the cache fills
(only the traced `length` does), so a jitted chunk step compiles once for the whole rollout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


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

    @classmethod
    def create(cls, *, num_layers: int, batch: int, capacity: int, tokens_per_frame: int, num_heads: int,
               head_dim: int, dtype) -> "KVCache":
        if capacity <= 0:
            raise ValueError(f"KV cache capacity must be a positive number of latent frames, got {capacity}")
        shape = (num_layers, batch, capacity * tokens_per_frame, num_heads, head_dim)
        # Committed to a device, like the outputs of a jitted commit: otherwise the first and second chunk steps
        # see different argument placements and compile twice.
        device = jax.devices()[0]
        return cls(k=jax.device_put(jnp.zeros(shape, dtype), device), v=jax.device_put(jnp.zeros(shape, dtype), device),
                   length=jax.device_put(jnp.zeros((), jnp.int32), device), tokens_per_frame=tokens_per_frame)

    def check_room(self, frames: int) -> jax.Array:
        """True when `frames` more frames fit. Raises at once when the length is concrete (outside jit)."""
        fits = self.length + frames <= self.capacity
        if not isinstance(fits, jax.core.Tracer) and not bool(fits):
            raise ValueError(f"KV cache is full: {int(self.length)} of {self.capacity} frames committed, "
                             f"cannot add a chunk of {frames}; create the cache with a larger capacity")
        return fits
