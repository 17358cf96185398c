"""SGM block-sparse attention: the gather oracle vs the dense masked oracle, the custom-VJP backward, validation,
backend resolution and the registry (pallas_kernels/sgm)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sgm import (available_backends, dense_masked_reference, register_backend, resolve_sgm_backend,
                                sgm_attention, sgm_reference, sgm_reference_bwd)
from pallas_kernels.sgm import api

B, H, D, BQ, BKV, NQ, NK, K = 2, 3, 16, 8, 16, 5, 7, 4
GEO = dict(block_q=BQ, block_kv=BKV)


def make_inputs(seed=0, dtype=jnp.float32, nq=NQ, nk=NK, kk=K, bq=BQ, bkv=BKV):
    """Random q, k, v ~ N(0, 3²), ascending lists with random counts (0 and K included), partial key blocks
    (one empty block, always selected next to valid ones) and garbage in the ignored list entries."""
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(0, 3, (B, nq * bq, H, D)), dtype)
    k = jnp.asarray(r.normal(0, 3, (B, nk * bkv, H, D)), dtype)
    v = jnp.asarray(r.normal(0, 3, (B, nk * bkv, H, D)), dtype)
    idx = np.sort(np.stack([r.choice(nk, kk, replace=False) for _ in range(B * H * nq)]), -1)
    idx = idx.reshape(B, H, nq, kk).astype(np.int32)
    cnt = r.integers(0, kk + 1, (B, H, nq)).astype(np.int32)
    cnt[0, 0, 0], cnt[0, 0, 1], cnt[1, 2, nq - 1] = 0, kk, 0
    lens = r.integers(1, bkv + 1, (B, nk)).astype(np.int32)
    lens[:, 0] = bkv
    lens[0, 2] = 0  # an empty key block ...
    idx[0, 1, 0, :3], cnt[0, 1, 0] = [0, 2, 3], 3  # ... selected next to valid ones
    garbage = r.integers(-3, nk + 3, idx.shape).astype(np.int32)
    idx = np.where(np.arange(kk) < cnt[..., None], idx, garbage)
    return q, k, v, jnp.asarray(idx), jnp.asarray(cnt), jnp.asarray(lens)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def test_reference_matches_dense_f32():
    q, k, v, idx, cnt, lens = make_inputs(0)
    out, lse = sgm_reference(q, k, v, idx, cnt, lens, **GEO)
    out_d, lse_d = dense_masked_reference(q, k, v, idx, cnt, lens, **GEO, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (B, H, NQ * BQ)
    assert rel(out, out_d) <= 1e-5
    lse, lse_d = np.asarray(lse), np.asarray(lse_d)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_d))
    fin = np.isfinite(lse_d)
    assert np.abs(lse[fin] - lse_d[fin]).max() <= 1e-5 * np.abs(lse_d[fin]).max()
    # The public API (reference backend) gives the oracle's output.
    assert rel(sgm_attention(q, k, v, idx, cnt, lens, **GEO, backend="reference"), out_d) <= 1e-5


def test_reference_matches_dense_bf16():
    q, k, v, idx, cnt, lens = make_inputs(1, jnp.bfloat16)
    out, _ = sgm_reference(q, k, v, idx, cnt, lens, **GEO)
    assert out.dtype == jnp.bfloat16
    assert rel(out, dense_masked_reference(q, k, v, idx, cnt, lens, **GEO)) <= 1e-2
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert rel(out, dense_masked_reference(*f32, idx, cnt, lens, **GEO)) <= 1e-2


def test_count_zero_gives_zeros_and_finite_rows():
    q, k, v, idx, cnt, lens = make_inputs(2)
    q = q.at[:, BQ - 3:BQ].set(0.0)  # padded query rows (zeros here) must stay finite
    cnt = cnt.at[1, 1, 2].set(1)
    idx = idx.at[1, 1, 2, 0].set(2)
    lens = lens.at[1, 2].set(0)  # a block whose only selected key block is empty: zeros too
    out, lse = sgm_reference(q, k, v, idx, cnt, lens, **GEO)
    api_out = sgm_attention(q, k, v, idx, cnt, lens, **GEO, backend="reference")
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(api_out)).all()
    ob = np.asarray(out).reshape(B, NQ, BQ, H, D)
    lb = np.asarray(lse).reshape(B, H, NQ, BQ)
    empty = np.asarray(cnt) == 0
    empty[1, 1, 2] = True
    for b, h, n in zip(*np.nonzero(empty)):
        assert (ob[b, n, :, h] == 0).all() and np.isneginf(lb[b, h, n]).all()
    assert (np.asarray(api_out).reshape(B, NQ, BQ, H, D)[0, 0, :, 0] == 0).all()
    assert np.abs(ob[~np.broadcast_to(empty.transpose(0, 2, 1)[:, :, None, :, None], ob.shape)]).max() > 0


def test_all_blocks_full_lengths_is_dense_attention():
    q, k, v, _, _, _ = make_inputs(3)
    idx = jnp.broadcast_to(jnp.arange(NK, dtype=jnp.int32), (B, H, NQ, NK))
    cnt = jnp.full((B, H, NQ), NK, jnp.int32)
    lens = jnp.full((B, NK), BKV, jnp.int32)
    out = sgm_attention(q, k, v, idx, cnt, lens, **GEO, backend="reference")
    with jax.default_matmul_precision("highest"):
        dense = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    assert rel(out, dense) <= 1e-5


def test_custom_vjp_matches_dense_grad():
    q, k, v, idx, cnt, lens = make_inputs(4)
    cot = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)

    @jax.jit  # traced indices: the no-value-check path
    def grads(q, k, v, idx, cnt, lens):
        f = lambda q, k, v: sgm_attention(q, k, v, idx, cnt, lens, **GEO, backend="reference")
        return jax.vjp(f, q, k, v)[1](cot)

    dense = lambda q, k, v: dense_masked_reference(q, k, v, idx, cnt, lens, **GEO)
    ref = jax.vjp(dense, q, k, v)[1](cot)
    for name, g, r in zip("qkv", grads(q, k, v, idx, cnt, lens), ref):
        assert np.isfinite(np.asarray(g)).all(), name
        assert rel(g, r) <= 1e-4, name
    # jax.grad of a scalar loss in q alone also goes through the custom VJP.
    gq = jax.grad(lambda q: jnp.vdot(sgm_attention(q, k, v, idx, cnt, lens, **GEO, backend="reference"), cot))(q)
    assert rel(gq, ref[0]) <= 1e-4


def test_q_rows_drops_the_padded_rows_from_the_backward_only():
    """q_rows: the forward is unchanged; the gradients are those of a cotangent that is zero past q_rows in every
    query block (dq exactly 0 there), through the custom VJP with traced indices."""
    q, k, v, idx, cnt, lens = make_inputs(7)
    cot = jnp.asarray(np.random.default_rng(8).normal(size=q.shape), jnp.float32)
    q_rows = BQ // 2 + 1
    keep = (np.arange(q.shape[1]) % BQ) < q_rows

    @jax.jit
    def run(q, k, v, idx, cnt, lens):
        f = lambda q, k, v: sgm_attention(q, k, v, idx, cnt, lens, **GEO, backend="reference", q_rows=q_rows)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(cot)

    out, grads = run(q, k, v, idx, cnt, lens)
    dense = lambda q, k, v: dense_masked_reference(q, k, v, idx, cnt, lens, **GEO)
    ref_out, vjp = jax.vjp(dense, q, k, v)
    assert rel(out, ref_out) <= 1e-5
    for name, g, r in zip("qkv", grads, vjp(jnp.where(keep[None, :, None, None], cot, 0.0))):
        assert rel(g, r) <= 1e-4, name
    assert not np.asarray(grads[0])[:, ~keep].any()
    full = sgm_attention(q, k, v, idx, cnt, lens, **GEO, backend="reference", q_rows=BQ)  # = no padding
    assert np.array_equal(np.asarray(full), np.asarray(out))
    for bad in (0, BQ + 1, 2.5, True):
        with pytest.raises(ValueError, match="q_rows must be a static int"):
            sgm_attention(q, k, v, idx, cnt, lens, **GEO, backend="reference", q_rows=bad)


def _args():
    q, k, v, idx, cnt, lens = make_inputs(6)
    return dict(q=q, k=k, v=v, kv_block_idx=idx, kv_block_cnt=cnt, kv_block_len=lens, **GEO, backend="reference")


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(q=a["q"][0]), r"q must be \[B, T, H, D\]"),
    (lambda a: a.update(k=a["k"].astype(jnp.int32)), "k dtype"),
    (lambda a: a.update(v=a["v"].astype(jnp.bfloat16)), "share a dtype"),
    (lambda a: a.update(v=a["v"][:, :BKV]), "k and v shapes"),
    (lambda a: a.update(k=a["k"][..., :8], v=a["v"][..., :8]), "does not match q"),
    (lambda a: a.update(block_q=0), "block_q must be a positive int"),
    (lambda a: a.update(q=a["q"][:, :BQ * NQ - 1]), "Tq = 39 is not a multiple of block_q"),
    (lambda a: a.update(k=a["k"][:, :-1], v=a["v"][:, :-1]), "Tk = 111 is not a multiple of block_kv"),
    (lambda a: a.update(kv_block_idx=a["kv_block_idx"][:, :, :-1]), r"kv_block_idx must be \[B, H, Nq, K"),
    (lambda a: a.update(kv_block_idx=a["kv_block_idx"].astype(jnp.float32)), "kv_block_idx must have an integer"),
    (lambda a: a.update(kv_block_cnt=a["kv_block_cnt"][0]), r"kv_block_cnt must be \[B, H, Nq\]"),
    (lambda a: a.update(kv_block_len=a["kv_block_len"][:, 1:]), r"kv_block_len must be \[B, Nk\]"),
    (lambda a: a.update(kv_block_cnt=a["kv_block_cnt"].at[0, 0, 0].set(K + 1)), "kv_block_cnt values"),
    (lambda a: a.update(kv_block_cnt=a["kv_block_cnt"].at[0, 0, 0].set(-1)), "kv_block_cnt values"),
    (lambda a: a.update(kv_block_len=a["kv_block_len"].at[0, 0].set(BKV + 1)), "kv_block_len values"),
    (lambda a: a.update(kv_block_idx=a["kv_block_idx"].at[0, 0, 1, 0].set(NK)), "kv_block_idx entries"),
    (lambda a: a.update(kv_block_idx=a["kv_block_idx"].at[0, 0, 1, 1].set(a["kv_block_idx"][0, 0, 1, 0])),
     "strictly ascending"),
    (lambda a: a.update(backend="nope"), "unknown sgm_attention backend 'nope'"),
    (lambda a: a.update(kv_block_len=[[1]]), "kv_block_len must be an array"),
])
def test_validation_errors(change, match):
    a = _args()
    change(a)
    with pytest.raises(ValueError, match=match):
        sgm_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("kv_block_idx"), a.pop("kv_block_cnt"),
                      a.pop("kv_block_len"), **a)


def test_auto_resolves_to_reference_on_cpu(caplog, monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only resolution test")
    assert resolve_sgm_backend("auto").name == "reference"
    assert available_backends() == ("reference",)
    monkeypatch.setattr(api, "_announced", set())
    q, k, v, idx, cnt, lens = make_inputs(7)
    with caplog.at_level(logging.INFO, logger=api.__name__):
        sgm_attention(q, k, v, idx, cnt, lens, **GEO)
        sgm_attention(q, k, v, idx, cnt, lens, **GEO)
    assert [r.getMessage() for r in caplog.records].count(
        "sgm_attention: running backend 'reference' (requested 'auto', platform 'cpu')") == 1
    for name in ("mosaic_gpu", "tpu"):
        with pytest.raises(ValueError, match=f"backend '{name}' needs JAX platform"):
            sgm_attention(q, k, v, idx, cnt, lens, **GEO, backend=name)


@pytest.mark.parametrize("platform, kernel, cc", [("tpu", "tpu", None), ("gpu", "mosaic_gpu", "9.0"),
                                                  ("gpu", None, "8.0")])
def test_auto_never_silently_falls_back(monkeypatch, platform, kernel, cc):
    """On GPU/TPU without a registered kernel `auto` raises and names the missing kernel and the opt-in."""
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    monkeypatch.setattr(api, "_gpu_is_sm90", lambda: (cc is not None and cc.startswith("9."), cc))
    for name in ("tpu", "mosaic_gpu"):  # make sure neither kernel module can be found, whatever exists on disk
        monkeypatch.setitem(api._BUILTIN, name, (f"pallas_kernels.sgm._no_such_{name}", api._BUILTIN[name][1]))
        monkeypatch.delitem(api._REGISTRY, name, raising=False)
        monkeypatch.delitem(api._import_errors, name, raising=False)
    with pytest.raises(RuntimeError, match=f"{kernel or 'compute capability 8.0'}.*backend='reference'"):
        resolve_sgm_backend("auto")
    assert resolve_sgm_backend("reference").name == "reference"
    if kernel:
        with pytest.raises(ValueError, match=f"'{kernel}'.*not registered.*ModuleNotFoundError"):
            resolve_sgm_backend(kernel)


def test_registry_routes_to_fake_backend(monkeypatch):
    calls = {"fwd": 0, "bwd": 0}

    def fwd(*args, **kw):
        calls["fwd"] += 1
        return sgm_reference(*args, **kw)

    def bwd(*args, **kw):
        calls["bwd"] += 1
        return sgm_reference_bwd(*args, **kw)

    monkeypatch.setattr(api, "_REGISTRY", dict(api._REGISTRY))
    register_backend("fake", fwd, bwd, tile=(8, 16), head_dims=(16, 64))
    register_backend("fake_fwd_only", fwd, None)
    assert "fake" in available_backends()
    q, k, v, idx, cnt, lens = make_inputs(8)
    out = sgm_attention(q, k, v, idx, cnt, lens, **GEO, backend="fake")
    assert calls["fwd"] == 1
    assert rel(out, dense_masked_reference(q, k, v, idx, cnt, lens, **GEO)) <= 1e-5
    cot = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
    f = lambda name: (lambda q, k, v: sgm_attention(q, k, v, idx, cnt, lens, **GEO, backend=name))
    got = jax.vjp(f("fake"), q, k, v)[1](cot)
    want = jax.vjp(lambda q, k, v: dense_masked_reference(q, k, v, idx, cnt, lens, **GEO), q, k, v)[1](cot)
    assert calls["bwd"] == 1
    for g, w in zip(got, want):
        assert rel(g, w) <= 1e-4
    with pytest.raises(ValueError, match=r"multiples of backend 'fake'.s tile \(8, 16\)"):
        sgm_attention(q, k, v, idx, cnt, lens, block_q=4, block_kv=BKV, backend="fake")
    with pytest.raises(ValueError, match="head dim 8 not supported by backend 'fake'"):
        sgm_attention(q[..., :8], k[..., :8], v[..., :8], idx, cnt, lens, **GEO, backend="fake")
    with pytest.raises(NotImplementedError, match="forward-only"):
        jax.grad(lambda q: sgm_attention(q, k, v, idx, cnt, lens, **GEO, backend="fake_fwd_only").sum())(q)
    register_backend("fake_tpu", fwd, bwd, platforms=("tpu",))
    with pytest.raises(ValueError, match="backend 'fake_tpu' runs on"):
        resolve_sgm_backend("fake_tpu")


def test_save_sgm_remat_policy_keeps_the_forward_out_of_the_backward(monkeypatch):
    """DiTConfig.remat="save_sgm" saves the names "sgm_out" and "sgm_lse": the rematerialised backward then needs no
    second SGM forward (under `full` its recompute holds one), and the gradients are the same."""
    from decmem_jax.models.dit import _REMAT_POLICIES

    def fwd(*args, **kw):  # the reference forward with a marker that shows in the jaxpr (an fp32 identity)
        out, lse = sgm_reference(*args, **kw)
        return jax.lax.reduce_precision(out, exponent_bits=8, mantissa_bits=23), lse

    monkeypatch.setattr(api, "_REGISTRY", dict(api._REGISTRY))
    register_backend("marked", fwd, sgm_reference_bwd)
    q, k, v, idx, cnt, lens = make_inputs(11)

    def loss(q, k, v):  # something before and after the kernel, as in a block
        out = sgm_attention(jnp.sin(q), k, v, idx, cnt, lens, **GEO, backend="marked")
        return jnp.sum(jnp.cos(out))

    grads, forwards = {}, {}
    for policy in ("full", "save_sgm"):
        g = jax.grad(jax.checkpoint(loss, policy=_REMAT_POLICIES[policy]), argnums=(0, 1, 2))
        remat = [e for e in jax.make_jaxpr(g)(q, k, v).jaxpr.eqns if "policy" in e.params]  # the backward's recompute
        forwards[policy] = sum(str(e.params["jaxpr"]).count("reduce_precision") for e in remat)
        grads[policy] = jax.jit(g)(q, k, v)
    assert forwards == {"full": 1, "save_sgm": 0}
    for a, b in zip(grads["full"], grads["save_sgm"]):
        assert rel(a, b) <= 1e-6


def test_mgpu_save_sgm_remat_skips_the_forward_kernel_in_the_backward():
    """Under DiTConfig.remat="save_sgm" the backward pass of a rematerialised block runs the dq and dk/dv kernels
    but not the forward kernel again (under "full" it does). Checked on the traced program (no GPU needed): the
    kernels are `mpmd_map` equations; the backward's recompute is the `remat2` equation. It fails if the names or the
    policy stop reaching the Mosaic GPU path. (XLA's compiled program is another matter: without the optimisation
    barrier in api.py it ran the forward twice on an H200 all the same; that was counted on the GPU.)"""
    import pallas_kernels.sgm.mosaic_gpu  # noqa: F401 -- registers the backend
    from decmem_jax.models.dit import _REMAT_POLICIES

    B, H, D, bq = 1, 2, 128, 192
    q = jnp.zeros((B, 2 * bq, H, D), jnp.bfloat16)
    k = jnp.zeros((B, 3 * bq, H, D), jnp.bfloat16)
    lst = (jnp.zeros((B, H, 2, 2), jnp.int32), jnp.full((B, H, 2), 2, jnp.int32), jnp.full((B, 3), 147, jnp.int32))

    def loss(q, k):
        out = api._sgm(jnp.sin(q), k, k, *lst, bq, bq, 0.1, "mosaic_gpu", 147)  # the registered entry, no check
        return jnp.sum(jnp.cos(out.astype(jnp.float32)))

    def kernels(jaxpr, in_remat=False):
        n = {False: 0, True: 0}
        for e in jaxpr.eqns:
            inner = in_remat or e.primitive.name == "remat2"
            n[inner] += e.primitive.name == "mpmd_map"
            for p in e.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        m = kernels(sub, inner)
                        n[False], n[True] = n[False] + m[False], n[True] + m[True]
        return n

    counts = {}
    for policy in ("full", "save_sgm"):
        g = jax.grad(jax.checkpoint(loss, policy=_REMAT_POLICIES[policy]), argnums=(0, 1))
        counts[policy] = kernels(jax.make_jaxpr(g)(q, k).jaxpr)
    # forward pass: the forward kernel; backward: (forward again,) dq, dk/dv
    assert counts == {"full": {False: 1, True: 3}, "save_sgm": {False: 1, True: 2}}
