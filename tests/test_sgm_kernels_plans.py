"""The Mosaic GPU SGM kernels' plans (`mosaic_gpu_fwd.StreamPlan`), in the Mosaic GPU interpreter on CPU: how a plan
is chosen per geometry and which overrides are refused, every forward and dq plan against the dense oracle, and the
overlapped forward's lazy rescale (`mosaic_gpu_fwd_overlap`). Shared helpers and the other kernel tests:
tests/test_sgm_kernels.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sgm import mosaic_gpu_fwd
from pallas_kernels.sgm.mosaic_gpu import dq_plan, forward_plan, sgm_backward_mgpu, sgm_forward_mgpu
from tests.test_sgm_kernels import BF16, FWD_TOL, GRAD_TOL, lists_of, lse_close, make_case, oracle, rel


def test_mgpu_forward_plan_choice_and_errors():
    """Shared streams where a query block has 2 or 3 q tiles, own lists for 64-row blocks; 32-row boxes for blocks
    larger than 64; the deepest ring that fits; splits only for grids under 3 waves; clear errors otherwise."""
    plan = lambda bq, bkv, d=128, q_rows=None, **o: forward_plan((1, q_rows or 24 * bq, 12, d), bq, bkv,
                                                                 jnp.bfloat16, plan=o)
    p = plan(192, 192)
    assert (p.consumers, p.share, p.box, p.width, p.stages, p.splits) == (3, 3, 32, 64, 4, 3)
    p = plan(64, 64, q_rows=49152)
    assert (p.consumers, p.share, p.box, p.width, p.stages, p.splits) == (2, 1, 64, 64, 2, 1)
    p = plan(128, 128, d=64)
    assert (p.consumers, p.share, p.box, p.width, p.stages) == (2, 2, 32, 128, 4)
    assert plan(192, 192, splits=1).splits == 1 and plan(64, 64, width=128).stages == 1
    for p in (plan(192, 192), plan(64, 64), plan(128, 64), plan(64, 64, width=128)):
        assert p.smem_bytes(128, 2) <= mosaic_gpu_fwd.SMEM_BUDGET
    q = dq_plan((1, 24 * 192, 12, 128), 192, 192, jnp.bfloat16)  # dq, 192-slot blocks: a shared stream (measured)
    assert (q.consumers, q.share, q.box, q.width, q.stages, q.splits) == (3, 3, 64, 64, 3, 3)
    q64 = dq_plan((1, 768 * 64, 12, 128), 64, 64, jnp.bfloat16)  # 64-row blocks: own lists, 64-row boxes
    assert (q64.consumers, q64.share, q64.box, q64.width, q64.stages, q64.splits) == (2, 1, 64, 64, 2, 1)
    # CFG batch 2 (the rollout): 576 CTAs = 4.4 waves, split under 5 (H200: 1.88 ms with 2 splits, 1.96 without)
    assert forward_plan((2, 24 * 192, 12, 128), 192, 192, jnp.bfloat16).splits == 2
    assert forward_plan((4, 24 * 192, 12, 128), 192, 192, jnp.bfloat16).splits == 1  # 8.7 waves
    assert q.smem_bytes(128, 2, tiles=2, vectors=2) <= mosaic_gpu_fwd.SMEM_BUDGET
    with pytest.raises(ValueError, match="divisible by consumers"):
        plan(192, 192, consumers=2, share=2)
    with pytest.raises(ValueError, match="box must be 32 or 64"):
        plan(192, 192, box=48)
    with pytest.raises(ValueError, match="at most 4 boxes per step"):
        plan(128, 192, width=160)  # 5 boxes of 32
    with pytest.raises(ValueError, match="sched"):
        plan(64, 64, sched=True)  # own lists: step counts differ per consumer
    with pytest.raises(ValueError, match="overlap and sched"):
        plan(192, 192, sched=True, overlap=True)
    with pytest.raises(ValueError, match="lazy .* is an option of the overlapped loop"):
        plan(192, 192, lazy=True, overlap=False)
    with pytest.raises(ValueError, match="unroll .* is an option of the overlapped loop without lazy"):
        plan(192, 192, unroll=True, overlap=False)
    with pytest.raises(ValueError, match="rowsum .* is an option of the overlapped loop without lazy"):
        plan(192, 192, rowsum=True, overlap=True, lazy=True)
    with pytest.raises(ValueError, match="forward-kernel option"):
        dq_plan((1, 24 * 192, 12, 128), 192, 192, jnp.bfloat16, plan=dict(sched=True))
    assert dq_plan((1, 24 * 192, 12, 128), 192, 192, jnp.bfloat16, plan=dict(overlap=True)).overlap
    cases = [((192, 192), {}), ((128, 128), {}), ((192, 192), dict(width=128)), ((64, 64), {}),  # "auto" overlap:
             ((192, 192), dict(sched=True)), ((64, 64), dict(overlap=True))]  # shared streams of <= 256 columns
    assert [plan(*a, **o).overlap for a, o in cases] == [True, True, False, False, False, True]
    with pytest.raises(ValueError, match="SMEM"):
        forward_plan((1, 64, 1, 128), 64, 64, jnp.bfloat16, stages=3)


@pytest.mark.parametrize("bq, bkv, over", [
    (192, 192, dict(splits=1, overlap=False)),  # 3 consumers on one stream of 2 x 32-row boxes, the plain loop
    (192, 192, dict(box=64, splits=3)),  # 64-row boxes; 3 splits merged by LSE (some splits empty)
    (128, 64, dict(overlap=False)),  # 2 consumers on one stream of 128-row steps (2 boxes of 64), auto splits
    (64, 128, dict(width=128, splits=1)),  # own lists, 128-row steps of 4 x 32-row boxes
    (64, 64, dict(consumers=3, share=1, splits=2)),  # own lists, 3 consumers, a ragged last tile group
    (192, 192, dict(sched=True, splits=2)),  # ping-pong: 3 consumers take turns through a schedule barrier
    (128, 64, dict(sched=True, splits=1)),  # ping-pong of 2 consumers on 128-row steps
    (192, 192, dict(overlap=True, rowsum=False, splits=2)),  # QKᵀ of step t+1 issued beside P·V of step t (in the
    (64, 64, dict(consumers=3, share=1, splits=2, overlap=True)),  # interpreter: same protocol, no real overlap)
    (192, 192, dict(overlap=True, lazy=True, splits=2)),  # the overlapped loop with the conditional rescale
    (192, 192, dict(overlap=True, unroll=True, rowsum=False, splits=2)),  # the overlapped loop, two steps a body
    (64, 64, dict(consumers=3, share=1, splits=2, overlap=True, unroll=True)),
    (192, 192, dict(overlap=True, rowsum=True, splits=2)),  # the overlapped loop, row sums of the rounded P
    (128, 64, dict(overlap=True, rowsum=True, unroll=True)),  # ... 2 consumers on 128-row steps, two steps a body
    (128, 128, {}),  # the default plan of 128-slot blocks (benchmarks/rollout.py --memory block_slots=128)
], ids=["shared3", "shared3-box64-split3", "shared2-w128", "own-w128-box32", "own3-ragged-split2", "sched3-split2",
        "sched2-w128", "overlap3-split2", "overlap-own3-ragged", "lazy3-split2", "unroll3-split2",
        "unroll-own3-ragged", "rowsum3-split2", "rowsum2-w128-unroll", "default-128x128"])
def test_mgpu_forward_plans_match_the_oracle(bq, bkv, over):
    """Every forward plan (mosaic_gpu_fwd.StreamPlan) against the dense oracle, with count 0, empty, partial and
    full key blocks and B = 2: the step grouping, per-box masks, shared-stream barriers and the split merge."""
    c = make_case(70 + bq, B=2, H=1, D=64, bq=bq, bkv=bkv, Nq=4 if bq == 64 else 2, Nk=5, K=3, dtype=BF16)
    lst = lists_of(c)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lst, plan=tuple(over.items()), interpret=True)
    ref_out, ref_lse, _ = oracle(c)
    assert rel(out, ref_out) <= FWD_TOL[BF16]
    lse_close(lse, ref_lse, FWD_TOL[BF16])


@pytest.mark.parametrize("bq, bkv, over", [
    (192, 192, dict(consumers=2, share=1, box=32, splits=2)),  # own lists of 32-row boxes, partial dq sums added
    (64, 128, dict(width=128, splits=1)),  # own lists, 128-row steps of 4 boxes
], ids=["own-box32-split2", "own-w128"])
def test_mgpu_dq_plans_match_the_oracle(bq, bkv, over):
    """The dq kernel under non-default StreamPlans against the oracle's gradient (dk/dv do not depend on it)."""
    c = make_case(90 + bq, B=2, H=1, D=64, bq=bq, bkv=bkv, Nq=2, Nk=5, K=3, dtype=BF16)
    lst = lists_of(c)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lst, interpret=True)
    ref_out, _, vjp = oracle(c)
    d_out = jnp.asarray(np.random.default_rng(5).normal(size=out.shape), BF16)
    dq, _, _ = sgm_backward_mgpu(c["q"], c["k"], c["v"], out, lse, d_out, **lst, dq_plan_overrides=tuple(over.items()),
                                 interpret=True)
    assert rel(dq, vjp(d_out.astype(jnp.float32))[0]) <= GRAD_TOL[BF16]
    assert int(c["kv_block_cnt"][0, 0, 0]) == 0 and not np.asarray(dq[0, :bq, 0], np.float32).any()  # count 0


@pytest.mark.parametrize("sigma, rescales", [(1.0, "none"), (3.0, "most")])
def test_mgpu_lazy_rescale_matches_the_oracle(sigma, rescales, monkeypatch):
    """The overlapped forward with the conditional rescale (`mosaic_gpu_fwd_overlap.lazy_softmax`) against the dense
    oracle, where it never has to raise a max after the first step (logits of std ~1.4 in log2 units: P stays
    within 2^8 of the stale max) and where it mostly has to (std ~13): both branches and the V-slot release of each
    (the interpreter checks that every barrier completion is observed)."""
    from pallas_kernels.sgm import mosaic_gpu_fwd_overlap as ov

    seen = []
    real = ov.lazy_softmax

    def spy(*a):
        out = real(*a)
        jax.debug.callback(lambda need: seen.append(bool(need)), out[4])
        return out

    monkeypatch.setattr(ov, "lazy_softmax", spy)
    jax.clear_caches()  # a kernel traced before (the other case: same shapes) would keep its own spy
    c = make_case(170, B=1, H=1, D=64, bq=192, bkv=192, Nq=1, Nk=8, K=6, dtype=BF16, sigma=sigma)
    c["kv_block_cnt"] = jnp.full_like(c["kv_block_cnt"], 6)
    c["kv_block_idx"] = jnp.asarray([[[[0, 2, 3, 5, 6, 7]]]], jnp.int32)
    c["kv_block_len"] = jnp.asarray([[0, 192, 147, 100, 64, 191, 147, 33]], jnp.int32)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lists_of(c), interpret=True,
                                plan=(("overlap", True), ("lazy", True), ("splits", 1)))
    ref_out, ref_lse, _ = oracle(c)
    assert rel(out, ref_out) <= FWD_TOL[BF16]
    lse_close(lse, ref_lse, FWD_TOL[BF16])
    assert len(seen) == 30  # 3 consumers x the 10 steps after the first
    assert (sum(seen) == 0) if rescales == "none" else (sum(seen) > len(seen) // 2), seen


@pytest.mark.parametrize("over", [dict(overlap=False, splits=1), dict(overlap=True, splits=2),
                                  dict(overlap=True, lazy=True, splits=1)], ids=["plain", "overlap", "lazy"])
def test_mgpu_forward_scale_folded_into_exp2_matches_the_oracle(over, monkeypatch):
    """The softmax with the logit scale inside exp2's argument (`mosaic_gpu_fwd.scaled_minus`: max over the raw
    logits, then one multiply-add a logit; the default) and the earlier form (scale first; SGM_MGPU_FOLD_SCALE=0),
    both against the dense oracle at peaky logits (std ~13 in log2 units), on partial and empty key blocks. A spy
    checks which form each trace used."""
    used = []
    real = mosaic_gpu_fwd.scaled_minus

    def spy(s, c, m):
        used.append(c)
        return real(s, c, m)

    monkeypatch.setattr(mosaic_gpu_fwd, "scaled_minus", spy)
    c = make_case(180, B=1, H=1, D=64, bq=192, bkv=192, Nq=2, Nk=6, K=4, dtype=BF16, sigma=3.0)
    ref_out, ref_lse, _ = oracle(c)
    outs = {}
    for fold in (True, False):
        monkeypatch.setattr(mosaic_gpu_fwd, "FOLD_SCALE", fold)
        jax.clear_caches()  # the other form's kernel (same shapes) must not be reused
        used.clear()
        out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lists_of(c), interpret=True, plan=tuple(over.items()))
        assert used and all((u != 1.0) == fold for u in used), used
        assert rel(out, ref_out) <= FWD_TOL[BF16]
        lse_close(lse, ref_lse, FWD_TOL[BF16])
        outs[fold] = np.asarray(out, np.float32)
    assert rel(outs[True], outs[False]) <= FWD_TOL[BF16]  # the two forms differ by rounding only


@pytest.mark.parametrize("last_len, steps", [(33, 11), (0, 10)], ids=["even-rest", "odd-rest"])
def test_mgpu_unrolled_overlap_runs_every_step_once(last_len, steps, monkeypatch):
    """The overlapped loop with two steps a body (`StreamPlan.unroll`) against the dense oracle, with n − 1 steps
    after the first both even (the pairs only) and odd (the pairs, then one step under lax.cond): a spy counts the
    softmax steps, which must be every step once for each of the 3 consumers."""
    seen = []
    real = mosaic_gpu_fwd.online_softmax

    def spy(*a, **k):
        out = real(*a, **k)
        jax.debug.callback(lambda x: seen.append(1), out[1])
        return out

    from pallas_kernels.sgm import mosaic_gpu_fwd_overlap as ov

    monkeypatch.setattr(ov, "online_softmax", spy)
    jax.clear_caches()
    c = make_case(190, B=1, H=1, D=64, bq=192, bkv=192, Nq=1, Nk=8, K=6, dtype=BF16)
    c["kv_block_cnt"] = jnp.full_like(c["kv_block_cnt"], 6)
    c["kv_block_idx"] = jnp.asarray([[[[0, 2, 3, 5, 6, 7]]]], jnp.int32)
    c["kv_block_len"] = jnp.asarray([[0, 192, 147, 100, 64, 191, 147, last_len]], jnp.int32)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lists_of(c), interpret=True,
                                plan=(("overlap", True), ("unroll", True), ("splits", 1)))
    ref_out, ref_lse, _ = oracle(c)
    assert rel(out, ref_out) <= FWD_TOL[BF16]
    lse_close(lse, ref_lse, FWD_TOL[BF16])
    assert len(seen) == 3 * steps, len(seen)
