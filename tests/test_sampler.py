"""Flow samplers: Euler exactness, UniPC step-by-step parity with diffusers, Wan grid test vectors (docs/method.md §4),
scan/jit friendliness, and the batched CFG helper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decmem_jax.sampler import Euler, UniPC, flow_sigmas, guided_velocity, sample, shift_sigmas


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------------------------------------------------------
# (1) Euler is exact on the straight-line flow
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (7, 3.0), (20, 5.0)])
def test_euler_exact_on_straight_flow(num_steps, shift):
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
    sig, ts = flow_sigmas(num_steps, shift, kind="wan")
    x_T = (1 - sig[0]) * x0 + sig[0] * eps
    out, traj = sample(lambda x, t: eps - x0, x_T, sig, ts, solver="euler", return_trajectory=True)
    np.testing.assert_allclose(out, x0, atol=1e-5)
    for i in range(num_steps):  # every intermediate sample lies on the line
        np.testing.assert_allclose(traj[i], (1 - sig[i + 1]) * x0 + sig[i + 1] * eps, atol=1e-5)


def test_unipc_reaches_x0_on_straight_flow():
    # v = ε - x0 constant ⇒ every x0 prediction equals x0, so UniPC must land on x0 as well.
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
    sig, ts = flow_sigmas(10, 3.0, kind="diffusers")
    x_T = (1 - sig[0]) * x0 + sig[0] * eps
    np.testing.assert_allclose(sample(lambda x, t: eps - x0, x_T, sig, ts), x0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# (2) UniPC == diffusers UniPCMultistepScheduler(flow_prediction, use_flow_sigmas) step by step
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_steps,shift,order", [(20, 3.0, 2), (20, 5.0, 2), (50, 3.0, 2), (50, 5.0, 2),
                                                    (20, 3.0, 3), (20, 5.0, 3)])
def test_unipc_matches_diffusers(num_steps, shift, order):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
        solver_order=order, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
        thresholding=False, disable_corrector=[])
    sch.set_timesteps(num_steps)
    sig, ts = flow_sigmas(num_steps, shift, kind="diffusers")
    # Grid: timesteps are int64 (truncated) in diffusers too; σ are its float32 values exactly.
    assert sch.timesteps.dtype == torch.int64 and np.array_equal(sch.timesteps.numpy(), ts)
    assert np.array_equal(sch.sigmas.numpy().astype(np.float64), sig)

    # Toy field, non-linear in x and t; both sides fp32, each integrates its own trajectory.
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 8)) * (1.5 / np.sqrt(8))
    b = rng.standard_normal(8) * 0.3
    x_T = rng.standard_normal((2, 4, 8)).astype(np.float32)

    Wt, bt = torch.tensor(W, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    x, ref = torch.tensor(x_T), []
    for t in sch.timesteps:
        v = torch.tanh(x @ Wt.T) * (1 + t.float() / 1000) + bt
        x = sch.step(v, t, x).prev_sample
        ref.append(x.numpy())

    Wj, bj = jnp.asarray(W, jnp.float32), jnp.asarray(b, jnp.float32)
    field = lambda x, t: jnp.tanh(x @ Wj.T) * (1 + t.astype(jnp.float32) / 1000) + bj
    out, traj = jax.jit(lambda x: sample(field, x, sig, ts, order=order, return_trajectory=True))(jnp.asarray(x_T))
    assert traj.dtype == jnp.float32
    for i in range(num_steps):
        assert _rel(traj[i], ref[i]) <= 1e-5, (i, _rel(traj[i], ref[i]))
    np.testing.assert_array_equal(out, traj[-1])


def test_unipc_step_orders():
    sig, _ = flow_sigmas(6, 5.0)
    assert UniPC(sig, order=2).step_orders.tolist() == [1, 2, 2, 2, 2, 1]
    assert UniPC(sig, order=3).step_orders.tolist() == [1, 2, 3, 3, 2, 1]


# ---------------------------------------------------------------------------------------------------------------
# (3) Wan FlowUniPC grid test vectors (docs/method.md §4) and the diffusers grid's differences
# ---------------------------------------------------------------------------------------------------------------

def test_wan_grid_vectors():
    sig, ts = flow_sigmas(50, 5.0, kind="wan")
    assert sig.shape == (51,) and ts.shape == (50,) and ts.dtype == np.int64 and sig[-1] == 0.0
    assert ts[:6].tolist() == [999, 995, 991, 987, 982, 978]
    assert ts[-3:].tolist() == [241, 172, 92]
    np.testing.assert_allclose(sig[:4], [0.99980, 0.99573, 0.99153, 0.98719], atol=5e-6)
    np.testing.assert_allclose(sig[-2:], [0.0925, 0.0], atol=5e-5)
    # Definition: shift(linspace(0.999, 0, 51)[:-1]), σ stored as float32, t = int(σ·1000) from float64 σ.
    raw = shift_sigmas(np.linspace(0.999, 0, 51)[:-1], 5.0)
    np.testing.assert_array_equal(sig[:-1], raw.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(ts, (raw * 1000).astype(np.int64))


def test_diffusers_grid_vectors():
    sig, ts = flow_sigmas(50, 5.0, kind="diffusers")
    assert ts[:6].tolist() == [999, 995, 991, 987, 982, 978] and ts[-3:].tolist() == [244, 175, 96]
    np.testing.assert_allclose(sig[0], 0.999999, atol=1e-7)
    np.testing.assert_allclose(sig[-2], 0.0968, atol=5e-5)
    _, tf = flow_sigmas(50, 5.0, kind="diffusers", int_timesteps=False)
    assert tf.dtype == np.float64 and np.array_equal(tf.astype(np.int64), ts) and tf[-1] != ts[-1]


# ---------------------------------------------------------------------------------------------------------------
# (4) jit + scan with a traced step index, compiled once
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver_cls", [Euler, UniPC])
def test_scan_traced_index_compiles_once(solver_cls):
    sig, ts = flow_sigmas(12, 3.0)
    solver = solver_cls(sig)
    ts_j = jnp.asarray(ts)
    traces = []

    def field(x, t):
        return jnp.sin(x) * (t / 1000.0) + 0.1

    @jax.jit
    def run(x):
        traces.append(1)

        def body(state, i):
            return solver.step(state, field(state.x, ts_j[i]), i), None

        state, _ = jax.lax.scan(body, solver.init(x), jnp.arange(solver.num_steps))
        return state.x

    x1 = jnp.ones((2, 3), jnp.float32)
    y1 = run(x1)
    y2 = run(2.0 * x1)
    assert len(traces) == 1 and y1.shape == x1.shape and not np.allclose(y1, y2)

    # Same result from an eager Python loop (static i) and from fori_loop.
    state = solver.init(x1)
    for i in range(solver.num_steps):
        state = solver.step(state, field(state.x, ts_j[i]), i)
    np.testing.assert_allclose(state.x, y1, rtol=1e-5, atol=1e-6)
    y3 = jax.jit(lambda x: jax.lax.fori_loop(
        0, solver.num_steps, lambda i, s: solver.step(s, field(s.x, ts_j[i]), i), solver.init(x)).x)(x1)
    np.testing.assert_allclose(y3, y1, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# (5) CFG helper: one batched call and v_u + s (v_c - v_u)
# ---------------------------------------------------------------------------------------------------------------

def test_guided_velocity_one_batched_call():
    calls = []

    def model_fn(x, t, c):
        calls.append((x.shape, jnp.shape(t), c["a"].shape))
        return x * c["a"][:, None] + t + c["b"]

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    cond = {"a": jnp.asarray([1.0, 2.0, 3.0]), "b": jnp.ones((3, 4)), "none": None}
    uncond = {"a": jnp.zeros(3), "b": jnp.zeros((3, 4)), "none": None}
    s = 5.0
    for t in (jnp.float32(7.0), jnp.asarray([1.0, 2.0, 3.0])[:, None]):
        calls.clear()
        out = guided_velocity(model_fn, x, t, cond, uncond, s)
        assert len(calls) == 1 and calls[0][0] == (6, 4) and calls[0][2] == (6,)
        v_c = x * cond["a"][:, None] + t + cond["b"]
        v_u = x * uncond["a"][:, None] + t + uncond["b"]
        np.testing.assert_allclose(out, v_u + s * (v_c - v_u), rtol=1e-6, atol=1e-6)
    # scale 1 -> conditional, scale 0 -> unconditional
    np.testing.assert_allclose(guided_velocity(model_fn, x, 7.0, cond, uncond, 1.0), x * cond["a"][:, None] + 8.0,
                               rtol=1e-6)
    np.testing.assert_allclose(guided_velocity(model_fn, x, 7.0, cond, uncond, 0.0), jnp.full_like(x, 7.0))
    # under jit: traced once, still one call per trace
    calls.clear()
    jax.jit(lambda x: guided_velocity(model_fn, x, 3.0, cond, uncond, s))(x)
    assert len(calls) == 1
