"""The autoregressive rollout core: memory-bank prefill, one chunk step (denoise with CFG, then commit), and a
`lax.scan` over chunks with the KV cache in the carry (docs/method.md §12).

Per generated chunk: fresh noise [B, C, H, W, 16]; `steps` sampler steps, each one batched forward of the cond and
uncond branches (only the current chunk's conditioning differs; both read ONE history cache of batch 1); then a
commit pass at t = 0 on the clean chunk writes its keys/values (and pooled keys) into the cache. Forwards per chunk:
2·steps + 1 with CFG. Shapes never change (fixed-capacity cache, traced length), so the scan compiles once.

Everything here is pure (model state in, cache out) and device-agnostic; `decmem_jax.rollout.__main__` drives it
segment by segment and streams decoded frames into an mp4. On a device mesh, a `shard` placement
(`decmem_jax.parallel.rollout.RolloutMesh`) pins the CFG batch and the cache from outside the model: `shard.branches`
constrains the batch-2 forward's inputs, `shard.constrain_cache` the committed cache (the scan carry keeps one layout).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from decmem_jax import sampler as sampler_lib

SOLVERS = ("unipc", "euler")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How each chunk is denoised."""

    steps: int = 20
    solver: str = "unipc"
    shift: float = 5.0
    guidance: float = 5.0  # action CFG scale; 1.0 (or a model without conditioning) runs one branch, no CFG
    schedule: str = "wan"  # flow_sigmas kind

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
        if self.solver not in SOLVERS:
            raise ValueError(f"sampler solver {self.solver!r}; expected one of {SOLVERS}")
        if self.shift <= 0:
            raise ValueError(f"sampler shift must be positive, got {self.shift}")

    def uses_cfg(self, conditioned: bool) -> bool:
        return conditioned and self.guidance != 1.0


def _merge_here(graphdef, state):
    """The module rebuilt inside a lax.scan body. Copying the state tree gives Variables of this trace level; merging
    the outer ones directly makes nnx.scan (the layer scan) refuse them as coming from another trace level."""
    return nnx.merge(graphdef, jax.tree.map(lambda a: a, state))


def _velocity_fn(model, cache, context, cond, settings: SamplerSettings, shard=None):
    """v(x, t) for one chunk; with CFG a single batch-2 forward whose two rows share the batch-1 history cache.

    A cache with one row per sample (batch B > 1: several independent rollouts at once, e.g. the memory benchmark's
    clips) runs the two CFG branches as two batch-B forwards that each read the cache in place: a batch-2B forward
    would need the cache twice."""
    cfg_on = cond is not None and settings.uses_cfg(True)
    # The text context is the same in every step: its cross-attention keys/values are computed once per chunk.
    shared = not cfg_on or cache.batch > 1  # forwards of the context's own batch
    if shared:
        text_kv = model.text_kv(context)
    else:
        ctx2 = jnp.concatenate([context, context], axis=0)
        text_kv = model.text_kv(ctx2 if shard is None else shard.branches(ctx2))
    graphdef, state = nnx.split(model)  # the sampler's lax.scan needs the module as plain arrays

    def velocity(x, t):
        model = _merge_here(graphdef, state)
        tt = jnp.full(x.shape[:2], t, jnp.float32)  # per-frame timesteps [B, C]
        if not cfg_on:
            return model.forward_chunk(x, tt, None, cache, cond=cond, text_kv=text_kv)
        null = jnp.zeros_like(cond)
        if cache.batch > 1:
            b = x.shape[0]

            def branches(x2, t2, c2):
                return jnp.concatenate([model.forward_chunk(x2[:b], t2[:b], None, cache, cond=c2[:b], text_kv=text_kv),
                                        model.forward_chunk(x2[b:], t2[b:], None, cache, cond=c2[b:], text_kv=text_kv)])

            return sampler_lib.guided_velocity(branches, x, tt, cond, null, settings.guidance)

        def branches(x2, t2, c2):
            if shard is not None:  # one CFG branch per `data` device
                x2, t2, c2 = shard.branches((x2, t2, c2))
            return model.forward_chunk(x2, t2, None, cache, cond=c2, text_kv=text_kv)

        return sampler_lib.guided_velocity(branches, x, tt, cond, null, settings.guidance)

    return velocity


def chunk_step(model, cache, noise, context, cond, settings: SamplerSettings, *, with_selection: bool = False,
               shard=None):
    """Generates one chunk and commits it. noise [B, C, H, W, z]; context [B, L, text_dim]; cond [B, C, dim] or None.

    Returns (x0 [B, C, H, W, z] float32, new cache[, selection]). `selection` (DecMem models, with_selection=True)
    is the SGM retrieval of the commit pass: (ids [L, B, H, C*M, K] global block ids, counts [L, B, H, C*M]).
    shard: a mesh placement (module docstring) or None."""
    sigmas, timesteps = sampler_lib.flow_sigmas(settings.steps, settings.shift, kind=settings.schedule)
    x0 = sampler_lib.sample(_velocity_fn(model, cache, context, cond, settings, shard), noise, sigmas,
                            timesteps=timesteps.astype("float32"), solver=settings.solver)
    t0 = jnp.zeros(noise.shape[:2], jnp.float32)
    committed = model.commit(x0, t0, context, cache, cond=cond, with_selection=with_selection)
    if shard is None:
        return (x0, *committed[1:])
    return (x0, shard.constrain_cache(committed[1]), *committed[2:])


def prefill(model, cache, latents, context, cond, *, chunk: int, progress=None, shard=None):
    """Teacher-forces context latents [B, N, H, W, z] into the cache at t = 0, chunk by chunk (the memory bank).
    A last partial chunk is committed as is (one extra compilation). cond: [B, N, dim] or None. progress: optional
    callable, called with the number of latents committed after each chunk (e.g. a progress bar's update). shard: a
    mesh placement; the cache and inputs must already be on its mesh."""
    commit = _jitted_commit(shard)
    n = latents.shape[1]
    for s in range(0, n, chunk):
        rows = slice(s, min(s + chunk, n))
        x = latents[:, rows]
        c = None if cond is None else cond[:, rows]
        cache = commit(model, x, jnp.zeros(x.shape[:2], jnp.float32), context, cache, c)
        if progress is not None:
            progress(x.shape[1])
    return cache


@functools.cache
def _jitted_commit(shard=None):
    @functools.partial(nnx.jit, donate_argnums=(4,))
    def commit(model, x, t, context, cache, cond):
        cache = model.commit(x, t, context, cache, cond=cond)[1]
        return cache if shard is None else shard.constrain_cache(cache)

    return commit


def rollout_scan(model, cache, noises, context, conds, settings: SamplerSettings, *, with_selection: bool = False,
                 shard=None):
    """`lax.scan` of `chunk_step` over chunks: noises [n, B, C, H, W, z], conds [n, B, C, dim] or None.

    Returns (latents [n, B, C, H, W, z], final cache[, selections stacked over chunks]). Jit this (donating the
    cache) and call it once per segment; the scan body compiles once."""
    graphdef, state = nnx.split(model)

    def body(cache, xs):
        noise, cond = xs
        out = chunk_step(_merge_here(graphdef, state), cache, noise, context, cond, settings,
                         with_selection=with_selection, shard=shard)
        x0, cache = out[0], out[1]
        return cache, (x0, out[2] if with_selection else None)

    cache, (latents, selection) = jax.lax.scan(body, cache, (noises, conds))
    return (latents, cache, selection) if with_selection else (latents, cache)


def make_segment_fn(settings: SamplerSettings, *, with_selection: bool = False, shard=None):
    """A jitted `rollout_scan(model, cache, noises, context, conds)` with the cache donated (updated in place).
    shard: a mesh placement (the model and cache already on its mesh) or None."""

    @functools.partial(nnx.jit, donate_argnums=(1,))
    def segment(model, cache, noises, context, conds):
        return rollout_scan(model, cache, noises, context, conds, settings, with_selection=with_selection,
                            shard=shard)

    return segment


def chunk_noise(seed: int, index, shape, dtype=jnp.float32):
    """The noise of chunk `index` (deterministic per seed and chunk, whatever the segmentation)."""
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), shape, dtype)
