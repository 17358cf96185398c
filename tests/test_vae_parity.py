"""The Flax Wan2.1 VAE (whole-sequence formulation) against diffusers' chunked AutoencoderKLWan (tiny, random)."""

import numpy as np
import pytest
import jax.numpy as jnp
from flax import nnx

from decmem_jax.convert import keymap
from decmem_jax.convert import vae_keymap as vk
from decmem_jax.models.vae import LATENTS_MEAN, LATENTS_STD, WanVAE, get_vae_config
from tests import vae_reference as ref
from tests.wan_reference import load_params


def rel_err(y, r):
    """max |y - r| / max |r|: the error measure used for every parity bound in this project."""
    y, r = np.asarray(y, np.float64), np.asarray(r, np.float64)
    return float(np.abs(y - r).max() / np.abs(r).max())


@pytest.fixture(scope="module")
def reference():
    cfg = get_vae_config("tiny")
    torch_model = ref.diffusers_vae(cfg, seed=0)
    state = ref.torch_state_dict(torch_model)
    model = WanVAE(cfg, rngs=nnx.Rngs(1))
    load_params(model, vk.assemble_vae(state.items(), cfg, "diffusers"))
    fns = {name: nnx.jit(lambda m, x, name=name: getattr(m, name)(x))
           for name in ("encode_raw", "decode_raw", "encode", "decode")}
    return cfg, torch_model, state, model, fns


def video(shape, seed):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


CASES = [(2, 9, 32, 48), (1, 13, 40, 24)]  # (B, T, H, W); 40x24 gives odd latent/intermediate sizes (5x3)


@pytest.mark.parametrize("shape", CASES, ids=["B2-9x32x48", "B1-13x40x24"])
def test_encode_matches_diffusers(reference, shape):
    _, torch_model, _, model, fns = reference
    x = video((*shape, 3), seed=shape[1])
    expected = ref.encode_mean(torch_model, x)
    got = fns["encode_raw"](model, jnp.asarray(x))
    b, t, h, w = shape
    assert got.shape == expected.shape == (b, 1 + (t - 1) // 4, h // 8, w // 8, 16)
    err = rel_err(got, expected)
    print(f"encode {shape}: rel err {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("shape", CASES, ids=["B2-9x32x48", "B1-13x40x24"])
def test_decode_matches_diffusers(reference, shape):
    _, torch_model, _, model, fns = reference
    b, t, h, w = shape
    z = np.random.default_rng(t + 100).standard_normal((b, 1 + (t - 1) // 4, h // 8, w // 8, 16)).astype(np.float32)
    expected = ref.decode(torch_model, z)
    got = fns["decode_raw"](model, jnp.asarray(z))
    assert got.shape == expected.shape == (b, t, h, w, 3)
    assert float(np.abs(got).max()) <= 1.0
    assert 0.0 < np.mean(np.abs(expected) == 1.0) < 0.5, "random weights should clamp some, not most, pixels"
    err = rel_err(got, expected)
    print(f"decode {shape}: rel err {err:.2e}")
    assert err <= 1e-5


def test_normalisation_round_trip(reference):
    cfg, torch_model, _, model, fns = reference
    assert np.allclose(torch_model.config.latents_mean, LATENTS_MEAN) and np.allclose(
        torch_model.config.latents_std, LATENTS_STD)
    mean, std = np.asarray(LATENTS_MEAN, np.float32), np.asarray(LATENTS_STD, np.float32)
    x = video((1, 5, 16, 16, 3), seed=7)
    raw = np.asarray(fns["encode_raw"](model, jnp.asarray(x)))
    z = np.asarray(fns["encode"](model, jnp.asarray(x)))
    np.testing.assert_allclose(z, (raw - mean) / std, rtol=1e-6, atol=1e-6)
    # decode(normalised) is decode_raw of the de-normalised latents, which match diffusers' decode of them.
    expected = ref.decode(torch_model, z * std + mean)
    assert rel_err(fns["decode"](model, jnp.asarray(z)), expected) <= 1e-5


def test_original_layout_and_mismatch_report(reference):
    cfg, _, state, _, _ = reference
    flat = vk.assemble_vae(state.items(), cfg, "diffusers")
    # The original .pth layout (the original-to-diffusers renames) loads to the same parameters; spot-check the documented examples.
    original = {vk.original_key(k, cfg): v for k, v in state.items()}
    assert vk.original_key("decoder.up_blocks.1.resnets.0.conv_shortcut.weight", cfg) == \
        "decoder.upsamples.4.shortcut.weight"
    assert vk.original_key("decoder.up_blocks.2.upsamplers.0.resample.1.weight", cfg) == \
        "decoder.upsamples.11.resample.1.weight"
    assert {"conv1.weight", "conv2.bias", "encoder.middle.1.to_qkv.weight", "decoder.head.0.gamma",
            "encoder.downsamples.5.time_conv.weight", "decoder.upsamples.3.time_conv.weight"} <= set(original)
    assert vk.detect_vae_layout(original, cfg) == "original" and vk.detect_vae_layout(state, cfg) == "diffusers"
    from_original = vk.assemble_vae(original.items(), cfg, "original")
    assert from_original.keys() == flat.keys() and all(np.array_equal(from_original[p], flat[p]) for p in flat)
    # Export is the exact inverse.
    exported = dict(vk.iter_export_vae(flat, cfg, "diffusers"))
    assert exported.keys() == state.keys() and all(np.array_equal(exported[k], state[k]) for k in state)
    # One error lists every problem.
    broken = dict(state)
    del broken["encoder.conv_in.bias"]
    broken["decoder.norm_out.gamma"] = np.ones((8,), np.float32)
    broken["extra.weight"] = np.ones(1, np.float32)
    with pytest.raises(keymap.CheckpointMismatch) as info:
        vk.assemble_vae(broken.items(), cfg, "diffusers")
    msg = str(info.value)
    assert "missing key: encoder.conv_in.bias" in msg and "unexpected key: extra.weight" in msg
    assert "shape mismatch: decoder.norm_out.gamma: checkpoint shape (8,), expected (8, 1, 1, 1)" in msg


def test_causal_conv_cache_matches_whole_sequence(reference):
    _, _, _, model, _ = reference
    conv = model.encoder.conv_in
    x = jnp.asarray(video((1, 6, 8, 8, 3), seed=3))
    whole = conv(x)
    np.testing.assert_allclose(conv(x[:, 2:], cache=x[:, :2]), whole[:, 2:], atol=1e-6)
    np.testing.assert_allclose(conv(x[:, 1:], cache=x[:, :1]), whole[:, 1:], atol=1e-6)


def test_bad_inputs_raise_clear_errors(reference):
    _, _, _, model, _ = reference
    with pytest.raises(ValueError, match=r"T = 1 \+ 4k"):
        model.encode(jnp.zeros((1, 8, 16, 16, 3)))
    with pytest.raises(ValueError, match="divisible by 8"):
        model.encode(jnp.zeros((1, 5, 16, 20, 3)))
    with pytest.raises(ValueError, match="4 channels"):
        model.encode(jnp.zeros((1, 5, 16, 16, 4)))
    with pytest.raises(ValueError, match="z_dim=16"):
        model.decode(jnp.zeros((1, 2, 2, 2, 8)))
    with pytest.raises(ValueError, match=r"\[B, F, h, w, C\]"):
        model.decode(jnp.zeros((2, 2, 2, 16)))
