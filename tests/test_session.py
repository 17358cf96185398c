"""The interactive session (decmem_jax/rollout/session.py) on the shipped world-tiny model, on the CPU.

One WorldModel for the module (2 UniPC steps, no CFG: the fewest forwards, so compiling dominates) and sessions of
the same capacity, so the chunk step compiles once. The reference for `step` is the rollout CLI's own recipe written
out with the engine's functions: the whole clip's conditioning normalised once, chunk noise by index, the latents
decoded in one go.
"""

from __future__ import annotations

import numpy as np
import pytest

from decmem_jax.format import noop
from decmem_jax.rollout import session as session_lib
from decmem_jax.rollout.session import SessionError, SessionFull

MAX_CHUNKS = 2


@pytest.fixture(scope="module")
def model():
    return session_lib.WorldModel(session_lib.load_config("configs/world_tiny.py:decmem"), steps=2, guidance=1.0)


@pytest.fixture(scope="module")
def clip(model):
    n = int(model.config.rollout.context_frames)
    return session_lib.world_clip(11, n + MAX_CHUNKS * model.frames_per_chunk, model.size, revisit=True), n


def _session(model, clip):
    c, n = clip
    return model.session(c.frames[:n], c.actions[:n], c.poses[:n], world=c.world, max_chunks=MAX_CHUNKS)


def _reference(model, clip):
    """Two chunks the way `python -m decmem_jax.rollout` computes them, with the clip's own poses."""
    import jax.numpy as jnp

    from decmem_jax import video
    from decmem_jax.data.pipeline import clip_conditioning
    from decmem_jax.models import vae_stream
    from decmem_jax.models.conditioning import fixed_text_context
    from decmem_jax.rollout import engine

    c, n = clip
    dit, vae, k = model.dit, model.vae, model.frames_per_chunk
    acts, poses = clip_conditioning(c.actions, c.poses)
    text = jnp.asarray(fixed_text_context(dit.cfg.text_len, dit.cfg.text_dim, None))

    def cond(first, count, first_latent):
        return dit.embed_conditioning(jnp.asarray(acts[None, first: first + count]),
                                      jnp.asarray(poses[None, first: first + count]), first_latent=first_latent)

    latents = jnp.concatenate(list(vae_stream.stream_encode(vae, jnp.asarray(video.to_model_range(c.frames[:n]))[None],
                                                            chunk=4)), axis=1)
    cache = dit.init_cache(1, latents.shape[1] + MAX_CHUNKS * model.chunk, model.latent_hw)
    cache = engine.prefill(dit, cache, latents, text, cond(0, n, True), chunk=model.chunk)
    out = []
    for i in range(MAX_CHUNKS):
        noise = engine.chunk_noise(model.seed, i, (1, model.chunk, *model.latent_hw, dit.cfg.in_channels))
        result = model.segment_fn()(dit, cache, noise[None], text, cond(n + i * k, k, False)[None])
        cache = result[1]
        out.append(result[0][0])
    every = jnp.concatenate([latents, *out], axis=1)
    pixels = np.concatenate([np.asarray(p[0]) for p in vae_stream.stream_decode(vae, every, chunk=4)])
    return video.from_model_range(pixels[n:])


@pytest.mark.slow
def test_steps_match_the_rollout_recipe_and_report_retrieval(model, clip):
    c, n = clip
    k = model.frames_per_chunk
    session = _session(model, clip)
    assert session.context_latents == (n - 1) // 4 + 1
    results = [session.step(c.actions[n + i * k: n + (i + 1) * k]) for i in range(MAX_CHUNKS)]
    for i, r in enumerate(results):
        assert r.frames.shape == (k, *model.size, 3) and r.frames.dtype == np.uint8
        assert r.index == i and r.first_frame == n + i * k and r.seconds > 0
        np.testing.assert_allclose(r.poses, c.poses[n + i * k: n + (i + 1) * k], atol=1e-3)  # walked in the world
        history = session.context_latents + i * model.chunk
        assert r.retrieval.shape == (history,)
        assert r.retrieval.sum() == pytest.approx(1.0, abs=1e-5)
        window = model.memory.window - model.chunk  # candidates lie outside the ALM window: those get nothing
        assert np.all(r.retrieval[history - window:] == 0)
    generated = np.concatenate([r.frames for r in results])
    np.testing.assert_array_equal(session.video[n:], generated)
    # Same computation, only the decode is split differently (per latent vs 4 at a time): float rounding.
    diff = np.abs(generated.astype(int) - _reference(model, clip).astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    with pytest.raises(SessionFull, match="memory bank is full"):
        session.step(noop(k))


@pytest.mark.slow
def test_stream_pieces_and_an_abandoned_chunk(model, clip):
    k = model.frames_per_chunk
    session = _session(model, clip)
    stream = session.stream(noop(k))
    pieces = list(stream)
    assert [p.shape[0] for p in pieces] == [4] * model.chunk
    np.testing.assert_array_equal(np.concatenate(pieces), stream.result.frames)
    half = session.stream(noop(k))
    next(half)  # a page that went away mid-chunk: the memory bank holds a chunk that was never decoded
    del half
    with pytest.raises(SessionError, match="middle of a chunk"):
        session.step(noop(k))


@pytest.mark.slow
def test_bad_inputs_name_what_is_wrong(model, clip):
    c, n = clip
    k = model.frames_per_chunk
    with pytest.raises(SessionError, match=r"context frames: expected uint8 \[T, 64, 64, 3\]"):
        model.session(c.frames[:n, :32], c.actions[:n], c.poses[:n])
    with pytest.raises(SessionError, match="T = 1 \\+ 4k"):
        model.session(c.frames[:n - 1], c.actions[:n - 1], c.poses[:n - 1])
    with pytest.raises(SessionError, match="context poses"):
        model.session(c.frames[:n], c.actions[:n], c.poses[:n - 1])
    session = _session(model, clip)
    with pytest.raises(SessionError, match=r"actions: expected integer rows \[16, 8\]"):
        session.stream(noop(k - 1))
    bad = noop(k)
    bad[0, 3] = 99
    with pytest.raises(SessionError, match=r"out of range in column\(s\) \[3\]"):
        session.stream(bad)
    with pytest.raises(SessionError, match="poses"):
        session.stream(noop(k), np.full((k, 5), np.nan))
    assert session.chunks == 0 and session.video.shape[0] == n  # nothing was generated by the bad calls


def test_missing_weights_and_config_are_named(tmp_path):
    c = session_lib.load_config("configs/world_tiny.py:decmem")
    with c.unlocked():
        c.checkpoint = str(tmp_path / "nope")
    with pytest.raises(SessionError, match=r"config.checkpoint .*nope: no such folder"):
        session_lib.WorldModel(c)
    with pytest.raises(SessionError, match="config configs/absent.py: file not found"):
        session_lib.load_config("configs/absent.py")


def test_free_poses_follow_the_agent_in_open_space():
    from decmem_jax.data import agent

    start = (10.0, 5.0, 20.0, 0.0, 30.0)
    acts = np.stack([agent.TURN_RIGHT, agent.FORWARD, agent.FORWARD, agent.LOOK_DOWN, agent.BACK])
    poses = session_lib.free_poses(start, acts)
    assert poses.shape == (5, 5)
    assert poses[0, 4] == pytest.approx(45.0) and poses[3, 3] == pytest.approx(15.0)
    hx, hz = agent.heading(45.0)
    np.testing.assert_allclose(poses[2, [0, 2]], [10 + 2 * agent.STEP * hx, 20 + 2 * agent.STEP * hz], atol=1e-5)
    np.testing.assert_allclose(poses[4, [0, 2]], [10 + agent.STEP * hx, 20 + agent.STEP * hz], atol=1e-5)
    assert np.all(poses[:, 1] == 5.0)
