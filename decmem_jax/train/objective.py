"""The teacher-forcing rectified-flow objective (`../shared/reference/decmem_method.md` §9.1-9.2).

For clean latents z0 [B, F, H, W, C] (F = chunks * chunk):
  per chunk c:  u ~ U(0, 1),  sigma_c = s*u / (1 + (s-1)*u)          (shift s = 5.0 pushes sigma towards 1)
  noisy       z_t = (1 - sigma) * z0 + sigma * eps,  eps ~ N(0, I)   (sigma constant inside a chunk)
  target      v = eps - z0;  model timestep t = 1000 * sigma          (Wan's timestep scale)
  prediction  model.teacher_forcing(z0, z_t, t, ...): one [clean ; noisy] sequence, noisy chunk c sees the clean
              chunks before it and itself; only the noisy frames' velocity comes back
  loss        mean over the noisy frames of (v_pred - v)^2             (clean tokens are never supervised)
CFG action dropout: with probability `dropout` per sample the NOISY copy's conditioning is zeroed (`drop`); the
clean history keeps its actions, as at inference (§7.3).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NUM_TRAIN_TIMESTEPS = 1000.0  # Wan's timestep = 1000 * sigma


@dataclasses.dataclass(frozen=True)
class Objective:
    chunk: int = 4  # latent frames per chunk
    sigma_shift: float = 5.0
    dropout: float = 0.1  # CFG action dropout rate (noisy copy only)
    conditioned: bool = True  # the model takes actions (and poses)
    poses: bool = True  # the model takes poses (conditioning pose mode "added")

    def __post_init__(self):
        if self.chunk < 1 or self.sigma_shift <= 0 or not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"Objective: chunk={self.chunk} must be >= 1, sigma_shift={self.sigma_shift} > 0, "
                             f"dropout={self.dropout} in [0, 1]")


def shift_sigma(u: jax.Array, shift: float) -> jax.Array:
    """sigma = s*u / (1 + (s-1)*u): the timestep shift of Wan's flow schedules, applied to u in [0, 1]."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_noise(key: jax.Array, z0: jax.Array, obj: Objective) -> dict:
    """Per-chunk sigmas, the noisy latents, the velocity target, Wan timesteps and the CFG drop mask."""
    b, f = z0.shape[:2]
    if f % obj.chunk:
        raise ValueError(f"objective: {f} latent frames are not a whole number of chunks of {obj.chunk}")
    k_sigma, k_eps, k_drop = jax.random.split(key, 3)
    sigma = shift_sigma(jax.random.uniform(k_sigma, (b, f // obj.chunk), jnp.float32), obj.sigma_shift)
    sigma = jnp.repeat(sigma, obj.chunk, axis=1)  # [B, F], constant inside a chunk
    eps = jax.random.normal(k_eps, z0.shape, jnp.float32)
    s = sigma[:, :, None, None, None]
    z0 = z0.astype(jnp.float32)
    return dict(noisy=(1.0 - s) * z0 + s * eps, target=eps - z0, timesteps=sigma * NUM_TRAIN_TIMESTEPS,
                sigma=sigma, drop=jax.random.bernoulli(k_drop, obj.dropout, (b,)))


def loss_fn(model, batch: dict, context: jax.Array, key: jax.Array, obj: Objective) -> tuple[jax.Array, dict]:
    """Scalar loss and auxiliary metrics for one (micro)batch: {"latents" [B,F,H,W,C], "actions" [B,T,8],
    "poses" [B,T,5]}; context [1 or B, L, text_dim] (the fixed text context)."""
    z0 = batch["latents"]
    n = sample_noise(key, z0, obj)
    kwargs = {}
    if obj.conditioned:
        kwargs = dict(actions=batch["actions"], drop=n["drop"])
        if obj.poses:
            kwargs["poses"] = batch["poses"]
    ctx = jnp.broadcast_to(context, (z0.shape[0],) + context.shape[1:])
    v = model.teacher_forcing(z0.astype(jnp.float32), n["noisy"], n["timesteps"], ctx, chunk_size=obj.chunk,
                              **kwargs)
    loss = jnp.mean(jnp.square(v.astype(jnp.float32) - n["target"]))
    return loss, {"sigma_mean": jnp.mean(n["sigma"])}
