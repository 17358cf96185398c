"""Action / pose conditioning (decmem_jax/models/conditioning.py): features, grouping, zero-init, drop, text context."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decmem_jax.format import noop
from decmem_jax.models import conditioning as C
from decmem_jax.models.config import get_config

NAMES = C.DEFAULT_ACTION_FEATURES


def _act(**slots):
    a = noop(1)[0]
    for i, v in slots.items():
        a[int(i[1:])] = v
    return a


def _feat(row):
    f = np.asarray(C.action_features(row[None]))[0]
    return {n: float(v) for n, v in zip(NAMES, f) if v != 0}


def test_action_feature_vectors():
    assert len(NAMES) == 12
    assert _feat(noop(1)[0]) == {}
    assert _feat(_act(s0=1)) == {"forward": 1.0}
    assert _feat(_act(s0=2)) == {"back": 1.0}
    assert _feat(_act(s1=1)) == {"left": 1.0}
    assert _feat(_act(s1=2)) == {"right": 1.0}
    assert _feat(_act(s2=1)) == {"jump": 1.0}
    assert _feat(_act(s2=2)) == {"sneak": 1.0}
    assert _feat(_act(s2=3)) == {"sprint": 1.0}
    assert _feat(_act(s3=11)) == {"camera_pitch": -1.0}
    assert _feat(_act(s3=13)) == {"camera_pitch": 1.0}
    assert _feat(_act(s4=11)) == {"camera_yaw": -1.0}
    assert _feat(_act(s4=13)) == {"camera_yaw": 1.0}
    assert _feat(_act(s4=0)) == {"camera_yaw": -12.0}
    assert _feat(_act(s5=1)) == {"use": 1.0}
    assert _feat(_act(s5=3)) == {"attack": 1.0}
    assert _feat(_act(s5=6)) == {"place": 1.0}
    assert _feat(_act(s5=2, s6=5, s7=3)) == {}  # drop, craft/equip arguments: unused
    assert _feat(_act(s0=1, s3=13, s4=11)) == {"forward": 1.0, "camera_pitch": 1.0, "camera_yaw": -1.0}
    # Batched leading axes, dtype, feature subsets in the given order.
    a = np.stack([noop(5), noop(5)])
    a[1, 2, 0] = 1
    f = C.action_features(a)
    assert f.shape == (2, 5, 12) and f.dtype == jnp.float32 and float(f.sum()) == 1.0 and f[1, 2, 0] == 1
    sub = C.action_features(_act(s0=1, s4=13)[None], ("camera_yaw", "forward"))
    np.testing.assert_array_equal(sub, [[1.0, 1.0]])
    with pytest.raises(ValueError, match="unknown action feature"):
        C.action_features(a, ("fly",))
    with pytest.raises(ValueError, match="unknown"):
        C.ConditioningConfig(action_features=("fly",))


def test_pose_features_continuous_and_wrap_safe():
    p = np.array([[16.0, -8.0, 32.0, 0.0, 90.0], [0.0, 0.0, 0.0, 359.999, 360.0], [0, 0, 0, -0.001, 0.0]], np.float32)
    f = np.asarray(C.pose_features(p))
    assert f.shape == (3, C.POSE_FEATURE_DIM)
    np.testing.assert_allclose(f[0], [1.0, -0.5, 2.0, 0.0, 1.0, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(f[1], f[2], atol=1e-4)  # 359.999 == -0.001, 360 == 0
    np.testing.assert_allclose(f[1, 3:], [0.0, 1.0, 0.0, 1.0], atol=1e-4)
    with pytest.raises(ValueError, match="poses"):
        C.pose_features(np.zeros((3, 4)))


def test_group_by_latent_shapes_and_latent0_rule():
    x = np.arange(9 * 2, dtype=np.float32).reshape(9, 2) + 1  # T = 9 -> F = 3, C = 2
    g = np.asarray(C.group_by_latent(x))
    assert g.shape == (3, 8)
    np.testing.assert_array_equal(g[0], [0, 0, 0, 0, 0, 0, *x[0]])  # zeros first, frame 0 last
    np.testing.assert_array_equal(g[1], x[1:5].reshape(-1))
    np.testing.assert_array_equal(g[2], x[5:9].reshape(-1))
    assert C.group_by_latent(np.zeros((2, 3, 1, 5))).shape == (2, 3, 1, 20)  # T = 1 -> one latent
    assert C.group_by_latent(np.zeros((2, 17, 12))).shape == (2, 5, 48)
    assert C.group_by_latent(np.zeros((2, 7, 3)), 2).shape == (2, 4, 6)
    cont = np.asarray(C.group_by_latent(x[1:], first_latent=False))  # continuation chunk T = 4F
    np.testing.assert_array_equal(cont, g[1:])
    for t in (0, 2, 4, 8, 10):
        with pytest.raises(ValueError, match="1 \\+ 4k"):
            C.group_by_latent(np.zeros((t, 3)))
    with pytest.raises(ValueError, match="4k"):
        C.group_by_latent(np.zeros((9, 3)), first_latent=False)
    assert C.num_latents(237) == 60


def _inputs(b=2, t=9, seed=0):
    rng = np.random.default_rng(seed)
    a = noop(b * t).reshape(b, t, 8)
    a[..., 0] = rng.integers(0, 3, (b, t))
    a[..., 4] = rng.integers(11, 14, (b, t))
    p = rng.normal(size=(b, t, 5)).astype(np.float32) * np.float32(30)
    return jnp.asarray(a), jnp.asarray(p)


def _perturb(mod, seed=1):
    """Random weights in the zero-initialised last layers."""
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    for mlp in (mod.action_mlp, mod.pose_mlp):
        if mlp is not None:
            for prm in (mlp.linear_2.kernel, mlp.linear_2.bias):
                prm.set_value(jax.random.normal(next(keys), prm.get_value().shape))


@pytest.mark.parametrize("pose", ["off", "added"])
def test_fresh_module_outputs_exact_zeros(pose):
    cfg = C.ConditioningConfig(dim=32, hidden=16, pose=pose, dtype="float32")
    mod = C.Conditioning(cfg, rngs=nnx.Rngs(0))
    a, p = _inputs()
    out = mod(a, p)
    assert out.shape == (2, 3, 32) and out.dtype == jnp.float32
    assert not np.any(np.asarray(out))
    assert mod.action_mlp.linear_1.kernel.get_value().dtype == jnp.float32
    assert (mod.pose_mlp is None) == (pose == "off")


def test_depends_on_actions_and_poses_after_perturbation():
    a, p = _inputs()
    a2 = a.at[0, 5, 0].set(1 - a[0, 5, 0].clip(0, 1))  # change one action in latent 2 of sample 0
    p2 = p.at[1, 0, 0].add(8.0)  # move frame 0 (latent 0) of sample 1

    on = C.Conditioning(C.ConditioningConfig(dim=32, hidden=16, pose="added", dtype="float32"), rngs=nnx.Rngs(0))
    _perturb(on)
    base = np.asarray(on(a, p))
    da = np.abs(np.asarray(on(a2, p)) - base)
    assert da[0, 2].max() > 1e-4 and da[0, :2].max() == 0 and da[1].max() == 0  # only that latent frame
    dp = np.abs(np.asarray(on(a, p2)) - base)
    assert dp[1, 0].max() > 1e-4 and dp[1, 1:].max() == 0 and dp[0].max() == 0
    with pytest.raises(ValueError, match="needs poses"):
        on(a)

    off = C.Conditioning(C.ConditioningConfig(dim=32, hidden=16, pose="off", dtype="float32"), rngs=nnx.Rngs(0))
    _perturb(off)
    base = np.asarray(off(a, p))
    assert np.abs(np.asarray(off(a2, p)) - base).max() > 1e-4
    np.testing.assert_array_equal(off(a, p2), base)
    np.testing.assert_array_equal(off(a), base)  # poses ignored entirely


def test_drop_zeroes_exactly_the_dropped_samples():
    mod = C.Conditioning(C.ConditioningConfig(dim=32, hidden=16, pose="added", dtype="float32"), rngs=nnx.Rngs(0))
    _perturb(mod)
    a, p = _inputs(b=3)
    full = np.asarray(mod(a, p))
    assert np.all(np.abs(full).sum(-1) > 0)
    out = np.asarray(mod(a, p, drop=jnp.array([False, True, False])))
    np.testing.assert_array_equal(out[[0, 2]], full[[0, 2]])
    assert not np.any(out[1])
    m = np.zeros((3, 3), bool)
    m[0, 2] = m[2, 0] = True  # per latent frame
    out = np.asarray(mod(a, p, drop=m))
    np.testing.assert_array_equal(np.where(m[..., None], 0.0, full), out)
    np.testing.assert_array_equal(C.null_like(full), np.zeros_like(full))
    with pytest.raises(ValueError, match="drop"):
        mod(a, p, drop=jnp.zeros((2,), bool))
    # Training mask helper: restricted to the noisy chunk's latents.
    noisy = np.array([False, True, True])
    dm = np.asarray(C.drop_mask(jax.random.key(0), 1000, 0.1, noisy))
    assert dm.shape == (1000, 3) and not dm[:, 0].any() and np.array_equal(dm[:, 1], dm[:, 2])
    assert 50 < dm[:, 1].sum() < 150
    assert C.drop_mask(jax.random.key(0), 4, 0.5).shape == (4,)


def test_jit_and_bf16_compute():
    a, p = _inputs()
    cfg = C.ConditioningConfig.from_dit(get_config("tiny"), hidden=16, pose="added", dtype="bfloat16")
    assert cfg.dim == 256
    mod = C.Conditioning(cfg, rngs=nnx.Rngs(0))
    _perturb(mod)

    @nnx.jit
    def f(m, a, p, d):
        return m(a, p, drop=d)

    d = jnp.array([True, False])
    out = f(mod, a, p, d)
    assert out.dtype == jnp.float32 and out.shape == (2, 3, 256)
    assert not np.any(np.asarray(out[0])) and np.any(np.asarray(out[1]))
    assert mod.action_mlp.linear_2.kernel.get_value().dtype == jnp.float32
    ref = C.Conditioning(cfg.replace(dtype="float32"), rngs=nnx.Rngs(0))
    _perturb(ref)
    np.testing.assert_allclose(out, ref(a, p, drop=d), rtol=0.05, atol=0.05 * float(jnp.abs(out).max()))
    # Continuation chunk (T = 4F) under jit.
    g = nnx.jit(lambda m, a, p: m(a, p, first_latent=False))
    assert g(mod, a[:, 1:], p[:, 1:]).shape == (2, 2, 256)


def test_fixed_text_context(tmp_path):
    z = C.fixed_text_context(16, 8)
    assert z.shape == (1, 16, 8) and z.dtype == np.float32 and not z.any()
    ctx = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    np.save(tmp_path / "c.npy", ctx)
    out = C.fixed_text_context(16, 8, tmp_path / "c.npy")
    assert out.shape == (1, 16, 8)
    np.testing.assert_array_equal(out[0, :5], ctx)
    assert not out[0, 5:].any()
    np.savez(tmp_path / "c.npz", context=ctx[None])
    np.testing.assert_array_equal(C.fixed_text_context(16, 8, str(tmp_path / "c.npz")), out)
    with pytest.raises(FileNotFoundError, match="not found"):
        C.fixed_text_context(16, 8, tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="last dimension 8"):
        C.fixed_text_context(16, 4, tmp_path / "c.npy")
    with pytest.raises(ValueError, match="more than text_len"):
        C.fixed_text_context(4, 8, tmp_path / "c.npy")
    np.savez(tmp_path / "bad.npz", other=ctx)
    with pytest.raises(ValueError, match="no 'context'"):
        C.fixed_text_context(16, 8, tmp_path / "bad.npz")
