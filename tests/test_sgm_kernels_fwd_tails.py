"""The Mosaic GPU forwards that skip the padding rows of partly used query blocks. Packed query tails
(`mosaic_gpu.forward_packed`, `lists.union_lists`, `mosaic_gpu_fwd.mask_row_groups`): query blocks with q_rows <
block_q rows in use run their whole q tiles as usual and the partial last tiles of up to 3 neighbouring blocks as
ONE tile over the union of their lists, each block's rows masked to its own selections. The transposed tail
consumer (`mosaic_gpu.forward_tail`, `mosaic_gpu_fwd_tail`): the third consumer of a 192-row block runs its tail
with the queries on the N side, on the block's own stream. Both checked in the Mosaic GPU interpreter against the
dense oracle (rows in use) and the contract (rows past q_rows: out 0, LSE −inf), and lowered for sm_90 on the CPU.
Helpers and tolerances: tests/test_sgm_kernels.py."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sgm import api
from pallas_kernels.sgm import mosaic_gpu as mosaic_gpu_mod
from pallas_kernels.sgm.lists import group_steps, subtile_steps, union_lists
from pallas_kernels.sgm.mosaic_gpu import packed_rows, sgm_forward_mgpu
from pallas_kernels.sgm.mosaic_gpu_fwd import interpret_params
from pallas_kernels.sgm.mosaic_gpu_fwd_tail import q_tail_fits
from tests.test_sgm_kernels import BF16, F16, FWD_TOL, lists_of, make_case, oracle, rel


def test_union_lists_against_sets():
    """Union, membership bits and padding against Python sets, with counts 0, ragged last group, garbage past
    the counts."""
    r = np.random.default_rng(0)
    B, H, NQ, K, NK = 2, 3, 7, 5, 12
    cnt = r.integers(0, K + 1, (B, H, NQ))
    cnt[0, 0, :3] = 0  # a whole group empty
    idx = np.full((B, H, NQ, K), 9, np.int64)
    for b, h, i in np.ndindex(B, H, NQ):
        idx[b, h, i, : cnt[b, h, i]] = np.sort(r.choice(NK, cnt[b, h, i], replace=False))
    for group in (2, 3):
        uidx, ucnt, ubits = (np.asarray(x) for x in union_lists(jnp.asarray(idx), jnp.asarray(cnt), group))
        ng = -(-NQ // group)
        assert uidx.shape == (B, H, ng, group * K) and ucnt.shape == (B, H, ng)
        for b, h, g in np.ndindex(B, H, ng):
            members = [set(idx[b, h, i, : cnt[b, h, i]].tolist()) for i in range(g * group, min(NQ, g * group + group))]
            want = sorted(set().union(*members))
            n = int(ucnt[b, h, g])
            assert uidx[b, h, g, :n].tolist() == want
            for pos, kb in enumerate(want):
                assert ubits[b, h, g, pos] == sum(1 << j for j, s in enumerate(members) if kb in s)
            assert (ubits[b, h, g, n:] == 0).all()
            assert (uidx[b, h, g, n:] == (want[-1] if want else 0)).all()  # padding repeats the last id


def test_step_payload_and_group_bits():
    """subtile_steps carries a per-block value to its steps (empty sub-tiles dropped); group_steps packs each box's
    bits above the valid counts."""
    idx = jnp.asarray([[[[0, 1]]]], jnp.int32)
    lens = jnp.asarray([[147, 40]], jnp.int32)
    rows, valid, n, bits = subtile_steps(idx, jnp.asarray([[[2]]], jnp.int32), lens, block_kv=192, sub=32,
                                         payload=jnp.asarray([[[[5, 3]]]], jnp.int32))
    assert np.asarray(bits)[0, 0, 0, :7].tolist() == [5] * 5 + [3] * 2 and not np.asarray(bits)[0, 0, 0, 7:].any()
    _, code, _ = group_steps(rows, valid, n, 2, bits=bits)
    unpack = lambda c: [c % 128, (c // 128) % 128, (c // 128 ** 2) % 8, c // (128 ** 2 * 8)]
    assert [unpack(int(c)) for c in np.asarray(code)[0, 0, 0, :4]] == [[32, 32, 5, 5], [32, 32, 5, 5], [19, 32, 5, 3],
                                                                       [8, 0, 3, 0]]
    with pytest.raises(ValueError, match="overflow"):
        group_steps(rows, valid, n, 4, bits=bits)


def test_packed_rows_split():
    assert packed_rows(147) == (128, 19, 3)  # DecMem: 2 whole tiles, tails of 3 blocks per tile
    assert packed_rows(80) == (64, 16, 3)  # 4 would fit; 3 group bits per box
    assert packed_rows(100) == (128, 0, 0)  # a 36-row tail: its own tile
    assert packed_rows(128) == (128, 0, 0) and packed_rows(20) == (0, 20, 3)


@pytest.mark.parametrize("bq, q_rows, nq, dtype, overlap", [(192, 147, 4, BF16, False), (128, 80, 3, F16, False),
                                                             (64, 21, 5, BF16, False), (192, 147, 4, BF16, True)],
                         ids=["decmem-ragged-group", "tail16-fp16", "tails-only", "decmem-overlap"])
def test_forward_packed_matches_the_oracle(bq, q_rows, nq, dtype, overlap, monkeypatch):
    """Rows in use against the dense oracle (count-0 blocks inside a group included: their rows get 0 and −inf);
    rows past q_rows: out 0, LSE −inf; the whole and the packed parts both present (or only the tails). overlap:
    both parts under the intra-consumer overlap plan (the tails' rows that see no key in a step included)."""
    c = make_case(40 + bq, B=2, H=2, D=64, bq=bq, bkv=bq, Nq=nq, Nk=5, K=3, dtype=dtype)
    c["kv_block_cnt"] = c["kv_block_cnt"].at[1, 0, 1].set(0)
    plan = None
    if overlap:  # the whole tiles by their plan override, the tails by the module default (read when traced)
        monkeypatch.setattr(mosaic_gpu_mod, "FWD_OVERLAP", True)
        plan = (("overlap", True),)
    out, lse = sgm_forward_mgpu(c["q"], c["k"], c["v"], **lists_of(c), q_rows=q_rows, q_tails=True, plan=plan,
                                interpret=True)
    ref_out, ref_lse, _ = oracle(c)
    keep = (np.arange(nq * bq) % bq) < q_rows
    o, l = np.asarray(out, np.float32), np.asarray(lse)
    assert rel(o[:, keep], ref_out[:, keep]) <= FWD_TOL[jnp.dtype(dtype)]
    rl = np.asarray(ref_lse)[..., keep]
    assert np.array_equal(np.isneginf(l[..., keep]), np.isneginf(rl))
    np.testing.assert_allclose(l[..., keep][np.isfinite(rl)], rl[np.isfinite(rl)], rtol=1e-2, atol=1e-2)
    assert (o[:, ~keep] == 0).all() and np.isneginf(l[..., ~keep]).all()
    cnt = np.asarray(c["kv_block_cnt"])
    for b, h, i in zip(*np.nonzero(cnt == 0)):
        assert (o[b, i * bq:(i + 1) * bq, h] == 0).all() and np.isneginf(l[b, h, i * bq:(i + 1) * bq]).all()


@pytest.mark.parametrize("q_rows, D, dtype, overlap", [(147, 64, BF16, False), (147, 128, BF16, True),
                                                       (160, 64, F16, True), (129, 64, BF16, False)],
                         ids=["decmem", "decmem-d128-overlap", "tail32-fp16", "tail1"])
def test_forward_tail_consumer_matches_the_oracle(q_rows, D, dtype, overlap):
    """The transposed tail consumer: rows in use against the dense oracle, rows past q_rows out 0 and LSE −inf,
    count-0 blocks likewise; the whole tiles' rows bit for bit the padded forward's (the same consumers' code, the V
    ring in another swizzle). overlap: the whole tiles under the intra-consumer overlap beside the tail's loop."""
    nq, bq = 4, 192
    c = make_case(60 + q_rows + D, B=2, H=2, D=D, bq=bq, bkv=bq, Nq=nq, Nk=5, K=3, dtype=dtype)
    c["kv_block_cnt"] = c["kv_block_cnt"].at[1, 0, 2].set(0)
    plan = (("overlap", overlap),)
    run = functools.partial(sgm_forward_mgpu, c["q"], c["k"], c["v"], **lists_of(c), plan=plan, interpret=True)
    out, lse = run(q_rows=q_rows, q_tail_t=True)
    padded, padded_lse = run()
    ref_out, ref_lse, _ = oracle(c)
    pos = np.arange(nq * bq) % bq
    keep, whole = pos < q_rows, pos < 128
    o, l = np.asarray(out, np.float32), np.asarray(lse)
    assert rel(o[:, keep], ref_out[:, keep]) <= FWD_TOL[jnp.dtype(dtype)]
    assert rel(o[:, keep & ~whole], ref_out[:, keep & ~whole]) <= FWD_TOL[jnp.dtype(dtype)]  # the tails alone
    rl = np.asarray(ref_lse)[..., keep]
    assert np.array_equal(np.isneginf(l[..., keep]), np.isneginf(rl))
    np.testing.assert_allclose(l[..., keep][np.isfinite(rl)], rl[np.isfinite(rl)], rtol=1e-2, atol=1e-2)
    assert (o[:, ~keep] == 0).all() and np.isneginf(l[..., ~keep]).all()
    np.testing.assert_array_equal(o[:, whole], np.asarray(padded, np.float32)[:, whole])
    np.testing.assert_array_equal(l[..., whole], np.asarray(padded_lse)[..., whole])
    for b, h, i in zip(*np.nonzero(np.asarray(c["kv_block_cnt"]) == 0)):
        assert (o[b, i * bq:(i + 1) * bq, h] == 0).all() and np.isneginf(l[b, h, i * bq:(i + 1) * bq]).all()


def test_forward_tail_consumer_where_it_applies():
    """192-row blocks whose third tile holds 1..32 queries; elsewhere q_tail_t changes nothing (the padded forward)."""
    assert q_tail_fits(147, 192) and q_tail_fits(129, 192) and q_tail_fits(160, 192)
    assert not any(q_tail_fits(r, b) for r, b in ((128, 192), (161, 192), (None, 192), (80, 128), (147, 256)))
    c = make_case(5, B=1, H=1, D=64, bq=128, bkv=128, Nq=2, Nk=3, K=2, dtype=BF16)
    run = functools.partial(sgm_forward_mgpu, c["q"], c["k"], c["v"], **lists_of(c), interpret=True)
    np.testing.assert_array_equal(np.asarray(run(q_rows=80, q_tail_t=True)[0]), np.asarray(run()[0]))


@pytest.mark.parametrize("D", [128, 64])
def test_forward_tail_consumer_lowers_for_sm90(D):
    """One launch (the tail consumer inside the forward kernel) through Pallas' Mosaic GPU lowering and layout
    inference for sm_90 on the CPU, plain and with the whole tiles' overlap, 1 and 2 splits; the SMEM plan fits."""
    sds = jax.ShapeDtypeStruct
    B, H, Nq, Nk, K = 1, 2, 4, 5, 3
    q, k = sds((B, Nq * 192, H, D), jnp.bfloat16), sds((B, Nk * 192, H, D), jnp.bfloat16)
    lst = (sds((B, H, Nq, K), jnp.int32), sds((B, H, Nq), jnp.int32), sds((B, Nk), jnp.int32))
    for plan in ((("overlap", False), ("splits", 1)), (("overlap", True), ("splits", 2))):
        f = jax.jit(functools.partial(sgm_forward_mgpu, block_q=192, block_kv=192, q_rows=147, q_tail_t=True,
                                      plan=plan))
        assert f.trace(q, k, k, *lst).lower(lowering_platforms=("cuda",)).as_text().count(
            "custom_call @mosaic_gpu") == 1


def test_sgm_attention_q_rows_reach_the_forward(monkeypatch):
    """return_lse=True with q_rows: a backend registered with fwd_q_rows gets them (the Mosaic GPU forward then
    packs: padding rows out 0, LSE −inf; rows in use as the reference); the reference computes every row as usual."""
    c = make_case(3, B=1, H=2, D=64, bq=192, bkv=192, Nq=3, Nk=4, K=2, dtype=BF16)
    args = (c["q"], c["k"], c["v"], c["kv_block_idx"], c["kv_block_cnt"], c["kv_block_len"])
    f32 = [a.astype(jnp.float32) if a.dtype == BF16 else a for a in args]
    kw = dict(block_q=192, block_kv=192, return_lse=True)
    ref_o, ref_l = api.sgm_attention(*f32, backend="reference", q_rows=147, **kw)
    full_o, full_l = api.sgm_attention(*f32, backend="reference", **kw)
    np.testing.assert_array_equal(np.asarray(ref_o), np.asarray(full_o))
    keep = (np.arange(3 * 192) % 192) < 147
    seen = []

    def fwd(*a, **k):
        seen.append(k.get("q_rows"))
        return mosaic_gpu_mod._api_fwd(*a, **k, interpret=True)

    monkeypatch.setattr(mosaic_gpu_mod, "Q_TAILS", True)
    name = "mosaic_gpu_interpret_fwd_tails"
    api.register_backend(name, fwd, None, tile=(64, 64), dtypes=(BF16, F16), fwd_q_rows=True)
    try:
        o, l = api.sgm_attention(*args, backend=name, q_rows=147, **kw)
        api.sgm_attention(*args, backend=name, **kw)
    finally:
        api._REGISTRY.pop(name)
    assert seen == [147, None]
    o = np.asarray(o, np.float32)
    assert rel(o[:, keep], np.asarray(ref_o)[:, keep]) <= FWD_TOL[BF16]
    assert not o[:, ~keep].any() and np.isneginf(np.asarray(l)[..., ~keep]).all()


@pytest.mark.parametrize("D, block, q_rows", [(128, 192, 147), (64, 128, 80)])
def test_forward_packed_lowers_for_sm90(D, block, q_rows):
    """The packed forward (two launches: the whole tiles, the packed tails with their row-group masks) through
    Pallas' Mosaic GPU lowering and layout inference for sm_90, on the CPU."""
    sds = jax.ShapeDtypeStruct
    B, H, Nq, Nk, K = 1, 2, 4, 5, 3
    q, k = sds((B, Nq * block, H, D), jnp.bfloat16), sds((B, Nk * block, H, D), jnp.bfloat16)
    lst = (sds((B, H, Nq, K), jnp.int32), sds((B, H, Nq), jnp.int32), sds((B, Nk), jnp.int32))
    for plan in (None, (("overlap", True),)):  # and the whole tiles with the intra-consumer overlap
        f = jax.jit(functools.partial(sgm_forward_mgpu, block_q=block, block_kv=block, q_rows=q_rows, q_tails=True,
                                      plan=plan))
        assert f.trace(q, k, k, *lst).lower(lowering_platforms=("cuda",)).as_text().count(
            "custom_call @mosaic_gpu") == 2


def test_sgm_qtails_benchmark_small(tmp_path):
    """benchmarks/sgm_qtails.py --small --interpret: the packed and tail-consumer forwards and a plan override checked
    against the padded kernel and timed (interpreter times mean nothing), the JSON written."""
    import json

    from benchmarks import sgm_qtails

    out = tmp_path / "q.json"
    record = sgm_qtails.main(["--small", "--interpret", "--shared", "2", "--plans", "width=64", "--repeats", "1",
                              "--inner", "1", "--json", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["shared"] == 2 and 4 <= row["mean_union"] <= 12 and record["rows"][0]["padded_ms"] > 0
    assert list(row["variants"]) == ["packed", "tail_t", "packed[width=64]"]
    assert [v["status"] for v in row["variants"].values()] == ["ok", "ok", "ok"]
    with pytest.raises(SystemExit):
        sgm_qtails.parse_args(["--plans", "width=x"])


def test_interpreter_flag(monkeypatch):
    """pallas_kernels.interpreter: enable() adds the scheduler flag once, keeping the flags already set; this test
    session has it (conftest); an interpreted kernel without it warns once, naming the flag."""
    from pallas_kernels import interpreter

    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert interpreter.enable(env) is env and interpreter.enable(env)["XLA_FLAGS"].split() == [
        "--xla_dump_to=/tmp/x", interpreter.FLAG]
    assert interpreter.enable({})["XLA_FLAGS"] == interpreter.FLAG and interpreter.enabled()
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(interpreter, "_warned", False)
    with pytest.warns(RuntimeWarning, match="concurrency_optimized_scheduler=false"):
        interpret_params(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        interpret_params(True)  # once only
        assert interpret_params(False) is False
