"""Block-causal mode: chunk-by-chunk inference against the KV cache equals the full-sequence block-causal forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decmem_jax.models.config import get_config
from decmem_jax.models.dit import WanDiT

CHUNK, CHUNKS, GRID = 2, 4, (6, 8)
FRAMES = CHUNK * CHUNKS


def rel_err(y, r):
    return float(np.abs(np.asarray(y) - np.asarray(r)).max() / np.abs(np.asarray(r)).max())


@pytest.fixture(scope="module")
def setup():
    cfg = get_config("tiny", dtype="float32")
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    # Weights committed to a device, as `load_dit` returns them (placement is part of jit's cache key).
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((2, FRAMES, *GRID, 16)), jnp.float32)
    # Per-frame timesteps as in teacher forcing / rollout: different for every chunk and sample.
    timesteps = jnp.asarray(rng.uniform(0, 1000, (2, CHUNKS)).repeat(CHUNK, axis=1), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 7, cfg.text_dim)), jnp.float32)
    full = nnx.jit(lambda m, x, t, c: m(x, t, c, chunk_size=CHUNK))(model, latents, timesteps, context)
    return model, latents, timesteps, context, full


def test_incremental_with_cache_equals_full_block_causal(setup):
    model, latents, timesteps, context, full = setup
    traces = {"forward_chunk": 0, "commit": 0}

    @nnx.jit
    def forward_chunk(model, x, t, ctx, cache):
        traces["forward_chunk"] += 1
        return model.forward_chunk(x, t, ctx, cache)

    @nnx.jit
    def commit(model, x, t, ctx, cache):
        traces["commit"] += 1
        return model.commit(x, t, ctx, cache)

    cache = model.init_cache(2, FRAMES, GRID)
    for i in range(CHUNKS):
        frames = slice(i * CHUNK, (i + 1) * CHUNK)
        x, t = latents[:, frames], timesteps[:, frames]
        out = forward_chunk(model, x, t, context, cache)
        assert rel_err(out, full[:, frames]) <= 1e-5, f"chunk {i}"
        out_commit, cache = commit(model, x, t, context, cache)
        assert rel_err(out_commit, full[:, frames]) <= 1e-5, f"commit pass of chunk {i}"
        assert int(cache.length) == (i + 1) * CHUNK
    # Filling the cache across all chunks traced (and so compiled) each step exactly once.
    assert traces == {"forward_chunk": 1, "commit": 1}


def test_future_chunks_do_not_change_earlier_outputs(setup):
    model, latents, timesteps, context, full = setup
    perturbed = latents.at[:, 2 * CHUNK:].add(3.0)  # change chunks 2 and 3 only
    t2 = timesteps.at[:, 2 * CHUNK:].set(999.0)
    out = nnx.jit(lambda m, x, t, c: m(x, t, c, chunk_size=CHUNK))(model, perturbed, t2, context)
    np.testing.assert_array_equal(np.asarray(out[:, : 2 * CHUNK]), np.asarray(full[:, : 2 * CHUNK]))
    assert rel_err(out[:, 2 * CHUNK:], full[:, 2 * CHUNK:]) > 1e-2  # and later chunks do see the change
    # Bidirectional (no chunking) mode, by contrast, lets the future leak back.
    bidir = nnx.jit(lambda m, x, t, c: m(x, t, c))(model, latents, timesteps, context)
    assert rel_err(bidir[:, :CHUNK], full[:, :CHUNK]) > 1e-3


def test_chunk_as_large_as_the_video_is_bidirectional(setup):
    model, latents, timesteps, context, _ = setup
    step = nnx.jit(lambda m, x, t, c, n: m(x, t, c, chunk_size=n), static_argnums=4)
    bidir = nnx.jit(lambda m, x, t, c: m(x, t, c))(model, latents, timesteps, context)
    assert rel_err(step(model, latents, timesteps, context, FRAMES), bidir) <= 1e-6


def test_cache_overflow_is_loud(setup):
    model, latents, timesteps, context, _ = setup
    cache = model.init_cache(2, CHUNK, GRID)  # room for one chunk only
    _, cache = model.commit(latents[:, :CHUNK], timesteps[:, :CHUNK], context, cache)
    with pytest.raises(ValueError, match="KV cache is full"):
        model.forward_chunk(latents[:, CHUNK:2 * CHUNK], timesteps[:, :CHUNK], context, cache)
    # Under jit the length is traced and cannot raise: the output is poisoned and the length does not advance.
    out, after = nnx.jit(lambda m, x, t, c, k: m.commit(x, t, c, k))(
        model, latents[:, CHUNK:2 * CHUNK], timesteps[:, :CHUNK], context, cache)
    assert bool(jnp.isnan(out).all()) and int(after.length) == CHUNK
    np.testing.assert_array_equal(np.asarray(after.k), np.asarray(cache.k))
    with pytest.raises(ValueError, match="tokens per frame"):
        model.forward_chunk(latents[:, :CHUNK, :4], timesteps[:, :CHUNK], context, model.init_cache(2, 4, GRID))
