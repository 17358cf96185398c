"""Parity tests of the SGM attention kernels in their interpreters on CPU, one file for both:

- `mosaic_gpu` (pallas_kernels/sgm/mosaic_gpu*.py, sm_90a) under the Mosaic GPU interpreter (`interpret=True` ->
  `plgpu.InterpretGPUParams`): the same kernel bodies as on the GPU -- warpgroups as threads, TMA copies, mbarriers
  (the interpreter also checks that every barrier completion is observed), SMEM NaN-filled before use, SMEM-operand
  wgmma. Not interpreted: wgmma with a register operand accumulating in place (jax 0.11.2's interpreter has no rule
  for it; see `mosaic_gpu_fwd.mma_acc`), `set_max_registers` (a no-op there) and everything below Pallas' Python
  lowering. The lowering itself (Pallas -> Mosaic GPU MLIR, layout inference, the SMEM budget) is checked by lowering
  for CUDA on the CPU; compilation and hardware runs: `test_mgpu_compiled_on_hardware` (skipped without an sm_90
  GPU) and `benchmarks/sgm_kernel.py --check-only`.
  The dk/dv variants that skip padding or share a query stream: tests/test_sgm_kernels_dkv.py.
- `tpu` (pallas_kernels/sgm/tpu.py) under the Pallas TPU interpreter (its own list, chunking, race and lowering tests:
  tests/test_sgm_kernels_tpu.py).

Oracle: `dense_masked_reference` (dense fp32 softmax under the token mask of the block lists, `jax.grad`-able),
computed in fp32 from the kernel's (bf16/fp16-valued) inputs; `sgm_reference` too for the LSE. Inputs ~ N(0, 3²)
(logits with std ~9, peaked softmax), never zeros. Errors are max|err| / max|oracle|.

Tolerances: f32 (TPU only; wgmma takes no fp32 operands in the Mosaic GPU kernel) 1e-5 forward, 1e-4 gradients.
16-bit: the kernels round P (forward) and P, dS (backward) to the input dtype for the tensor-core matmuls, as every
flash-attention kernel does, and return 16-bit results; with u the unit roundoff (2^-8 bf16, 2^-11 fp16) the
measured errors are <= 3.2u (bf16: fwd 2.9e-3, dq 7e-3, dk 1.25e-2, dv 3.2e-3 over seeds); the bounds are 1e-2
(bf16) / 2e-3 (fp16) forward and 8u = 3e-2 (bf16) / 4e-3 (fp16) for dq, dk, dv -- loose enough for rounding, far
below what a wrong scale, mask, list entry or missing block produces (O(1)).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sgm import api
from pallas_kernels.sgm import mosaic_gpu as mosaic_gpu_mod
from pallas_kernels.sgm import mosaic_gpu_fwd
from pallas_kernels.sgm.lists import group_steps, reverse_block_lists, subtile_steps
from pallas_kernels.sgm.mosaic_gpu import sgm_backward_mgpu, sgm_forward_mgpu
from pallas_kernels.sgm.reference import dense_masked_reference, sgm_reference
from pallas_kernels.sgm.tpu import sgm_backward_tpu, sgm_forward_tpu

HI = jax.lax.Precision.HIGHEST
F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)
FWD_TOL = {F32: 1e-5, BF16: 1e-2, F16: 2e-3}
GRAD_TOL = {F32: 1e-4, BF16: 3e-2, F16: 4e-3}


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    fwd: callable  # (q, k, v, idx, cnt, len, *, block_q, block_kv, scale) -> (out, lse)
    bwd: callable  # (q, k, v, out, lse, dout, idx, cnt, len, *, block_q, block_kv, scale) -> (dq, dk, dv)
    geo: dict  # small geometry the kernel accepts (block sizes, head dim)
    dtypes: tuple  # dtypes to test (first: the most precise one it supports)


KERNELS = {
    "tpu": Kernel("tpu", functools.partial(sgm_forward_tpu, interpret=True),
                  functools.partial(sgm_backward_tpu, interpret=True), dict(D=64, bq=16, bkv=32), (F32, BF16)),
    "mosaic_gpu": Kernel("mosaic_gpu", functools.partial(sgm_forward_mgpu, interpret=True),
                         functools.partial(sgm_backward_mgpu, interpret=True), dict(D=64, bq=64, bkv=64), (BF16, F16)),
}
BOTH = pytest.mark.parametrize("kern", list(KERNELS), ids=list(KERNELS))
# The compiled Mosaic GPU kernel, for the hardware tests at the end (skipped without an sm_90 GPU).
KERNELS["mosaic_gpu_hw"] = Kernel("mosaic_gpu_hw", sgm_forward_mgpu, sgm_backward_mgpu, dict(D=128, bq=64, bkv=64),
                                  (BF16, F16))


def _sm90():
    try:
        return jax.default_backend() == "gpu" and str(jax.devices()[0].compute_capability).startswith("9.")
    except Exception:  # noqa: BLE001
        return False


def make_case(seed, *, B=2, H=2, D=64, bq=16, bkv=32, Nq=3, Nk=5, K=3, dtype=F32, sigma=3.0):
    """Random inputs ~N(0, sigma²); ascending duplicate-free lists with garbage (−1) past the count; counts covering
    0 and K; key blocks full, partial and empty (one of each at least)."""
    r = np.random.default_rng(seed)
    q = r.normal(0.0, sigma, (B, Nq * bq, H, D))
    k = r.normal(0.0, sigma, (B, Nk * bkv, H, D))
    v = r.normal(0.0, sigma, (B, Nk * bkv, H, D))
    cnt = r.integers(0, K + 1, (B, H, Nq))
    cnt.reshape(-1)[:2] = [0, K][: cnt.size]
    idx = np.full((B, H, Nq, K), -1, np.int64)
    for b, h, i in np.ndindex(B, H, Nq):
        idx[b, h, i, : cnt[b, h, i]] = np.sort(r.choice(Nk, cnt[b, h, i], replace=False))
    ln = r.integers(1, bkv + 1, (B, Nk))
    ln[0, 0], ln[0, 1], ln[-1, -1] = 0, bkv, bkv // 2 + 1  # an empty block, a full one, a partial one
    as_ = lambda x: jnp.asarray(x, dtype)
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    return dict(q=as_(q), k=as_(k), v=as_(v), kv_block_idx=i32(np.clip(idx, -1, Nk - 1)), kv_block_cnt=i32(cnt),
                kv_block_len=i32(ln), block_q=bq, block_kv=bkv)


def kernel_case(kern, seed, dtype, **over):
    g = {**KERNELS[kern].geo, **over}
    return make_case(seed, dtype=dtype, **g)


def lists_of(c):
    return {n: c[n] for n in ("kv_block_idx", "kv_block_cnt", "kv_block_len", "block_q", "block_kv")}


def oracle(c, scale=None):
    """(out, lse, vjp) of the dense fp32 oracle on the case's values."""
    f32 = [c[n].astype(jnp.float32) for n in ("q", "k", "v")]
    lst = lists_of(c)
    out, vjp = jax.vjp(lambda q, k, v: dense_masked_reference(q, k, v, **lst, scale=scale), *f32)
    _, lse = dense_masked_reference(*f32, **lst, scale=scale, return_lse=True)
    return out, lse, vjp


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def lse_close(a, b, tol):
    a, b = np.asarray(a), np.asarray(b)
    assert np.array_equal(np.isneginf(a), np.isneginf(b)), "LSE −inf pattern differs"
    fin = np.isfinite(b)
    assert np.isfinite(a[fin]).all()
    np.testing.assert_allclose(a[fin], b[fin], rtol=tol, atol=tol)


def run_kernel(kern, c, scale=None, seed=0, grads=True):
    """Forward (and backward with a random cotangent) of a kernel vs the oracle; returns the errors."""
    k = KERNELS[kern]
    lst = lists_of(c)
    out, lse = k.fwd(c["q"], c["k"], c["v"], **lst, scale=scale)
    ref_out, ref_lse, vjp = oracle(c, scale)
    dt = jnp.dtype(c["q"].dtype)
    assert out.shape == c["q"].shape and out.dtype == dt and lse.dtype == jnp.float32
    assert lse.shape == (c["q"].shape[0], c["q"].shape[2], c["q"].shape[1])
    assert np.isfinite(np.asarray(out, np.float32)).all()
    err = {"out": rel(out, ref_out)}
    assert err["out"] <= FWD_TOL[dt], (kern, dt, err)
    lse_close(lse, ref_lse, FWD_TOL[dt])
    # count 0 -> zeros and LSE −inf
    cnt, bq = np.asarray(c["kv_block_cnt"]), c["block_q"]
    o, l = np.asarray(out, np.float32), np.asarray(lse)
    for b, h, i in zip(*np.nonzero(cnt == 0)):
        assert (o[b, i * bq:(i + 1) * bq, h] == 0).all() and np.isneginf(l[b, h, i * bq:(i + 1) * bq]).all()
    if not grads:
        return err, (out, lse)
    d_out = jnp.asarray(np.random.default_rng(seed).normal(0.0, 1.0, out.shape), dt)
    got = k.bwd(c["q"], c["k"], c["v"], out, lse, d_out, **lst, scale=scale)
    for name, g, w, x in zip(("dq", "dk", "dv"), got, vjp(d_out.astype(jnp.float32)), ("q", "k", "v")):
        assert g.shape == w.shape and g.dtype == c[x].dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        err[name] = rel(g, w)
        assert err[name] <= GRAD_TOL[dt], (kern, dt, name, err)
    for b, h, i in zip(*np.nonzero(cnt == 0)):  # count-0 query blocks get dq = 0
        assert (np.asarray(got[0], np.float32)[b, i * bq:(i + 1) * bq, h] == 0).all()
    return err, (out, lse)


# ------------------------------------------------------------------------------------------- both kernels


@BOTH
def test_forward_and_grads_most_precise_dtype(kern):
    """B = 2, H = 2, Tq != Tk, counts 0 and K, empty / full / partial key blocks, garbage past the counts."""
    dt = KERNELS[kern].dtypes[0]
    c = kernel_case(kern, 0, dt, H=1 if kern == "mosaic_gpu" else 2)
    assert c["q"].shape[1] != c["k"].shape[1]
    _, (out, lse) = run_kernel(kern, c, seed=10)
    r_out, r_lse = sgm_reference(*(c[n].astype(jnp.float32) for n in ("q", "k", "v")),
                                 *(c[n] for n in ("kv_block_idx", "kv_block_cnt", "kv_block_len")),
                                 block_q=c["block_q"], block_kv=c["block_kv"])
    assert rel(out, r_out) <= FWD_TOL[dt]
    lse_close(lse, r_lse, FWD_TOL[dt])


@BOTH
def test_forward_and_grads_bf16_custom_scale(kern):
    c = kernel_case(kern, 1, BF16, D=128, Nq=2, Nk=4, K=2, B=1, H=1)
    run_kernel(kern, c, scale=0.05, seed=11)


@BOTH
def test_all_blocks_selected_equals_dense_attention(kern):
    dt = KERNELS[kern].dtypes[0]
    c = kernel_case(kern, 2, dt, Nq=2, Nk=4, K=4, B=1, H=1)
    B, H, Nq, K = c["kv_block_idx"].shape
    c["kv_block_idx"] = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, H, Nq, K))
    c["kv_block_cnt"] = jnp.full((B, H, Nq), K, jnp.int32)
    c["kv_block_len"] = jnp.full((B, K), c["block_kv"], jnp.int32)
    err, (out, lse) = run_kernel(kern, c, seed=12)
    q, k, v = (c[n].astype(jnp.float32) for n in ("q", "k", "v"))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HI) / np.sqrt(q.shape[-1])
    dense = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision=HI)
    assert rel(out, dense) <= FWD_TOL[dt]
    lse_close(lse, jax.nn.logsumexp(s, axis=-1), FWD_TOL[dt])


@BOTH
def test_selected_blocks_all_empty_give_zeros_and_finite_grads(kern):
    dt = KERNELS[kern].dtypes[0]
    c = kernel_case(kern, 5, dt, Nk=4, K=2, B=1, H=1)
    c["kv_block_len"] = c["kv_block_len"].at[:, 0].set(0).at[:, 1].set(0)
    c["kv_block_idx"] = c["kv_block_idx"].at[0, 0, 1].set(jnp.array([0, 1], jnp.int32))
    c["kv_block_cnt"] = c["kv_block_cnt"].at[0, 0, 1].set(2)  # query block 1 of (0, 0) sees only empty blocks
    _, (out, lse) = run_kernel(kern, c, seed=13)
    rows = slice(c["block_q"], 2 * c["block_q"])
    assert (np.asarray(out, np.float32)[0, rows, 0] == 0).all() and np.isneginf(np.asarray(lse)[0, 0, rows]).all()


@BOTH
def test_sgm_attention_custom_vjp_through_the_kernel(kern):
    """The registered backend's adapters (interpret=True, under a temporary name without a platform restriction)
    through sgm_attention's custom VJP, with jit-traced indices; unsupported dtypes raise clearly."""
    import importlib

    mod = importlib.import_module(f"pallas_kernels.sgm.{kern}")
    entry = api._REGISTRY[kern]
    assert entry.fwd is mod._api_fwd and entry.bwd is mod._api_bwd
    name = f"{kern}_interpret_test"
    api.register_backend(name, functools.partial(mod._api_fwd, interpret=True),
                         functools.partial(mod._api_bwd, interpret=True), tile=(8, 8) if kern == "tpu" else entry.tile,
                         head_dims=entry.head_dims, dtypes=entry.dtypes)
    try:
        dt = KERNELS[kern].dtypes[0]
        c = kernel_case(kern, 9, dt, B=1)
        lst = [c[n] for n in ("kv_block_idx", "kv_block_cnt", "kv_block_len")]
        statics = dict(block_q=c["block_q"], block_kv=c["block_kv"])
        d_out = jnp.asarray(np.random.default_rng(90).normal(0.0, 1.0, c["q"].shape), dt)

        @jax.jit
        def fwd_bwd(q, k, v, *lst):
            out, vjp = jax.vjp(lambda q, k, v: api.sgm_attention(q, k, v, *lst, **statics, backend=name), q, k, v)
            return out, vjp(d_out)

        out, grads = fwd_bwd(c["q"], c["k"], c["v"], *lst)
        ref_out, _, ref_vjp = oracle(c)
        assert rel(out, ref_out) <= FWD_TOL[dt]
        for nm, g, w in zip(("dq", "dk", "dv"), grads, ref_vjp(d_out.astype(jnp.float32))):
            assert rel(g, w) <= GRAD_TOL[dt], (nm, rel(g, w))
        unsupported = F16 if kern == "tpu" else F32
        with pytest.raises(ValueError, match=f"dtype {unsupported.name} not supported by backend '{name}'"):
            api.sgm_attention(*(c[n].astype(unsupported) for n in ("q", "k", "v")), *lst, **statics, backend=name)
    finally:
        api._REGISTRY.pop(name, None)


def test_reverse_block_lists_deterministic_and_padded():
    r = np.random.default_rng(6)
    BH, Nq, Nk, K = 3, 4, 6, 3
    cnt = r.integers(0, K + 1, (BH, Nq))
    idx = np.zeros((BH, Nq, K), np.int64)
    for b, i in np.ndindex(BH, Nq):
        sel = np.sort(r.choice(Nk, cnt[b, i], replace=False))
        idx[b, i, : len(sel)] = sel
        idx[b, i, len(sel):] = sel[-1] if len(sel) else 0  # sanitised form, as the TPU kernels pass it
    rev, rev_cnt = jax.jit(reverse_block_lists, static_argnums=2)(jnp.asarray(idx, jnp.int32),
                                                                  jnp.asarray(cnt, jnp.int32), Nk)
    rev, rev_cnt = np.asarray(rev), np.asarray(rev_cnt)
    for b, kb in np.ndindex(BH, Nk):
        qs = [i for i in range(Nq) if kb in idx[b, i, : cnt[b, i]]]
        assert rev_cnt[b, kb] == len(qs)
        want = qs + [qs[-1] if qs else 0] * (Nq - len(qs))  # ascending, then the previous entry repeated
        assert list(rev[b, kb]) == want


def test_subtile_steps_drop_empty_subtiles_in_order():
    idx = jnp.asarray([[[[0, 2, 3], [1, 3, 0]]]], jnp.int32)  # [B=1, H=1, Nq=2, K=3]
    cnt = jnp.asarray([[[3, 2]]], jnp.int32)
    lens = jnp.asarray([[192, 0, 70, 128]], jnp.int32)  # full, empty, 70 = 64 + 6, 128 = two full sub-tiles
    rows, valid, n = (np.asarray(x) for x in subtile_steps(idx, cnt, lens, block_kv=192, sub=64))
    assert rows.shape == valid.shape == (1, 1, 2, 9) and n.tolist() == [[[7, 2]]]
    assert rows[0, 0, 0, :7].tolist() == [0, 64, 128, 384, 448, 576, 640]
    assert valid[0, 0, 0, :7].tolist() == [64, 64, 64, 64, 6, 64, 64]
    assert rows[0, 0, 1, :2].tolist() == [576, 640] and valid[0, 0, 1, :2].tolist() == [64, 64]  # block 1 is empty
    assert (valid[0, 0, 0, 7:] == 0).all() and (valid[0, 0, 1, 2:] == 0).all() and (rows[0, 0, 1, 2:] == 0).all()


def test_group_steps_packs_boxes_and_keeps_a_valid_first_box():
    idx = jnp.asarray([[[[0, 1]]]], jnp.int32)
    lens = jnp.asarray([[147, 40]], jnp.int32)
    rows, valid, n = subtile_steps(idx, jnp.asarray([[[2]]], jnp.int32), lens, block_kv=192, sub=32)
    assert n.tolist() == [[[7]]]  # 147 = 4 x 32 + 19 (box 160 empty, dropped), 40 = 32 + 8
    g_rows, code, g_n = (np.asarray(x) for x in group_steps(rows, valid, n, 2))
    assert g_rows.shape == (1, 1, 1, 6, 2) and g_n.tolist() == [[[4]]]
    assert g_rows[0, 0, 0, :4].tolist() == [[0, 32], [64, 96], [128, 192], [224, 0]]
    unpack = lambda c: [c % 128, c // 128]
    assert [unpack(c) for c in code[0, 0, 0, :4]] == [[32, 32], [32, 32], [19, 32], [8, 0]]
    assert (code[0, 0, 0, 4:] == 0).all()
    _, code5, n5 = group_steps(rows, valid, n, 5)  # 7 of 12 boxes -> 2 steps; the list is padded to 15 boxes
    assert np.asarray(n5).tolist() == [[[2]]] and code5.shape == (1, 1, 1, 3)


# --------------------------------------------------------------------------------------------- Mosaic GPU


def test_mgpu_merge_splits_is_exact():
    r = np.random.default_rng(3)
    lse = jnp.asarray(r.normal(0, 5, (3, 1, 2, 8)), jnp.float32).at[1, 0, 0].set(-jnp.inf).at[:, 0, 1, :2].set(-jnp.inf)
    out = jnp.asarray(r.normal(0, 1, (3, 1, 8, 2, 4)), jnp.float32)
    merged, lse_all = mosaic_gpu_fwd.merge_splits(out, lse)
    fin = np.isfinite(np.asarray(lse_all))
    w = np.exp(np.asarray(lse) - np.where(fin, np.asarray(lse_all), 0.0)[None])  # exact weights
    want = np.einsum("sbqhd,sbhq->bqhd", np.asarray(out), np.where(fin[None], w, 0.0))
    np.testing.assert_allclose(np.asarray(merged), want, rtol=1e-5, atol=1e-6)
    assert np.isneginf(np.asarray(lse_all)[0, 1, :2]).all() and (np.asarray(merged)[0, :2, 1] == 0).all()
    np.testing.assert_allclose(np.asarray(lse_all)[fin], np.log(np.exp(np.asarray(lse)).sum(0)[fin]), rtol=1e-5)


def test_mgpu_decmem_geometry_fp16():
    """DecMem-like geometry at toy size: 192-slot blocks (forward: 3 consumers sharing one stream of 32-row boxes;
    dq: an odd number of q tiles so one consumer warpgroup idles; partial tails), D = 128, fp16, Tq != Tk, B = 2."""
    c = make_case(20, B=2, H=1, D=128, bq=192, bkv=192, Nq=1, Nk=3, K=2, dtype=F16)
    c["kv_block_len"] = jnp.asarray([[147, 145, 192], [0, 100, 145]], jnp.int32)
    c["kv_block_cnt"] = jnp.asarray([[[2]], [[2]]], jnp.int32)
    c["kv_block_idx"] = jnp.asarray([[[[0, 2]]], [[[0, 1]]]], jnp.int32)
    run_kernel("mosaic_gpu", c, seed=21)


def test_mgpu_interpreter_race_detector_and_barrier_protocol(capfd):
    """With the interpreter's happens-before race detector on (it prints "RACE DETECTED" per race, for every kernel)
    and its barrier checks (no missed phase, every completion observed, no pending arrival at deallocation), forward,
    dq and dk/dv run clean and still match, for ring depths 1 and 3 (2, the default, runs everywhere else) and
    consumers with different step counts."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    ip = plgpu.InterpretGPUParams(detect_races=True)
    c = make_case(30, B=1, H=1, D=64, bq=64, bkv=64, Nq=3, Nk=4, K=3, dtype=BF16)
    c["kv_block_cnt"] = jnp.asarray([[[3, 1, 3]]], jnp.int32)
    lst = lists_of(c)
    ref_out, _, vjp = oracle(c)
    d_out = jnp.asarray(np.random.default_rng(31).normal(size=ref_out.shape), BF16)
    for stages in (1, 3):
        out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lst, stages=stages, plan=(("splits", 1),),
                                    interpret=ip)
        assert rel(out, ref_out) <= FWD_TOL[BF16], stages
        got = sgm_backward_mgpu(c["q"], c["k"], c["v"], out, lse, d_out, **lst, stages=stages, interpret=ip)
        for nm, g, w in zip(("dq", "dk", "dv"), got, vjp(d_out.astype(jnp.float32))):
            assert rel(g, w) <= GRAD_TOL[BF16], (stages, nm)
    # the shared-stream forward: 3 consumers waiting on one ring (consumed barriers with 3 arrivals, ready barriers
    # with one arrival per 32-row box), split over CTAs
    c = make_case(32, B=1, H=1, D=64, bq=192, bkv=192, Nq=1, Nk=4, K=3, dtype=BF16)
    c["kv_block_cnt"] = jnp.asarray([[[3]]], jnp.int32)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lists_of(c), plan=(("splits", 2),), stages=2,
                                interpret=ip)
    ref_out, _, vjp = oracle(c)
    assert rel(out, ref_out) <= FWD_TOL[BF16]
    # ping-pong: the same with the consumers taking turns through the schedule barrier (3 arrivals per phase)
    out_pp, _ = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lists_of(c), plan=(("splits", 2), ("sched", True)),
                                 stages=2, interpret=ip)
    assert rel(out_pp, ref_out) <= FWD_TOL[BF16]
    # the overlapped loop: K of step t + 1 is waited for and released while V of step t is still held
    out_ov, _ = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lists_of(c), plan=(("splits", 2), ("overlap", True)),
                                 stages=2, interpret=ip)
    assert rel(out_ov, ref_out) <= FWD_TOL[BF16]
    # the lazy rescale: a V slot held one iteration longer when no row's max was raised
    out_lz, _ = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lists_of(c), stages=2, interpret=ip,
                                 plan=(("splits", 2), ("overlap", True), ("lazy", True)))
    assert rel(out_lz, ref_out) <= FWD_TOL[BF16]
    d_out = jnp.asarray(np.random.default_rng(33).normal(size=out.shape), BF16)
    dq = sgm_backward_mgpu(c["q"], c["k"], c["v"], out, lse, d_out, **lists_of(c), interpret=ip,
                           dq_plan_overrides=(("consumers", 3), ("share", 3), ("splits", 2)))[0]
    assert rel(dq, vjp(d_out.astype(jnp.float32))[0]) <= GRAD_TOL[BF16]
    # dk/dv on packed 32-row q boxes (2 TMA arrivals per ready barrier) and the key-tail kernel, ring depths 1, 2
    c = make_case(34, B=1, H=1, D=64, bq=64, bkv=64, Nq=3, Nk=3, K=2, dtype=BF16)
    c["kv_block_cnt"] = jnp.asarray([[[2, 1, 2]]], jnp.int32)
    c["kv_block_idx"] = jnp.asarray([[[[0, 2], [1, 1], [1, 2]]]], jnp.int32)
    d_out = jnp.asarray(np.random.default_rng(35).normal(size=c["q"].shape), BF16)
    c["kv_block_len"] = jnp.asarray([[20, 64, 31]], jnp.int32)  # two key tails for the tail kernel
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lists_of(c), interpret=True)
    _, _, vjp = oracle(c)
    want = vjp(jnp.where((np.arange(out.shape[1]) % 64 < 30)[None, :, None, None], d_out, 0).astype(jnp.float32))
    for stages in (1, 2):
        got = sgm_backward_mgpu(c["q"], c["k"], c["v"], out, lse, d_out, **lists_of(c), stages=stages, q_rows=30,
                                q_boxes=True, k_tails=True, interpret=ip)
        for nm, g, w in zip(("dq", "dk", "dv"), got, want):
            assert rel(g, w) <= GRAD_TOL[BF16], (stages, nm)
    # dk/dv with the two tiles of one key block on one query stream (dkv_share: 2 arrivals per consumed barrier, one
    # from each consumer of a shared ring or two from the owner of its own): in tile order 192-slot blocks pair tiles
    # (0, 1) (shared), (2, 3) across blocks (own rings), (4, 5) (shared); with key tails the tile map pairs (0, 1),
    # (3, 4), then block 1's last tile with block 0's taken tail (own rings: step counts differ)
    c = make_case(36, B=1, H=1, D=64, bq=64, bkv=192, Nq=3, Nk=2, K=2, dtype=BF16)
    c["kv_block_cnt"] = jnp.asarray([[[2, 1, 2]]], jnp.int32)
    c["kv_block_idx"] = jnp.asarray([[[[0, 1], [1, 1], [0, 1]]]], jnp.int32)
    c["kv_block_len"] = jnp.asarray([[147, 192]], jnp.int32)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lists_of(c), interpret=True)
    _, _, vjp = oracle(c)
    d_out = jnp.asarray(np.random.default_rng(37).normal(size=out.shape), BF16)
    want = vjp(d_out.astype(jnp.float32))
    for stages, variant in ((1, {}), (2, dict(k_tails=True))):
        got = sgm_backward_mgpu(c["q"], c["k"], c["v"], out, lse, d_out, **lists_of(c), stages=stages,
                                dkv_share=True, interpret=ip, **variant)
        for nm, g, w in zip(("dq", "dk", "dv"), got, want):
            assert rel(g, w) <= GRAD_TOL[BF16], (stages, variant, nm)
    assert "RACE DETECTED" not in capfd.readouterr().out


@pytest.mark.parametrize("dtype, D, block", [(BF16, 128, 192), (F16, 64, 64), (BF16, 64, 128), (F16, 128, 64)])
def test_mgpu_lowers_for_sm90(dtype, D, block, monkeypatch):
    """Lower (not compile) forward and backward for CUDA on the CPU: runs Pallas' Mosaic GPU lowering, the Mosaic GPU
    layout inference and dialect lowering for sm_90 and the SMEM budget check (232,448 B) -- what interpret mode
    cannot see. ptxas and the run itself need the GPU (benchmarks/sgm_kernel.py --check-only)."""
    sds = jax.ShapeDtypeStruct
    B, H, Nq, Nk, K = 1, 2, 3, 5, 3
    q, k = sds((B, Nq * block, H, D), dtype), sds((B, Nk * block, H, D), dtype)
    lst = (sds((B, H, Nq, K), jnp.int32), sds((B, H, Nq), jnp.int32), sds((B, Nk), jnp.int32))
    lse = sds((B, H, Nq * block), jnp.float32)
    fwd = jax.jit(functools.partial(sgm_forward_mgpu, block_q=block, block_kv=block))
    bwd = jax.jit(functools.partial(sgm_backward_mgpu, block_q=block, block_kv=block))
    texts = [fwd.trace(q, k, k, *lst).lower(lowering_platforms=("cuda",)).as_text(),
             bwd.trace(q, k, k, q, lse, q, *lst).lower(lowering_platforms=("cuda",)).as_text()]
    assert texts[0].count("custom_call @mosaic_gpu") == 1 and texts[1].count("custom_call @mosaic_gpu") == 2
    # dk/dv streaming 32-row q boxes (two TMA boxes per ring slot of q, dO, lse2 and delta), and the transposed tail
    # kernel (64 B swizzle, transposed A operands, a [D, 32] accumulator)
    for share in (False, True):  # and with the two tiles of a key block on one query stream
        packed = jax.jit(functools.partial(sgm_backward_mgpu, block_q=block, block_kv=block, q_rows=block // 2 + 3,
                                           q_boxes=True, k_tails=True, dkv_share=share))
        assert packed.trace(q, k, k, q, lse, q, *lst).lower(lowering_platforms=("cuda",)).as_text().count(
            "custom_call @mosaic_gpu") == 3
    # the module defaults are read at each call, so flipping them at run time (train_step --sgm-dkv) takes effect
    kernels = lambda: (jax.jit(functools.partial(sgm_backward_mgpu, block_q=block, block_kv=block))
                       .trace(q, k, k, q, lse, q, *lst).lower(lowering_platforms=("cuda",)).as_text()
                       .count("custom_call @mosaic_gpu"))
    monkeypatch.setattr(mosaic_gpu_mod, "K_TAILS", True)
    assert kernels() == 3
    monkeypatch.setattr(mosaic_gpu_mod, "K_TAILS", False)
    assert kernels() == 2
    # "auto" (the default): the tail kernel only when the reverse lists are long (Nq·K >= LONG_LISTS·Nk; here 9
    # against 40, then 42 against 40)
    monkeypatch.setattr(mosaic_gpu_mod, "K_TAILS", "auto")
    assert kernels() == 2
    long_lists = sds((B, H, 14, K), jnp.int32), sds((B, H, 14), jnp.int32), lst[2]
    q_long = sds((B, 14 * block, H, D), dtype)
    assert (jax.jit(functools.partial(sgm_backward_mgpu, block_q=block, block_kv=block))
            .trace(q_long, k, k, q_long, sds((B, H, 14 * block), jnp.float32), q_long, *long_lists)
            .lower(lowering_platforms=("cuda",)).as_text().count("custom_call @mosaic_gpu")) == 3
    monkeypatch.setenv("SGM_MGPU_K_TAILS", "yes")
    with pytest.raises(ValueError, match="SGM_MGPU_K_TAILS='yes': expected 0, 1 or auto"):
        mosaic_gpu_mod._switch("SGM_MGPU_K_TAILS", "auto")
    if block > 64:  # the ping-pong forward (shared streams only)
        pp = jax.jit(functools.partial(sgm_forward_mgpu, block_q=block, block_kv=block, plan=(("sched", True),)))
        assert pp.trace(q, k, k, *lst).lower(lowering_platforms=("cuda",)).as_text().count("@mosaic_gpu") == 1
    # the overlapped forward: accumulator refs live across the loop, a wgmma wait that leaves P·V in flight
    ov = jax.jit(functools.partial(sgm_forward_mgpu, block_q=block, block_kv=block, plan=(("overlap", True),)))
    assert ov.trace(q, k, k, *lst).lower(lowering_platforms=("cuda",)).as_text().count("@mosaic_gpu") == 1
    # ... with the lazy rescale: a warpgroup-wide max through SMEM, a wgmma wait under a branch on it
    lz = jax.jit(functools.partial(sgm_forward_mgpu, block_q=block, block_kv=block,
                                   plan=(("overlap", True), ("lazy", True))))
    assert lz.trace(q, k, k, *lst).lower(lowering_platforms=("cuda",)).as_text().count("@mosaic_gpu") == 1
    # ... two steps a loop body, the odd one out under lax.cond (wgmmas and barriers in a branch with results)
    ur = jax.jit(functools.partial(sgm_forward_mgpu, block_q=block, block_kv=block,
                                   plan=(("overlap", True), ("unroll", True))))
    assert ur.trace(q, k, k, *lst).lower(lowering_platforms=("cuda",)).as_text().count("@mosaic_gpu") == 1
    # ... the row sums on the CUDA cores (SGM_MGPU_ROWSUM=0; by default a register-A wgmma into a 16-column
    # accumulator rescaled with the output one, ones stored to SMEM: the `ov` case above)
    rs = jax.jit(functools.partial(sgm_forward_mgpu, block_q=block, block_kv=block,
                                   plan=(("overlap", True), ("rowsum", False))))
    assert rs.trace(q, k, k, *lst).lower(lowering_platforms=("cuda",)).as_text().count("@mosaic_gpu") == 1
    # the backward kernels with the scale inside exp2 (SGM_MGPU_FOLD_SCALE_BWD=1), the key-tail kernel included
    monkeypatch.setattr(mosaic_gpu_fwd, "FOLD_SCALE_BWD", True)
    monkeypatch.setattr(mosaic_gpu_mod, "K_TAILS", True)
    jax.clear_caches()  # read while tracing the kernels: a cached trace would keep the other form
    assert kernels() == 3


def test_mgpu_rejects_unsupported_inputs():
    c = make_case(40, B=1, H=1, D=64, bq=64, bkv=64, Nq=1, Nk=2, K=1, dtype=F32)
    with pytest.raises(ValueError, match="bfloat16 or all float16"):
        sgm_forward_mgpu(**c, interpret=True)
    c16 = {**c, **{n: c[n].astype(BF16) for n in ("q", "k", "v")}}
    with pytest.raises(ValueError, match="head dim 32 not supported"):
        sgm_forward_mgpu(**{**c16, **{n: c16[n][..., :32] for n in ("q", "k", "v")}}, interpret=True)
    with pytest.raises(ValueError, match="multiples of 64"):
        sgm_forward_mgpu(**{**c16, "block_q": 32, "block_kv": 32}, interpret=True)
    assert api._REGISTRY["mosaic_gpu"].platforms == ("gpu",) and api._REGISTRY["mosaic_gpu"].tile == (64, 64)


@pytest.mark.slow
def test_mgpu_benchmark_small_interpret(tmp_path):
    """Smoke run of benchmarks/sgm_kernel.py on CPU: --small --interpret checks fwd + grads vs the oracle in the
    Mosaic GPU interpreter, times the (small) DecMem case and its plan sweeps and writes the JSON record (timings
    meaningless there; the vsa geometry is covered by the interpreter tests above)."""
    from benchmarks import sgm_kernel

    path = tmp_path / "sgm_kernel.json"
    argv = ["--small", "--interpret", "--cases", "decmem", "--repeats", "1", "--warmup", "1", "--json", str(path),
            "--sweep", "--sweep-fwd", "7", "--rounds", "2", "--inner", "1"]
    assert sgm_kernel.main(argv) == 0
    rec = json.loads(path.read_text())
    assert rec["checks"] and all(ch["ok"] for ch in rec["checks"]), rec["checks"]
    assert set(rec["cases"]) == {"decmem"}
    for case in rec["cases"].values():
        assert case["flops"]["fwd"] > 0 and case["mosaic_gpu"]["fwd"]["status"] == "ok"
        # the sweeps: plans checked against the automatic plan, then timed in interleaved rounds
        [fwd] = case["sweep"]
        # (the automatic plan's l sums the bf16-rounded P on the tensor cores, ping-pong's the fp32 P: the outputs
        # differ by bf16 rounding, 4.6e-3 of the max here)
        assert fwd["plan"]["sched"] and fwd["rel_err_vs_auto"] <= 1e-2 and len(fwd["round_medians_ms"]) == 2
        assert all(r["status"] == "ok" and len(r["runs_ms"]) == 2 for r in case["sweep_dq"])


@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200); the interpreter tests above cover CPU")
@pytest.mark.parametrize("dtype, geo", [
    (BF16, dict(B=2, H=2, D=128, bq=64, bkv=64, Nq=6, Nk=9, K=4)),
    (F16, dict(B=1, H=2, D=64, bq=128, bkv=64, Nq=3, Nk=7, K=3)),
    (BF16, dict(B=1, H=2, D=128, bq=192, bkv=192, Nq=3, Nk=8, K=4)),
])
def test_mgpu_compiled_on_hardware(dtype, geo):
    """The compiled kernels on the GPU: the checks of the interpreter tests, plus sgm_attention's `auto` routing to
    mosaic_gpu and a bitwise-reproducible backward."""
    c = make_case(50, dtype=dtype, **geo)
    run_kernel("mosaic_gpu_hw", c, seed=51)
    assert api.resolve_sgm_backend("auto").name == "mosaic_gpu"
    lst = lists_of(c)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lst)
    d_out = jnp.asarray(np.random.default_rng(52).normal(size=out.shape), dtype)
    first = sgm_backward_mgpu(c["q"], c["k"], c["v"], out, lse, d_out, **lst)
    again = sgm_backward_mgpu(c["q"], c["k"], c["v"], out, lse, d_out, **lst)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(first, again))
    via_api = api.sgm_attention(c["q"], c["k"], c["v"], *(lst[n] for n in ("kv_block_idx", "kv_block_cnt",
                                                                           "kv_block_len")),
                                block_q=c["block_q"], block_kv=c["block_kv"])
    # the same kernel; split plans merge their partial outputs in XLA, which may round one element differently in
    # another program (1 bf16 ulp seen on an H200); another backend would differ by ~1e-3 (the checks' errors)
    assert rel(via_api, out) <= 2e-4, rel(via_api, out)
    if geo["bq"] == 192:  # DecMem's padding: q_rows = 147, packed query boxes and key tails, deterministic too
        c["kv_block_len"] = jnp.asarray(np.resize([147, 145, 192, 30], (1, geo["Nk"])), jnp.int32)
        lst = lists_of(c)
        out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lst)
        keep = (np.arange(out.shape[1]) % 192) < 147
        _, _, vjp = oracle(c)
        want = vjp(jnp.where(keep[None, :, None, None], d_out, 0).astype(jnp.float32))
        for share in (False, True):  # and the two full tiles of a key block on one query stream
            packed = functools.partial(sgm_backward_mgpu, c["q"], c["k"], c["v"], out, lse, d_out, **lst, q_rows=147,
                                       q_boxes=True, k_tails=True, dkv_share=share)
            first, again = packed(), packed()
            for nm, g, w, g2 in zip(("dq", "dk", "dv"), first, want, again):
                assert rel(g, w) <= GRAD_TOL[dtype], (share, nm, rel(g, w))
                assert np.array_equal(np.asarray(g), np.asarray(g2)), (share, nm)
