"""The teacher-forcing rectified-flow objective (`docs/method.md` §11).

For clean latents z0 [B, F, H, W, C] (F = chunks * chunk):
  per chunk c:  u ~ U(0, 1),  sigma_c = s*u / (1 + (s-1)*u)          (shift s = 5.0 pushes sigma towards 1)
  noisy       z_t = (1 - sigma) * z0 + sigma * eps,  eps ~ N(0, I)   (sigma constant inside a chunk)
  target      v = eps - z0;  model timestep t = 1000 * sigma          (Wan's timestep scale)
  prediction  model.teacher_forcing(z0, z_t, t, ...): one [clean ; noisy] sequence, noisy chunk c sees the clean
              chunks before it and itself; only the noisy frames' velocity comes back
  loss        mean over the noisy frames of (v_pred - v)^2             (clean tokens are never supervised)
CFG action dropout: with probability `dropout` per sample the NOISY copy's conditioning is zeroed (`drop`); the
clean history keeps its actions, as at inference (docs/method.md §9).
Context noise augmentation (`context_noise` > 0, off by default; not part of the DecMem method): each chunk of the
history copy is noised to its own level s_c ~ U(0, context_noise), z_c = (1 - s_c) z0 + s_c eps', and runs at
timestep 1000 s_c. A model trained only on perfect history drifts when its history is its own imperfect samples; seeing
slightly corrupted history in training is the usual remedy for autoregressive diffusion world models.
Retrieval loss (`retrieval_loss` > 0, off by default; not part of the DecMem method): + retrieval_loss * the
cross-entropy of SGM's block scores against the latents that show the same view (from the clip's camera poses,
`format.view_match`), see `memory.retrieval_loss`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from decmem_jax.format import frames_for_latents, latent_of_frame, view_match

NUM_TRAIN_TIMESTEPS = 1000.0  # Wan's timestep = 1000 * sigma


@dataclasses.dataclass(frozen=True)
class Objective:
    chunk: int = 4  # latent frames per chunk
    sigma_shift: float = 5.0
    dropout: float = 0.1  # CFG action dropout rate (noisy copy only)
    conditioned: bool = True  # the model takes actions (and poses)
    poses: bool = True  # the model takes poses (conditioning pose mode "added")
    context_noise: float = 0.0  # max noise level of the history copy (0 = clean history, the method's protocol)
    retrieval_loss: float = 0.0  # weight of the pose-supervised SGM retrieval loss (0 = the method: none)

    def __post_init__(self):
        if self.chunk < 1 or self.sigma_shift <= 0 or not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"Objective: chunk={self.chunk} must be >= 1, sigma_shift={self.sigma_shift} > 0, "
                             f"dropout={self.dropout} in [0, 1]")
        if not 0.0 <= self.context_noise < 1.0:
            raise ValueError(f"Objective: context_noise={self.context_noise} must be in [0, 1)")
        if self.retrieval_loss < 0 or (self.retrieval_loss > 0 and not self.poses):
            raise ValueError(f"Objective: retrieval_loss={self.retrieval_loss} must be >= 0, and > 0 needs poses "
                             "(its targets come from the camera poses)")


def latent_view_match(poses: jax.Array, num_latents: int) -> jax.Array:
    """bool [B, F, F]: latents i and j show a common view (some frame of i matches some frame of j, see
    `format.view_match`). poses [B, T, 5] with T = 1 + 4(F-1) (`format.frames_for_latents`): latent 0 is frame 0,
    latent j >= 1 frames 4j-3..4j (`format.latent_of_frame`)."""
    t, expected = poses.shape[1], frames_for_latents(num_latents)
    if t != expected:
        raise ValueError(f"latent_view_match: {t} poses for {num_latents} latents (expected {expected})")
    frames = view_match(poses.astype(jnp.float32), xp=jnp).astype(jnp.float32)  # [B, T, T]
    owner = jax.nn.one_hot(latent_of_frame(np.arange(t)), num_latents, dtype=jnp.float32)  # [T, F]
    return jnp.einsum("tf,bts,sg->bfg", owner, frames, owner) > 0


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
    out = dict(clean=z0, clean_timesteps=None, noisy=(1.0 - s) * z0 + s * eps, target=eps - z0,
               timesteps=sigma * NUM_TRAIN_TIMESTEPS, sigma=sigma, drop=jax.random.bernoulli(k_drop, obj.dropout, (b,)))
    if obj.context_noise > 0:
        k_level, k_noise = jax.random.split(jax.random.fold_in(key, 1))  # the draws above stay as without it
        level = jnp.repeat(jax.random.uniform(k_level, (b, f // obj.chunk), jnp.float32, 0.0, obj.context_noise),
                           obj.chunk, axis=1)
        c = level[:, :, None, None, None]
        out.update(clean=(1.0 - c) * z0 + c * jax.random.normal(k_noise, z0.shape, jnp.float32),
                   clean_timesteps=level * NUM_TRAIN_TIMESTEPS)
    return out


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
    retrieve = obj.retrieval_loss > 0
    if retrieve:
        kwargs["retrieval_target"] = latent_view_match(batch["poses"], z0.shape[1])
    out = model.teacher_forcing(n["clean"], n["noisy"], n["timesteps"], ctx, chunk_size=obj.chunk,
                                clean_timesteps=n["clean_timesteps"], **kwargs)
    v, retrieval = out if retrieve else (out, None)
    flow = jnp.mean(jnp.square(v.astype(jnp.float32) - n["target"]))
    metrics = {"sigma_mean": jnp.mean(n["sigma"])}
    if not retrieve:
        return flow, metrics
    return flow + obj.retrieval_loss * retrieval["retrieval_ce"], {**metrics, "flow_loss": flow, **retrieval}
