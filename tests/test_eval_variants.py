"""The memory benchmark's variants: the SGM switch (alm_only), dense weights in ALM's window (dense_window) against a
dense model under a sliding-window mask, the ranked SGM selections, and the batched per-clip rollout."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decmem_jax.models import attention as attn_lib
from decmem_jax.models import memory as mem
from decmem_jax.rollout import engine

ROOT = Path(__file__).resolve().parents[1]
GRID = (8, 8)


def _tiny(sgm=True, seed=0):
    from tests.test_rollout import tiny_model

    return tiny_model(seed=seed, sgm=sgm)


def _inputs(model, frames, seed=1):
    rng = np.random.default_rng(seed)
    lat = jnp.asarray(rng.standard_normal((1, frames, *GRID, 16)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 5, model.cfg.text_dim)), jnp.float32)
    acts = jnp.asarray(rng.integers(0, 3, (1, 1 + 4 * (frames - 1), 8)), jnp.int32)
    poses = jnp.asarray(rng.standard_normal((1, 1 + 4 * (frames - 1), 5)), jnp.float32)
    pose_on = model.cfg.conditioning.pose == "added"
    return lat, ctx, model.embed_conditioning(acts, poses if pose_on else None)


def _chunk_output(model, lat, ctx, cond, chunk, t=0.6):
    """Velocity of the last chunk after committing the others (the inference path)."""
    f = lat.shape[1]
    cache = engine.prefill(model, model.init_cache(1, f, GRID), lat[:, :f - chunk], ctx, cond[:, :f - chunk],
                           chunk=chunk)
    x = lat[:, f - chunk:]
    return np.asarray(model.forward_chunk(x, jnp.full((1, chunk), t), ctx, cache, cond=cond[:, f - chunk:]))


@pytest.mark.slow
def test_sgm_switch_is_the_alm_window_alone():
    """sgm=False gives exactly what zero gates give (o = o_alm), on the full-sequence and the chunk path, records no
    retrieval, and differs from the gated model (so the switch does something)."""
    from decmem_jax.rollout.load import with_memory

    model = _tiny()
    off = with_memory(model, dataclasses.replace(model.cfg.memory, sgm=False))
    zero = with_memory(model, model.cfg.memory)
    zero.blocks.gate.kernel.set_value(jnp.zeros_like(zero.blocks.gate.kernel.get_value()))
    zero.blocks.gate.bias.set_value(jnp.zeros_like(zero.blocks.gate.bias.get_value()))
    frames, chunk = 8, 2
    lat, ctx, cond = _inputs(model, frames)
    t = jnp.full((1,), 0.5)
    full = {name: np.asarray(m(lat, t, ctx, chunk_size=chunk, cond=cond)) for name, m in
            (("on", model), ("off", off), ("zero", zero))}
    np.testing.assert_allclose(full["off"], full["zero"], atol=1e-5)
    assert np.abs(full["on"] - full["off"]).max() > 1e-3
    chunked = {name: _chunk_output(m, lat, ctx, cond, chunk) for name, m in (("on", model), ("off", off),
                                                                              ("zero", zero))}
    np.testing.assert_allclose(chunked["off"], chunked["zero"], atol=1e-5)
    assert np.abs(chunked["on"] - chunked["off"]).max() > 1e-3
    cache = engine.prefill(off, off.init_cache(1, frames, GRID), lat[:, :6], ctx, cond[:, :6], chunk=chunk)
    _, _, (ids, counts) = off.commit(lat[:, 6:], jnp.zeros((1, 2)), ctx, cache, cond=cond[:, 6:], with_selection=True)
    assert int(np.asarray(counts).max()) == 0


def test_ranked_selection_orders_the_same_blocks_by_score():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 2, 3, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 2, 10, 8)), jnp.float32)
    cand = jnp.asarray(np.arange(10)[None, :] < np.array([[10], [6], [2]]))[None, None]  # 10, 6, 2 candidates
    idx, cnt, ranked = mem.select_blocks(q, k, cand, 4, ranked=True)
    scores = np.where(np.asarray(cand), np.einsum("bhqd,bhkd->bhqk", q, k), -np.inf)
    idx, cnt, ranked = np.asarray(idx), np.asarray(cnt), np.asarray(ranked)
    assert cnt[0, 0].tolist() == [4, 4, 2]
    for h in range(2):
        for r in range(3):
            n = cnt[0, h, r]
            assert sorted(ranked[0, h, r, :n].tolist()) == idx[0, h, r, :n].tolist()
            s = scores[0, h, r, ranked[0, h, r, :n]]
            assert (np.diff(s) <= 0).all() and ranked[0, h, r, 0] == np.argmax(scores[0, h, r])


@pytest.fixture(scope="module")
def shipped_dense():
    from decmem_jax.weights import load_model

    return load_model(ROOT / "weights/world_tiny/dense", dtype="float32")


@pytest.mark.slow
def test_dense_weights_in_the_alm_window_equal_dense_attention_under_a_sliding_window(shipped_dense):
    """dense_window = the stage-2 weights in a DecMem model with SGM off and zero gates. Reference: the dense model
    itself over the whole sequence under a frame mask that keeps the ALM window (visible frames within `window`
    latents of the chunk's end), history at t = 0 and the last chunk at t, through the masked-attention path;
    checked on the chunk-by-chunk inference path, with the shipped weights and their memory layout."""
    from decmem_jax.eval.variants import dense_in_window
    from decmem_jax.weights import load_model

    dense = shipped_dense
    memory = load_model(ROOT / "weights/world_tiny/decmem", dtype="float32").cfg.memory
    windowed = dense_in_window(dense, memory)
    assert windowed.cfg.memory.window == 8 and not windowed.cfg.memory.sgm
    frames, chunk, t = 16, 4, 0.6
    lat, ctx, cond = _inputs(dense, frames, seed=3)
    got = _chunk_output(windowed, lat, ctx, cond, chunk, t)

    plan = mem.causal_plan(frames, chunk)
    tpf = (GRID[0] // 2) * (GRID[1] // 2)

    def mixer(mask):
        return lambda q, k, v, memory, layer_in, use_memory: (attn_lib.frame_masked_attention(
            q, k, v, mask, tokens_per_frame=tpf, backend="xla"), None)

    steps = jnp.concatenate([jnp.zeros((1, frames - chunk)), jnp.full((1, chunk), t)], axis=1)
    ref = {name: np.asarray(dense._forward(lat, steps, ctx, cond, mixer(mask))[0][:, frames - chunk:])
           for name, mask in (("window", plan.window(memory.window)), ("full", plan.visible))}
    scale = np.abs(ref["window"]).max()
    assert np.abs(got - ref["window"]).max() <= 2e-4 * scale
    assert np.abs(ref["full"] - ref["window"]).max() > 1e-2 * scale  # the window really cuts the history here
    np.testing.assert_allclose(_chunk_output(dense, lat, ctx, cond, chunk, t), ref["full"], atol=2e-4 * scale)


@pytest.mark.slow
def test_batched_clips_roll_out_as_they_do_alone():
    """Two clips in one forward (a cache row each, CFG as two forwards) = each clip alone (batch-1 cache, CFG as one
    batch-2 forward), latents and SGM selections."""
    model = _tiny()
    settings = engine.SamplerSettings(steps=2, guidance=3.0)
    rng = np.random.default_rng(0)
    ctx = jnp.asarray(rng.standard_normal((1, 5, 64)), jnp.float32)
    lat = jnp.asarray(rng.standard_normal((2, 3, *GRID, 16)), jnp.float32)
    cond = model.embed_conditioning(jnp.asarray(rng.integers(0, 3, (2, 1 + 4 * 6, 8)), jnp.int32))  # [2, 7, dim]
    conds = cond[:, 3:].reshape(2, 2, 2, -1).transpose(1, 0, 2, 3)  # 2 chunks of 2
    noise = [jnp.stack([engine.chunk_noise(seed, i, (1, 2, *GRID, 16)) for i in range(2)]) for seed in (5, 6)]
    segment = engine.make_segment_fn(settings, with_selection=True)
    alone = []
    for b in range(2):
        cache = engine.prefill(model, model.init_cache(1, 7, GRID), lat[b:b + 1], ctx, cond[b:b + 1, :3], chunk=2)
        alone.append(segment(model, cache, noise[b], ctx, conds[:, b:b + 1]))
    ctx2 = jnp.concatenate([ctx, ctx])
    cache = engine.prefill(model, model.init_cache(2, 7, GRID), lat, ctx2, cond[:, :3], chunk=2)
    both = segment(model, cache, jnp.concatenate(noise, axis=1), ctx2, conds)
    for b in range(2):
        ref = np.asarray(alone[b][0])[:, 0]
        assert np.abs(np.asarray(both[0])[:, b] - ref).max() <= 1e-4 * np.abs(ref).max()
        np.testing.assert_array_equal(np.asarray(both[2][0])[:, :, b], np.asarray(alone[b][2][0])[:, :, 0])
