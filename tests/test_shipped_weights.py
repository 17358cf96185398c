"""The shipped world model (weights/world_tiny) against a recorded reference output: a short rollout from a fixed
generated clip must reproduce the recorded latents and frames, so a change that breaks the model, the sampler, the
rollout or the weights fails here.

Re-record after an intended change (new weights, a deliberate numerical change), and say why in the commit:

    DECMEM_RECORD_REFERENCE=1 JAX_PLATFORMS=cpu .venv/bin/python -m pytest -q tests/test_shipped_weights.py
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import world_tiny
from decmem_jax import video
from decmem_jax.data import generate_world
from decmem_jax.data.pipeline import clip_conditioning
from decmem_jax.models import vae_stream
from decmem_jax.models.conditioning import fixed_text_context
from decmem_jax.rollout import engine
from decmem_jax.rollout.load import build_models, weights_sha256

REFERENCE = Path(__file__).parent / "data" / "world_tiny_reference.npz"
CONTEXT, CHUNKS, STEPS = 17, 2, 4  # 5 context latents, 2 generated chunks of 4 latents, 4 UniPC steps
# CPU float32; other CPUs (vector widths, XLA versions) may reorder sums: this leaves room for that, not for a change
# of the model (a broken layer moves latents by O(1)).
ATOL_LATENTS, ATOL_PIXELS = 2e-3, 4.0 / 255


def _rollout():
    c = world_tiny.get_config("decmem")
    root = Path(__file__).resolve().parents[1]
    c.checkpoint, c.vae_checkpoint = str(root / c.checkpoint), str(root / c.vae_checkpoint)
    c.rollout.update(dtype="float32", steps=STEPS)
    dit, vae, _ = build_models(c)
    frames, actions, poses, _ = generate_world.make_clip(0, CONTEXT + 16 * CHUNKS, (64, 64), seed=11, revisit=True)
    actions, poses = clip_conditioning(actions, poses)
    lat_hw = (8, 8)
    latents = jnp.concatenate(list(vae_stream.stream_encode(vae, jnp.asarray(video.to_model_range(
        frames[:CONTEXT]))[None], chunk=4)), axis=1)
    cond = dit.embed_conditioning(jnp.asarray(actions[None]), jnp.asarray(poses[None]))  # [1, 5 + 8, dim]
    n_ctx = latents.shape[1]
    text = jnp.asarray(fixed_text_context(dit.cfg.text_len, dit.cfg.text_dim))
    cache = engine.prefill(dit, dit.init_cache(1, n_ctx + 4 * CHUNKS, lat_hw), latents, text, cond[:, :n_ctx],
                           chunk=4)
    noises = jnp.stack([engine.chunk_noise(0, i, (1, 4, *lat_hw, 16)) for i in range(CHUNKS)])
    conds = cond[:, n_ctx:].reshape(1, CHUNKS, 4, -1).transpose(1, 0, 2, 3)
    out, _ = engine.make_segment_fn(engine.SamplerSettings(steps=STEPS, shift=c.rollout.shift,
                                                           guidance=c.rollout.guidance))(dit, cache, noises, text,
                                                                                         conds)
    gen = jnp.concatenate([latents, out.transpose(1, 0, 2, 3, 4, 5).reshape(1, 4 * CHUNKS, *lat_hw, 16)], axis=1)
    pixels = np.concatenate([np.asarray(p) for p in vae_stream.stream_decode(vae, gen, chunk=1)], axis=1)[0]
    return (np.asarray(out, np.float32), video.from_model_range(pixels[CONTEXT:]),
            {"dit": weights_sha256(dit), "vae": weights_sha256(vae)})


@pytest.mark.slow
def test_shipped_weights_reproduce_the_recorded_rollout():
    latents, frames, hashes = _rollout()
    assert np.isfinite(latents).all() and frames.shape == (16 * CHUNKS, 64, 64, 3)
    if os.environ.get("DECMEM_RECORD_REFERENCE") == "1":
        REFERENCE.parent.mkdir(exist_ok=True)
        np.savez_compressed(REFERENCE, latents=latents, frames=frames, dit_sha256=hashes["dit"],
                            vae_sha256=hashes["vae"], jax=jax.__version__)
        pytest.skip(f"recorded {REFERENCE}")
    with np.load(REFERENCE) as ref:
        assert str(ref["dit_sha256"]) == hashes["dit"] and str(ref["vae_sha256"]) == hashes["vae"], (
            "the shipped weights changed since the reference was recorded; re-record it (see the module docstring)")
        np.testing.assert_allclose(latents, ref["latents"], atol=ATOL_LATENTS, rtol=0)
        diff = np.abs(frames.astype(np.int16) - ref["frames"].astype(np.int16))
        assert diff.max() <= ATOL_PIXELS * 255 + 1e-6, f"decoded frames moved by up to {diff.max()} levels"
