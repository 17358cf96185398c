"""The Flax Wan2.1 DiT against the live diffusers WanTransformer3DModel (tiny config, every parameter random)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decmem_jax.convert import keymap
from decmem_jax.models.config import ConditioningConfig, MemoryConfig, get_config
from decmem_jax.models.dit import WanDiT
from decmem_jax.models.layers import Linear
from tests import wan_reference as ref


def rel_err(y, r):
    """max |y - r| / max |r|: the error measure used for every parity bound in this project."""
    y, r = np.asarray(y, np.float64), np.asarray(r, np.float64)
    return float(np.abs(y - r).max() / np.abs(r).max())


@pytest.fixture(scope="module")
def reference():
    cfg = get_config("tiny", dtype="float32")
    torch_model = ref.diffusers_wan(cfg, seed=0)
    flat = keymap.assemble(ref.torch_state_dict(torch_model).items(), cfg, "diffusers")
    return cfg, torch_model, flat


def make_model(cfg, flat):
    model = WanDiT(cfg, rngs=nnx.Rngs(1))
    ref.load_params(model, flat)
    return model


def inputs(grid, seed):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((2, 5, *grid, 16)).astype(np.float32)
    timesteps = np.array([37.0, 912.0], np.float32)
    context = rng.standard_normal((2, 7, 64)).astype(np.float32)  # 7 real tokens, padded to text_len inside
    return latents, timesteps, context


@pytest.mark.parametrize("grid", [(8, 8), (6, 10)], ids=["8x8", "6x10"])
def test_fp32_matches_diffusers(reference, grid):
    cfg, torch_model, flat = reference
    latents, t, ctx = inputs(grid, seed=sum(grid))
    expected = ref.run_diffusers(torch_model, latents, t, ctx, cfg.text_len)
    got = make_model(cfg, flat)(jnp.asarray(latents), jnp.asarray(t), jnp.asarray(ctx))
    assert got.shape == expected.shape == (2, 5, *grid, 16)
    assert rel_err(got, expected) <= 1e-5


def test_bf16_compute_close_to_fp32_reference(reference):
    cfg, torch_model, flat = reference
    latents, t, ctx = inputs((6, 10), seed=3)
    expected = ref.run_diffusers(torch_model, latents, t, ctx, cfg.text_len)
    model = make_model(cfg.replace(dtype="bfloat16"), flat)
    got = model(jnp.asarray(latents), jnp.asarray(t), jnp.asarray(ctx))
    err = rel_err(got, expected)
    assert err <= 2e-2
    assert err > 1e-5, "bf16 compute should not be bit-identical to fp32: the dtype policy is not applied"


def test_per_frame_timesteps_and_padding_rules(reference):
    cfg, _, flat = reference
    model = make_model(cfg, flat)
    latents, t, ctx = inputs((8, 8), seed=5)
    full = model(jnp.asarray(latents), jnp.asarray(t), jnp.asarray(ctx))
    per_frame = model(jnp.asarray(latents), jnp.repeat(jnp.asarray(t)[:, None], 5, axis=1), jnp.asarray(ctx))
    np.testing.assert_allclose(per_frame, full, rtol=0, atol=1e-6)
    # Padding the context with explicit zero rows is what the model does itself.
    padded = np.concatenate([ctx, np.zeros((2, 20, 64), np.float32)], axis=1)
    np.testing.assert_allclose(model(jnp.asarray(latents), jnp.asarray(t), jnp.asarray(padded)), full, atol=1e-6)
    # Different per-frame timesteps really change the per-frame modulation.
    t2 = jnp.asarray(np.array([[37.0, 37.0, 500.0, 500.0, 912.0]] * 2, np.float32))
    assert rel_err(model(jnp.asarray(latents), t2, jnp.asarray(ctx)), full) > 1e-3


def test_bad_inputs_raise_clear_errors(reference):
    cfg, _, flat = reference
    model = make_model(cfg, flat)
    latents, t, ctx = inputs((8, 8), seed=0)
    with pytest.raises(ValueError, match="channels last"):
        model(jnp.asarray(latents.transpose(0, 4, 1, 2, 3)), jnp.asarray(t), jnp.asarray(ctx))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(jnp.asarray(latents[:, :, :7]), jnp.asarray(t), jnp.asarray(ctx))
    with pytest.raises(ValueError, match="text_len"):
        model(jnp.asarray(latents), jnp.asarray(t), jnp.zeros((2, cfg.text_len + 1, 64)))
    with pytest.raises(ValueError, match="timesteps"):
        model(jnp.asarray(latents), jnp.zeros((2, 3)), jnp.asarray(ctx))


def loss_step(cfg, flat, seed):
    """(jitted state -> (loss, grads), the model's state, its forward lowered to text): loss = mean(out^2) on fixed
    4x4-latent inputs, the reference weights."""
    latents, t, ctx = inputs((4, 4), seed=seed)
    args = (jnp.asarray(latents), jnp.asarray(t), jnp.asarray(ctx))
    graphdef, state = nnx.split(make_model(cfg, flat))
    step = jax.jit(jax.value_and_grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(*args) ** 2)))
    return step, state, jax.jit(lambda s: nnx.merge(graphdef, s)(*args)).lower(state).as_text()


def test_remat_policies_give_same_values_and_gradients(reference):
    cfg, _, flat = reference
    results = {}
    for policy in ("none", "full", "dots"):
        step, state, _ = loss_step(cfg.replace(remat=policy), flat, seed=7)
        value, grads = step(state)
        results[policy] = (value, jax.tree.leaves(nnx.state(grads, nnx.Param)))
    base_value, base_grads = results["none"]
    assert all(float(jnp.abs(g).max()) > 0 for g in base_grads)
    for policy in ("full", "dots"):
        value, grads = results[policy]
        np.testing.assert_allclose(value, base_value, rtol=1e-6)
        for g, g0 in zip(grads, base_grads):  # same math, different op order: compare in norm
            assert float(jnp.linalg.norm(g - g0) / jnp.linalg.norm(g0)) <= 1e-5


def test_linear_layout_pins_layouts_not_values(reference):
    """DiTConfig.linear_layout="row_major" puts a layout constraint on every Linear output (and, by its transpose
    rule, on the cotangent) and changes no value or gradient; "auto" pins only on GPU; a bad value names the field."""
    cfg, _, flat = reference
    results = {}
    for layout in ("xla", "row_major"):
        step, state, forward = loss_step(cfg.replace(linear_layout=layout, remat="full"), flat, seed=11)
        results[layout] = (step(state), forward.count("LayoutConstraint"),
                           step.lower(state).as_text().count("LayoutConstraint"))
    (value_x, grads_x), n_fwd_x, n_grad_x = results["xla"]
    (value_r, grads_r), n_fwd_r, n_grad_r = results["row_major"]
    # 16 Linear calls: text MLP 2, time MLP 2, time projection 1, head 1, and the scanned block body's 10 (self q/k/v/o,
    # cross q/k/v/o, fc1, fc2); under value_and_grad each output's cotangent is pinned too.
    assert (n_fwd_x, n_grad_x) == (0, 0) and n_fwd_r == 16 and n_grad_r > n_fwd_r
    assert float(value_r) == float(value_x)  # bit for bit: a layout is where the bytes go, not what they are
    # The gradients agree to float32 rounding: the pins move XLA's fusion boundaries, so a few sums (bias grads)
    # add in another order.
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads_x))
    for g, g0 in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads_x)):
        assert float(jnp.linalg.norm(g - g0) / jnp.linalg.norm(g0)) <= 1e-6
    assert cfg.replace(linear_layout="auto").row_major_linear == (jax.default_backend() == "gpu")
    # Inference resolves "auto" to XLA's layouts (the pin pays in the backward only) and keeps an explicit choice.
    assert cfg.replace(linear_layout="auto", remat="full").for_inference() == cfg.replace(linear_layout="xla",
                                                                                           remat="none")
    assert cfg.replace(linear_layout="row_major").for_inference().row_major_linear
    # Every Linear of a DecMem model (gate, conditioning MLPs included) takes the setting.
    full = cfg.replace(linear_layout="row_major", memory=MemoryConfig(blocks_per_frame=1, block_slots=64, top_k=2))
    full = full.replace(conditioning=ConditioningConfig.from_dit(full))
    model = nnx.eval_shape(lambda: WanDiT(full, rngs=nnx.Rngs(0)))
    linears = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)]
    assert len(linears) == 19 and all(isinstance(m, Linear) and m.row_major for m in linears)  # 11 per block, 8 more
    with pytest.raises(ValueError, match="linear_layout='tiled'"):
        cfg.replace(linear_layout="tiled")


def test_layers_are_scanned_so_program_size_does_not_grow_with_depth():
    def program_size(num_layers):
        cfg = get_config("tiny", dtype="float32", num_layers=num_layers)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
        x = jax.ShapeDtypeStruct((1, 2, 4, 4, 16), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.float32)
        c = jax.ShapeDtypeStruct((1, 3, cfg.text_dim), jnp.float32)
        jaxpr = jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, x, t, c).jaxpr
        scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        assert [e.params["length"] for e in scans] == [num_layers]
        return len(jaxpr.eqns), len(scans[0].params["jaxpr"].jaxpr.eqns)

    assert program_size(2) == program_size(12)
