"""Streaming VAE encode/decode (fixed-size cache, chunk by chunk) against the whole-clip `WanVAE.encode`/`decode`.

The whole-sequence path is checked against diffusers in test_vae_parity.py; here streaming must reproduce it.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decmem_jax.models import vae_stream as vs
from decmem_jax.models.vae import WanVAE, get_vae_config

B, T, H, W = 2, 21, 32, 48  # 21 frames -> 6 latents of 4x6


def rel_err(y, r):
    y, r = np.asarray(y, np.float64), np.asarray(r, np.float64)
    return float(np.abs(y - r).max() / np.abs(r).max())


def collect(pieces):
    return np.concatenate([np.asarray(p) for p in pieces], axis=1)


@pytest.fixture(scope="module")
def setup():
    vae = WanVAE(get_vae_config("tiny"), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    video = rng.uniform(-1.0, 1.0, (B, T, H, W, 3)).astype(np.float32)
    encode = nnx.jit(lambda m, x: m.encode(x))
    decode = nnx.jit(lambda m, z: m.decode(z))
    latents = encode(vae, jnp.asarray(video))
    return vae, video, np.asarray(latents), np.asarray(decode(vae, latents)), decode


def traces(before):
    now = vs.TRACE_COUNTS
    return {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}


def test_stream_encode_and_decode_equal_whole_clip(setup):
    """(a) 21 frames in chunks of 4 pixel frames (1 + 5 steps); decode of the result, 1 latent per step (1 + 5)."""
    vae, video, latents, pixels, _ = setup
    before = dict(vs.TRACE_COUNTS)
    pieces = list(vs.stream_encode(vae, jnp.asarray(video), chunk=4))
    assert [p.shape[1] for p in pieces] == [1] * 6
    got = collect(pieces)
    assert got.shape == latents.shape == (B, 6, H // 8, W // 8, 16)
    assert rel_err(got, latents) <= 1e-5

    frames = list(vs.stream_decode(vae, latents, chunk=1))
    assert [f.shape[1] for f in frames] == [1] + [4] * 5
    assert all(f.dtype == jnp.float32 for f in frames)
    got = collect(frames)
    assert got.shape == pixels.shape == (B, T, H, W, 3) and np.abs(got).max() <= 1.0
    assert rel_err(got, pixels) <= 1e-5
    # Warm-up and steady steps traced (= compiled) once each across the 5 steady chunks. These shapes are used by no
    # other test file, and this is the first test here to stream them.
    assert traces(before) == {"encode_first": 1, "encode_step": 1, "decode_first": 1, "decode_step": 1}


@pytest.mark.parametrize("chunk", [1, 2])
def test_stream_decode_chunk_sizes(setup, chunk):
    """(b) 6 random latents: 1 + 5 latents as 5 x 1, or 2 + 2 + 1 (the tail zero-padded to 2, no recompile).
    Same shapes as (a), so only chunk=2 needs a new compile (kept to a minimum: each costs seconds on 2 cores)."""
    vae, _, _, _, decode = setup
    z = np.random.default_rng(1).standard_normal((B, 6, H // 8, W // 8, 16)).astype(np.float32)
    expected = np.asarray(decode(vae, jnp.asarray(z)))
    before = dict(vs.TRACE_COUNTS)
    frames = list(vs.stream_decode(vae, z, chunk=chunk))
    assert [f.shape[1] for f in frames] == [1] + [4 * min(chunk, 5 - s) for s in range(0, 5, chunk)]
    assert rel_err(collect(frames), expected) <= 1e-5
    # At most one compile of each step (once per chunk size; the padded tail reuses it).
    assert all(n == 1 for n in traces(before).values())


def test_iterable_inputs_with_uneven_pieces(setup):
    """(c) pieces of any size, NumPy or jax, are regrouped into the same steps (no new compiles)."""
    vae, video, latents, pixels, _ = setup
    cuts = np.cumsum([3, 1, 6, 2, 9])[:-1]  # 21 frames as 3, 1, 6, 2, 9
    pieces = [p if i % 2 else jnp.asarray(p) for i, p in enumerate(np.split(video, cuts, axis=1))]
    before = dict(vs.TRACE_COUNTS)
    got = list(vs.stream_encode(vae, iter(pieces), chunk=4))
    assert [p.shape[1] for p in got] == [1] * 6
    assert rel_err(collect(got), latents) <= 1e-5

    z_pieces = (latents[:, a:b] for a, b in [(0, 2), (2, 5), (5, 6)])  # generator of 2, 3, 1 latents
    frames = list(vs.stream_decode(vae, z_pieces, chunk=1))
    assert [f.shape[1] for f in frames] == [1] + [4] * 5
    assert rel_err(collect(frames), pixels) <= 1e-5
    assert all(n == 1 for n in traces(before).values())  # none after (a) has run, which compiled these shapes


def test_low_level_steps(setup):
    """init_*_state + jitted (state, chunk) -> (state, out) steps; the cache has fixed shapes and dtypes."""
    vae, video, latents, pixels, _ = setup
    state = vs.init_decode_state(vae, B, (H // 8, W // 8))
    layout = {k: (v.shape, v.dtype) for k, v in state.items()}
    assert layout["decoder.conv_in"] == ((B, 2, H // 8, W // 8, 16), jnp.float32)
    assert layout["decoder.up_blocks.0.upsamplers.0.time_conv"] == ((B, 2, H // 8, W // 8, 32), jnp.float32)
    assert vs.state_nbytes(state) == sum(v.nbytes for v in state.values())
    first, step = vs.decode_steps(vae)
    state, out = first(state, latents[:, :1])
    outs = [out]
    for i in range(1, 6, 1):
        state, out = step(state, latents[:, i: i + 1])
        assert {k: (v.shape, v.dtype) for k, v in state.items()} == layout
        outs.append(out)
    assert rel_err(collect(outs), pixels) <= 1e-5

    enc_state = vs.init_encode_state(vae, B, (H, W))
    # downsample3d keeps one frame (its stride-2 window overlaps the previous one by one frame), at the reduced size.
    assert enc_state["encoder.down_blocks.5.time_conv"].shape == (B, 1, H // 4, W // 4, 16)
    assert enc_state["encoder.conv_in"].shape == (B, 2, H, W, 3)


def test_bad_frame_counts_raise(setup):
    vae, video, latents, _, _ = setup
    with pytest.raises(ValueError, match=r"T=20 frames; the VAE needs T = 1 \+ 4k"):
        vs.stream_encode(vae, video[:, :20])  # raises on the call, before any work
    with pytest.raises(ValueError, match="multiple of 4"):
        vs.stream_encode(vae, video, chunk=6)
    with pytest.raises(ValueError, match="positive number"):
        vs.stream_decode(vae, latents, chunk=0)
    # Iterable: the complete latents come out, then the leftover frames are reported.
    gen = vs.stream_encode(vae, iter([video[:, :1], video[:, 1:5], video[:, 5:8]]), chunk=4)
    assert next(gen).shape[1] == 1 and next(gen).shape[1] == 1
    with pytest.raises(ValueError, match=r"T=8 frames; the VAE needs T = 1 \+ 4k \(3 trailing frames"):
        next(gen)
    with pytest.raises(ValueError, match="batch/height/width"):
        list(vs.stream_decode(vae, iter([latents[:, :1], latents[:1, 1:2]])))
    with pytest.raises(ValueError, match="no frames"):
        list(vs.stream_decode(vae, iter([])))


def test_warm_decoder_takes_the_context_in_pieces(setup):
    """`rollout.generate.warm_decoder` (the decoder's causal cache after the context, before the first generated
    chunk) decodes latent 0, then what is left over after whole pieces, then the pieces: for every piece size the
    context's pixels equal the whole-clip decode and the state equals the one-call state, and a piece size costs at
    most two compiled step shapes (the left-over and the piece), however long the context."""
    from decmem_jax.rollout.generate import warm_decoder

    vae, _, latents, pixels, _ = setup  # 6 latents
    z = jnp.asarray(latents)
    one_state, one = warm_decoder(vae, z, piece=5)  # latent 0, then the other 5 in one call
    assert [p.shape[1] for p in one] == [1, 20]
    for piece, frames in [(1, [1, 4, 4, 4, 4, 4]), (2, [1, 4, 8, 8]), (4, [1, 4, 16]), (7, [1, 20])]:
        before = dict(vs.TRACE_COUNTS)
        state, pieces = warm_decoder(vae, z, piece=piece)
        assert [p.shape[1] for p in pieces] == frames, piece
        assert traces(before).get("decode_step", 0) <= 2, piece
        assert rel_err(collect(pieces), pixels) <= 1e-5, piece
        assert state.keys() == one_state.keys()
        for k in state:
            np.testing.assert_allclose(np.asarray(state[k]), np.asarray(one_state[k]), rtol=1e-5, atol=1e-5,
                                       err_msg=f"piece={piece}, cache {k}")
    with pytest.raises(ValueError, match="piece=0"):
        warm_decoder(vae, z, piece=0)
