"""The scan-based rollout (decmem_jax.rollout.engine) against an unrolled loop, and a long tiny rollout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decmem_jax.models.conditioning import ConditioningConfig
from decmem_jax.models.config import MemoryConfig, get_config
from decmem_jax.models.dit import WanDiT
from decmem_jax.rollout import engine

C, GRID = 2, (8, 8)  # chunk (latents), latent H x W


def tiny_model(seed=0, **memory):
    base = get_config("tiny", dtype="float32")
    mem = dict(blocks_per_frame=3, block_slots=64, top_k=3, window=4, backend="reference")
    cfg = base.replace(memory=MemoryConfig(**{**mem, **memory}), conditioning=ConditioningConfig.from_dit(base, hidden=32))
    model = WanDiT(cfg, rngs=nnx.Rngs(seed))
    rng = jax.random.key(seed + 1)
    for lin in (model.blocks.gate, model.conditioning.action_mlp.linear_2):  # as if trained (zero at init)
        rng, sub = jax.random.split(rng)
        lin.kernel.set_value(0.05 * jax.random.normal(sub, lin.kernel.get_value().shape))
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
    return model


def test_scan_rollout_equals_unrolled_chunk_steps():
    model = tiny_model()
    settings = engine.SamplerSettings(steps=3, solver="unipc", guidance=3.0)
    rng = np.random.default_rng(0)
    context = jnp.asarray(rng.standard_normal((1, 5, 64)), jnp.float32)
    ctx_latents = jnp.asarray(rng.standard_normal((1, 3, *GRID, 16)), jnp.float32)  # 3: a partial last chunk
    actions = jnp.asarray(rng.integers(0, 3, (1, 1 + 4 * (3 + 3 * C - 1), 8)), jnp.int32)
    cond = model.embed_conditioning(actions)  # [1, 3 + 3C, dim]
    cache = engine.prefill(model, model.init_cache(1, 3 + 3 * C, GRID), ctx_latents, context, cond[:, :3], chunk=C)
    assert int(cache.length) == 3
    noises = jnp.stack([engine.chunk_noise(0, i, (1, C, *GRID, 16)) for i in range(3)])
    conds = cond[:, 3:].reshape(1, 3, C, -1).transpose(1, 0, 2, 3)

    step = nnx.jit(lambda m, k, n, x, c: engine.chunk_step(m, k, n, x, c, settings))
    loop_cache, outs = jax.tree.map(jnp.copy, cache), []
    for i in range(3):
        x0, loop_cache = step(model, loop_cache, noises[i], context, conds[i])
        outs.append(x0)
    segment = engine.make_segment_fn(settings, with_selection=True)
    latents, scan_cache, (sel, cnt) = segment(model, jax.tree.map(jnp.copy, cache), noises, context, conds)
    ref = np.stack([np.asarray(o) for o in outs])
    assert float(np.abs(np.asarray(latents) - ref).max()) <= 1e-5 * float(np.abs(ref).max())
    assert int(scan_cache.length) == int(loop_cache.length) == 3 + 3 * C
    np.testing.assert_allclose(np.asarray(scan_cache.pool), np.asarray(loop_cache.pool), atol=1e-5)
    # Diagnostics: per chunk, layer, head and query block, top-k (3) retrieved among committed + own blocks.
    assert sel.shape[:3] == (3, 2, 1) and int(cnt.max()) == 3 and int(cnt.min()) == 3
    frames_seen = 3 + (np.arange(3) + 1) * C  # committed + own frames when each chunk was committed
    assert (np.asarray(sel).max(axis=(1, 2, 3, 4, 5)) < frames_seen * 3).all()
    assert np.isfinite(np.asarray(latents)).all() and float(np.abs(ref).max()) > 0.1
