"""The Mosaic GPU dk/dv kernel's variants that skip DecMem's padding and share its query stream (`q_boxes`,
`k_tails` with the tile map, `dkv_share`), in the Mosaic GPU interpreter against the dense oracle and the default
kernel. The other kernel tests, and the helpers and tolerances used here, are in tests/test_sgm_kernels.py; the race
detector, sm_90 lowering and hardware tests there cover these variants too."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sgm import api
from pallas_kernels.sgm import mosaic_gpu as mosaic_gpu_mod
from pallas_kernels.sgm.mosaic_gpu import sgm_backward_mgpu, sgm_forward_mgpu
from tests.test_sgm_kernels import BF16, GRAD_TOL, lists_of, make_case, oracle, rel


@pytest.mark.parametrize("bq, bkv, q_rows, lens, D", [
    # one 32-row box per query block: two query blocks per step, odd box counts end in a half step
    (64, 64, 20, [0, 20, 64, 32], 64),
    # three boxes per query block (96 rows instead of 128), steps straddle query blocks; tails at tile 1 and tile 0
    (128, 128, 70, [70, 128, 30, 100], 64),
    # DecMem: 5 boxes (160 rows) instead of 3 tiles (192); tails of 19 and 17 keys past 128
    (192, 192, 147, [147, 145, 192, 30], 128),
], ids=["box1", "box3-straddle", "decmem147"])
def test_mgpu_dkv_packed_query_boxes_and_key_tails(bq, bkv, q_rows, lens, D):
    """The dk/dv variants that skip padding: with q_rows, packed 32-row query boxes (`mosaic_gpu_bwd.query_boxes`);
    key blocks whose last tile holds <= 32 valid keys through the transposed tail kernel (`mosaic_gpu_tail`). Each
    alone and both: dk, dv match the oracle's gradient for a cotangent that is zero past q_rows, dq is exactly 0 on
    the padded rows whatever cotangent they were given, the default (neither) gives the same up to fp32 summation
    order, and sgm_attention routes q_rows to the kernel."""
    from pallas_kernels.sgm.mosaic_gpu_bwd import query_boxes

    assert query_boxes(bq, q_rows)[0] == 32 and query_boxes(bq)[0] == 64
    Nq = 5 if bq == 64 else 3
    c = make_case(110 + bq, B=1, H=2, D=D, bq=bq, bkv=bkv, Nq=Nq, Nk=4, K=3, dtype=BF16)
    r = np.random.default_rng(bq)  # full ascending lists, and counts that give key blocks odd box totals
    c["kv_block_idx"] = jnp.asarray(np.sort(np.argsort(r.random((1, 2, Nq, 4)), -1)[..., :3], -1), jnp.int32)
    c["kv_block_cnt"] = jnp.asarray(np.r_[3, 1, 3, 2, 3, 3, 0, 3, 1, 2][: 2 * Nq].reshape(1, 2, Nq), jnp.int32)
    c["kv_block_len"] = jnp.asarray([lens], jnp.int32)
    lst = lists_of(c)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lst, interpret=True)
    d_out = jnp.asarray(np.random.default_rng(6).normal(size=out.shape), BF16)  # nonzero on the padded rows too
    keep = (np.arange(out.shape[1]) % bq) < q_rows
    _, _, vjp = oracle(c)
    want = vjp(jnp.where(keep[None, :, None, None], d_out, 0).astype(jnp.float32))
    bwd = functools.partial(sgm_backward_mgpu, c["q"], c["k"], c["v"], out, lse, d_out, **lst, q_rows=q_rows,
                            interpret=True)
    plain = bwd(q_boxes=False, k_tails=False, dkv_share=False)  # whole q tiles, no tail kernel
    for variant in (dict(q_boxes=True), dict(k_tails=True), dict(q_boxes=True, k_tails=True),
                    dict(q_boxes=True, k_tails=True, dkv_share=True)):
        got = bwd(**variant)
        for nm, g, w, p in zip(("dq", "dk", "dv"), got, want, plain):
            assert rel(g, w) <= GRAD_TOL[BF16], (variant, nm, rel(g, w))
            assert rel(g, p) <= 2e-3, (variant, nm)  # the same sums in another grouping
        assert not np.asarray(got[0], np.float32)[:, ~keep].any()  # padded rows: dq exactly 0
    name = "mosaic_gpu_packed_test"
    api.register_backend(name, functools.partial(api._REGISTRY["mosaic_gpu"].fwd, interpret=True),
                         functools.partial(api._REGISTRY["mosaic_gpu"].bwd, interpret=True, q_boxes=True,
                                           k_tails=True), tile=(64, 64))
    try:
        args = (c["kv_block_idx"], c["kv_block_cnt"], c["kv_block_len"])
        via_api = jax.vjp(lambda q, k, v: api.sgm_attention(q, k, v, *args, block_q=bq, block_kv=bkv, backend=name,
                                                            q_rows=q_rows), c["q"], c["k"], c["v"])[1](d_out)
        for g, a in zip(got, via_api):
            assert np.array_equal(np.asarray(g), np.asarray(a))
    finally:
        api._REGISTRY.pop(name, None)


def test_mgpu_dkv_takes_key_tiles_in_the_tile_map_order(monkeypatch):
    """With key tails taken by the tail kernel, the dk/dv kernel's CTAs take the other tiles first (`dkv_tile_map`:
    both consumers of a CTA then work), and the order only decides which CTA computes a tile: a random permutation
    per batch row gives bitwise the same gradients (a producer streaming for other tiles than its consumers take
    would deadlock or mix the tiles' query lists)."""
    taken = jnp.asarray([[0, 0, 1, 0, 0, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(np.asarray(mosaic_gpu_mod.dkv_tile_map(taken)),
                                  [[0, 1, 3, 4, 6, 8, 2, 5, 7], [1, 2, 3, 4, 5, 6, 7, 0, 8]])
    c = make_case(70, B=2, H=2, D=64, bq=192, bkv=192, Nq=2, Nk=3, K=2, dtype=BF16)
    c["kv_block_len"] = jnp.asarray([[147, 145, 192], [30, 147, 100]], jnp.int32)
    lst = lists_of(c)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lst, interpret=True)
    d_out = jnp.asarray(np.random.default_rng(71).normal(size=out.shape), BF16)
    bwd = functools.partial(sgm_backward_mgpu, c["q"], c["k"], c["v"], out, lse, d_out, **lst, q_rows=147,
                            q_boxes=True, k_tails=True, interpret=True)
    first = bwd()
    perms = np.stack([np.random.default_rng(72 + i).permutation(9) for i in range(2)]).astype(np.int32)
    used = []
    monkeypatch.setattr(mosaic_gpu_mod, "dkv_tile_map", lambda taken: used.append(1) or jnp.asarray(perms))
    mosaic_gpu_mod._backward.clear_cache()  # a cached trace would not call it
    again = bwd()
    assert used
    for nm, g, g2 in zip(("dq", "dk", "dv"), first, again):
        assert np.array_equal(np.asarray(g), np.asarray(g2)), nm
    _, _, vjp = oracle(c)
    keep = (np.arange(out.shape[1]) % 192) < 147
    want = vjp(jnp.where(keep[None, :, None, None], d_out, 0).astype(jnp.float32))
    for nm, g, w in zip(("dq", "dk", "dv"), again, want):
        assert rel(g, w) <= GRAD_TOL[BF16], (nm, rel(g, w))


@pytest.mark.parametrize("stages, variant", [(1, dict(q_boxes=False)), (2, dict(q_boxes=True, dkv_share=True)),
                                             (2, dict(q_boxes=True, k_tails=True, dkv_share=True))],
                         ids=["tiles-ring1", "boxes-shared-ring2", "boxes-tails-shared-ring2"])
def test_mgpu_dkv_overlap_matches_the_plain_loop(stages, variant, capfd, monkeypatch):
    """The overlapped dk/dv loop (`mosaic_gpu_bwd.overlapped_dkv`), under the interpreter's race detector: it
    releases step t − 1's ring slot before awaiting step t's (with a ring of depth 1 they are the same slot: the
    other order deadlocks), and gives the plain loop's dk, dv bit for bit (the interpreter computes the same products
    in the same order), within the oracle's bound; consumers with different step counts, half steps of packed boxes
    and a count-0 query block included."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from pallas_kernels.sgm import mosaic_gpu_bwd

    ip = plgpu.InterpretGPUParams(detect_races=True)
    c = make_case(120 + stages, B=1, H=1, D=64, bq=192, bkv=192, Nq=3, Nk=2, K=2, dtype=BF16)
    c["kv_block_cnt"] = jnp.asarray([[[2, 1, 0]]], jnp.int32)
    c["kv_block_idx"] = jnp.asarray([[[[0, 1], [1, 1], [0, 1]]]], jnp.int32)
    c["kv_block_len"] = jnp.asarray([[147, 192]], jnp.int32)
    lst = lists_of(c)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lst, interpret=True)
    d_out = jnp.asarray(np.random.default_rng(123).normal(size=out.shape), BF16)
    keep = (np.arange(out.shape[1]) % 192) < 147
    _, _, vjp = oracle(c)
    want = vjp(jnp.where(keep[None, :, None, None], d_out, 0).astype(jnp.float32))
    bwd = functools.partial(sgm_backward_mgpu, c["q"], c["k"], c["v"], out, lse, d_out, **lst, q_rows=147,
                            stages=stages, interpret=ip, **variant)
    plain = bwd(dkv_overlap=False)
    calls = []
    real = mosaic_gpu_bwd.overlapped_dkv
    monkeypatch.setattr(mosaic_gpu_bwd, "overlapped_dkv", lambda *a: calls.append(1) or real(*a))
    got = bwd(dkv_overlap=True)
    assert calls  # the overlapped loop was traced
    for nm, g, p, w in zip(("dq", "dk", "dv"), got, plain, want):
        assert np.array_equal(np.asarray(g), np.asarray(p)), nm
        assert rel(g, w) <= GRAD_TOL[BF16], (nm, rel(g, w))
    assert "RACE DETECTED" not in capfd.readouterr().out


@pytest.mark.parametrize("bq, over", [(192, (("splits", 2),)), (64, ()), (192, (("stages", 1), ("splits", 1)))],
                         ids=["shared3-split2", "own-lists", "shared3-ring1"])
def test_mgpu_dq_overlap_matches_the_plain_loop(bq, over, capfd):
    """The overlapped dq loop (`mosaic_gpu_bwd.overlapped_dq`, plan `overlap`) under the race detector: 3 consumers
    on one shared K/V stream split over 2 CTAs, 2 consumers with their own lists and different step counts (one
    query block without any), and a ring of depth 1 (step t − 1's K slot must be released before step t's is
    awaited). dq equals the plain loop's bit for bit in the interpreter and the oracle's within its bound."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    ip = plgpu.InterpretGPUParams(detect_races=True)
    c = make_case(130 + bq, B=1, H=1, D=64, bq=bq, bkv=bq, Nq=3, Nk=3, K=2, dtype=BF16)
    c["kv_block_cnt"] = jnp.asarray([[[2, 1, 0]]], jnp.int32)
    lst = lists_of(c)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lst, interpret=True)
    _, _, vjp = oracle(c)
    d_out = jnp.asarray(np.random.default_rng(131).normal(size=out.shape), BF16)
    want = vjp(d_out.astype(jnp.float32))[0]
    bwd = functools.partial(sgm_backward_mgpu, c["q"], c["k"], c["v"], out, lse, d_out, **lst, interpret=ip)
    plain = bwd(dq_plan_overrides=over)[0]
    got = bwd(dq_plan_overrides=over + (("overlap", True),))[0]
    assert np.array_equal(np.asarray(got), np.asarray(plain))
    assert rel(got, want) <= GRAD_TOL[BF16]
    assert "RACE DETECTED" not in capfd.readouterr().out


def test_mgpu_backward_overlap_lowers_with_wgmmas_in_flight(monkeypatch):
    """Lowered for sm_90 on the CPU (D = 128, DecMem's blocks): the overlapped dk/dv kernel commits its four wgmmas
    per step as the plain loop does, but waits with one in flight twice (Sᵀ while dPᵀ runs, dPᵀ while dV runs) and
    fully once per step, where the plain loop waits fully after each of the four; the overlapped dq kernel (three
    wgmmas) waits for S with dP in flight and leaves dq·K running into the next step. Read from the Mosaic GPU
    modules before serialisation (jax 0.11.2's `_run_serde_pass`)."""
    import collections
    import re

    from jax.experimental.mosaic.gpu import core as mgpu_core

    modules = []
    serde = mgpu_core._run_serde_pass
    monkeypatch.setattr(mgpu_core, "_run_serde_pass", lambda m, **kw: modules.append(str(m)) or serde(m, **kw))
    sds = jax.ShapeDtypeStruct
    B, H, Nq, Nk, K, D, block = 1, 2, 3, 5, 3, 128, 192
    q, k = sds((B, Nq * block, H, D), BF16), sds((B, Nk * block, H, D), BF16)
    lst = (sds((B, H, Nq, K), jnp.int32), sds((B, H, Nq), jnp.int32), sds((B, Nk), jnp.int32))
    lse = sds((B, H, Nq * block), jnp.float32)
    found = {}
    for overlap in (False, True):
        modules.clear()
        bwd = jax.jit(functools.partial(sgm_backward_mgpu, block_q=block, block_kv=block, q_rows=147,
                                        q_boxes=True, k_tails=False, dkv_overlap=overlap,
                                        dq_plan_overrides=(("overlap", overlap),)))
        bwd.trace(q, k, k, q, lse, q, *lst).lower(lowering_platforms=("cuda",))
        assert len(modules) == 2  # dq, dk/dv
        for name, text in zip(("dq", "dkv"), modules):
            waits = collections.Counter(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", text))
            found[name, overlap] = (text.count("wgmma.commit_group"), waits)
    assert found["dkv", False] == (4, {"0": 4}) and found["dq", False] == (3, {"0": 3})
    # per step one full wait and two partial (dk/dv) or one partial, one full (dq); plus one full after the loop
    assert found["dkv", True] == (4, {"0": 2, "1": 2}) and found["dq", True] == (3, {"0": 3, "1": 1})


def test_mgpu_backward_scale_folded_into_exp2_matches_the_oracle(monkeypatch):
    """The backward kernels' P = exp2(c·s − lse2) with the scale inside exp2's argument (`SGM_MGPU_FOLD_SCALE_BWD=1`:
    one multiply-add a logit, `mosaic_gpu_fwd.scaled_minus`) and in the default form (scale first), in the dq kernel,
    the dk/dv kernel and the key-tail kernel (DecMem's 147-row blocks, peaky logits): gradients against the oracle,
    the two forms against each other, and a spy on which form each trace used."""
    from pallas_kernels.sgm import mosaic_gpu_fwd as fwd

    used = []
    real = fwd.scaled_minus

    def spy(s, c, m, axis=0):
        used.append(c)
        return real(s, c, m, axis)

    monkeypatch.setattr(fwd, "scaled_minus", spy)
    c = make_case(140, B=1, H=1, D=64, bq=192, bkv=192, Nq=2, Nk=4, K=3, dtype=BF16)
    c["kv_block_len"] = jnp.asarray([[147, 145, 192, 30]], jnp.int32)
    lst = lists_of(c)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lst, interpret=True)
    d_out = jnp.asarray(np.random.default_rng(8).normal(size=out.shape), BF16)
    keep = (np.arange(out.shape[1]) % 192) < 147
    d_out = jnp.where(keep[None, :, None, None], d_out, 0).astype(BF16)
    want = oracle(c)[2](d_out.astype(jnp.float32))
    got = {}
    for fold in (True, False):
        monkeypatch.setattr(fwd, "FOLD_SCALE_BWD", fold)
        for variant in (dict(k_tails=False), dict(k_tails=True, q_boxes=True)):
            jax.clear_caches()  # the other form's kernels (same shapes) must not be reused
            used.clear()
            g = sgm_backward_mgpu(c["q"], c["k"], c["v"], out, lse, d_out, **lst, q_rows=147, interpret=True,
                                  **variant)
            assert len(used) >= (3 if variant["k_tails"] else 2) and all((u != 1.0) == fold for u in used), used
            for nm, a, w in zip(("dq", "dk", "dv"), g, want):
                assert rel(a, w) <= GRAD_TOL[BF16], (fold, variant, nm, rel(a, w))
            got[fold, variant["k_tails"]] = g
    for tails in (False, True):  # the two forms differ by rounding only
        for a, b in zip(got[True, tails], got[False, tails]):
            assert rel(a, b) <= GRAD_TOL[BF16]
