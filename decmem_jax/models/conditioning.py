"""Action and camera-pose conditioning for the DiT (`docs/method.md` §9).

    cond = Conditioning(ConditioningConfig(dim=1536, pose="added"), rngs=nnx.Rngs(0))
    emb = cond(batch["actions"], batch["poses"], drop=mask)   # float32 [B, F, dim], F = (T - 1) / 4 + 1
    tokens = tokens + emb[:, :, None, :]                       # broadcast over the T_tokens of each latent frame

Per-frame action features (`action_features`, width A = len(cfg.action_features); default A = 12, in this order):

    0 forward   idx0 == 1        1 back   idx0 == 2        2 left    idx1 == 1        3 right  idx1 == 2
    4 jump      idx2 == 1        5 sneak  idx2 == 2        6 sprint  idx2 == 3
    7 camera_pitch  idx3 - 12    8 camera_yaw  idx4 - 12   (signed 15-degree steps: bin 11 -> -1, 12 -> 0, 13 -> +1)
    9 use       idx5 == 1       10 attack idx5 == 3       11 place   idx5 == 6

{0, 1} flags, cameras signed; the no-op row [0,0,0,12,12,0,0,0] maps to all zeros (the pipeline's default first
row; a literal all-zero row would read as a -180 degree turn on both axes). The craft/equip arguments (idx 6, 7) are
not used. Per-frame pose features (`pose_features`, P = 7): [x, y, z] / pose_scale (16 blocks), then sin, cos of
pitch and of yaw (degrees): continuous and wrap-safe, so WorldMem's mod-360 angles need no unwrapping. Positions are
taken as given: the pipeline has already made them relative to the clip's first frame.

Per-latent grouping (`group_by_latent`): latent 0 <-> frame 0, latent j >= 1 <-> frames 4j-3 .. 4j, concatenated in
time order into a [4 * C] vector. Latent 0 is padded with ZEROS in its first three slots and holds frame 0 in its
last slot (as `data.pipeline.group_by_latent`): the last slot is always the frame the latent ends at, and zero
action features read as "no action". `first_latent=False` groups a continuation chunk of T = 4F frames (no
single-frame latent), e.g. the frames of a rollout chunk that does not start at latent 0.

Each stream (actions; poses when pose="added") goes through its own MLP psi: Linear -> SiLU -> Linear, the LAST
Linear zero-initialised (kernel and bias), so a fresh module outputs exact zeros and the pretrained DiT is unchanged.
The streams are summed. Dtypes as the DiT: parameters in `param_dtype` (float32), matmuls in `dtype`
("auto" = float32 on CPU, bfloat16 elsewhere), the output always float32.

CFG (docs/method.md §9): the null condition is the ZERO embedding (not a learned token). `drop` (bool [B] or
[B, F], True = dropped) zeroes the embedding of those samples / latent frames exactly; use `drop_mask` for training
dropout restricted to the noisy chunk's latents, and drop=True on the uncond half of a cond/uncond batch at inference.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decmem_jax.format import FRAMES_PER_LATENT
from decmem_jax.models.config import (  # the conditioning's config lives with the other model configs
    ACTION_FEATURES, DEFAULT_ACTION_FEATURES, DTYPES, POSE_FEATURE_DIM, ConditioningConfig)
from decmem_jax.models.layers import linear


def action_features(actions, features: tuple[str, ...] = DEFAULT_ACTION_FEATURES) -> jax.Array:
    """Raw MineDojo actions int [.., T, 8] -> float32 [.., T, len(features)] (layout in the module docstring)."""
    actions = jnp.asarray(actions)
    if actions.shape[-1] != 8:
        raise ValueError(f"actions must be [.., T, 8] MineDojo vectors, got shape {actions.shape}")
    cols = []
    for name in features:
        if name not in ACTION_FEATURES:
            raise ValueError(f"unknown action feature {name!r}; known: {DEFAULT_ACTION_FEATURES}")
        slot, kind, value = ACTION_FEATURES[name]
        a = actions[..., slot]
        cols.append((a == value) if kind == "eq" else (a - value))
    return jnp.stack([c.astype(jnp.float32) for c in cols], axis=-1)


def pose_features(poses, pose_scale: float = 16.0) -> jax.Array:
    """Poses [.., T, 5] (x, y, z, pitch, yaw in degrees) -> float32 [.., T, 7]:
    [x, y, z] / pose_scale, sin(pitch), cos(pitch), sin(yaw), cos(yaw)."""
    poses = jnp.asarray(poses, jnp.float32)
    if poses.shape[-1] != 5:
        raise ValueError(f"poses must be [.., T, 5] (x, y, z, pitch, yaw), got shape {poses.shape}")
    ang = jnp.deg2rad(poses[..., 3:5])
    pitch, yaw = ang[..., 0:1], ang[..., 1:2]
    return jnp.concatenate([poses[..., :3] / pose_scale, jnp.sin(pitch), jnp.cos(pitch), jnp.sin(yaw),
                            jnp.cos(yaw)], axis=-1)


def num_latents(num_frames: int, frames_per_latent: int = FRAMES_PER_LATENT, *, first_latent: bool = True) -> int:
    """Latent frames for T frames: (T - 1) / n + 1 (first_latent) or T / n; ValueError if T does not fit."""
    n = frames_per_latent
    if first_latent:
        if num_frames < 1 or (num_frames - 1) % n:
            raise ValueError(f"expected T = 1 + {n}k frames (latent 0 <-> frame 0, then {n} frames per latent), "
                             f"got T = {num_frames}")
        return (num_frames - 1) // n + 1
    if num_frames < 1 or num_frames % n:
        raise ValueError(f"expected T = {n}k frames for a continuation chunk (first_latent=False), "
                         f"got T = {num_frames}")
    return num_frames // n


def group_by_latent(x, frames_per_latent: int = FRAMES_PER_LATENT, *, first_latent: bool = True) -> jax.Array:
    """Per-frame [.., T, C] -> per-latent [.., F, frames_per_latent * C], frames concatenated in time order.

    first_latent=True: T = 1 + n(F - 1); latent 0 = [0, .., 0, frame 0] (zero padding first, frame 0 last).
    first_latent=False: T = nF, every latent has n frames."""
    x = jnp.asarray(x)
    n = frames_per_latent
    t, c = x.shape[-2], x.shape[-1]
    f = num_latents(t, n, first_latent=first_latent)
    if first_latent:
        pad = [(0, 0)] * (x.ndim - 2) + [(n - 1, 0), (0, 0)]
        x = jnp.pad(x, pad)
    return x.reshape(*x.shape[:-2], f, n * c)


def null_like(embedding) -> jax.Array:
    """The CFG null condition for an embedding [B, F, dim]: zeros of the same shape, float32 (docs/method.md §9)."""
    return jnp.zeros(jnp.shape(embedding), jnp.float32)


def drop_mask(key, batch: int, rate: float, noisy=None) -> jax.Array:
    """Training dropout for `Conditioning(drop=...)`: each sample dropped with probability `rate`.

    noisy: optional bool [F] marking the latent frames of the noisy target chunk; then only those are dropped
    (clean history keeps its conditioning, docs/method.md §9) and the mask is [B, F]; otherwise [B]."""
    per_sample = jax.random.bernoulli(key, rate, (batch,))
    if noisy is None:
        return per_sample
    return per_sample[:, None] & jnp.asarray(noisy, bool)[None, :]


class _ZeroInitMLP(nnx.Module):
    """Linear -> SiLU -> Linear with the last Linear's kernel and bias zero-initialised."""

    def __init__(self, din: int, hidden: int, dout: int, *, dtype, param_dtype, rngs: nnx.Rngs, row_major=False):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, row_major=row_major)
        self.linear_1, self.linear_2 = linear(din, hidden, **kw), linear(hidden, dout, **kw)
        self.linear_2.kernel.set_value(jnp.zeros_like(self.linear_2.kernel.get_value()))
        self.linear_2.bias.set_value(jnp.zeros_like(self.linear_2.bias.get_value()))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class Conditioning(nnx.Module):
    """Per-latent-frame conditioning vectors [B, F, dim] (float32) from per-frame actions (and poses)."""

    def __init__(self, cfg: ConditioningConfig, *, rngs: nnx.Rngs, row_major: bool = False):
        """row_major: pin the MLPs' Linear outputs (the DiT passes DiTConfig.linear_layout, layers.Linear)."""
        self.cfg = cfg
        kw = dict(dtype=cfg.compute_dtype, param_dtype=DTYPES[cfg.param_dtype], rngs=rngs, row_major=row_major)
        n = cfg.frames_per_latent
        self.action_mlp = _ZeroInitMLP(n * cfg.action_dim, cfg.hidden, cfg.dim, **kw)
        self.pose_mlp = _ZeroInitMLP(n * POSE_FEATURE_DIM, cfg.hidden, cfg.dim, **kw) if cfg.pose == "added" else None

    def __call__(self, actions: jax.Array, poses: jax.Array | None = None, *, drop: jax.Array | None = None,
                 first_latent: bool = True) -> jax.Array:
        """actions int [B, T, 8]; poses float [B, T, 5] (required when pose="added", ignored when "off");
        drop bool [B] or [B, F] (True -> zero embedding). T = 1 + 4(F-1), or 4F with first_latent=False."""
        cfg = self.cfg
        n = cfg.frames_per_latent
        a = group_by_latent(action_features(actions, cfg.action_features), n, first_latent=first_latent)
        emb = self.action_mlp(a.astype(cfg.compute_dtype)).astype(jnp.float32)
        if self.pose_mlp is not None:
            if poses is None:
                raise ValueError("ConditioningConfig.pose='added' needs poses [B, T, 5]")
            if jnp.shape(poses)[:-1] != jnp.shape(actions)[:-1]:
                raise ValueError(f"poses {jnp.shape(poses)} and actions {jnp.shape(actions)} differ in [B, T]")
            p = group_by_latent(pose_features(poses, cfg.pose_scale), n, first_latent=first_latent)
            emb = emb + self.pose_mlp(p.astype(cfg.compute_dtype)).astype(jnp.float32)
        if drop is not None:
            drop = jnp.asarray(drop, bool)
            if drop.ndim == 1:
                drop = drop[:, None]
            if drop.ndim != 2 or drop.shape[0] != emb.shape[0] or drop.shape[1] not in (1, emb.shape[1]):
                raise ValueError(f"drop must be bool [B] or [B, F] for an embedding {emb.shape}, got {drop.shape}")
            emb = jnp.where(drop[..., None], jnp.float32(0), emb)
        return emb


def fixed_text_context(text_len: int, text_dim: int, path: str | os.PathLike | None = None) -> np.ndarray:
    """The fixed text context for action-conditioned generation, float32 [1, text_len, text_dim].

    path=None: all zeros (what Wan's own zero padding would give for an empty prompt; the DiT still runs its text MLP
    and cross-attention on these rows). Otherwise a precomputed text-encoder output: `.npy` holding [L, text_dim] or
    [1, L, text_dim], or `.npz` holding such an array under the key `context`; L <= text_len rows, zero-padded to
    text_len here (as the DiT would pad it), so every context has one fixed shape."""
    if path is None:
        return np.zeros((1, text_len, text_dim), np.float32)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text context file not found: {path}")
    if path.endswith(".npz"):
        with np.load(path) as data:
            if "context" not in data:
                raise ValueError(f"{path}: no 'context' array (keys: {sorted(data.files)})")
            ctx = np.asarray(data["context"])
    else:
        ctx = np.asarray(np.load(path, allow_pickle=False))
    if ctx.ndim == 2:
        ctx = ctx[None]
    if ctx.ndim != 3 or ctx.shape[0] != 1:
        raise ValueError(f"{path}: text context must be [L, text_dim] or [1, L, text_dim], got shape {ctx.shape}")
    if ctx.shape[-1] != text_dim:
        raise ValueError(f"{path}: text context has last dimension {ctx.shape[-1]}, "
                         f"the DiT expects text_dim={text_dim}")
    if ctx.shape[1] > text_len:
        raise ValueError(f"{path}: text context has {ctx.shape[1]} rows, more than text_len={text_len}")
    if not np.isfinite(ctx).all():
        raise ValueError(f"{path}: text context contains NaN or Inf")
    return np.pad(ctx.astype(np.float32), ((0, 0), (0, text_len - ctx.shape[1]), (0, 0)))
