"""TPU-specific tests of the SGM kernel (pallas_kernels/sgm/tpu.py): its dk/dv work list, SMEM-sized chunking, the
TPU interpreter's race detector on two cores, and lowering to Mosaic for real TPU tiles. The parity tests it shares
with the Mosaic GPU kernel are in tests/test_sgm_kernels.py (helpers and tolerances from there)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sgm import lists as lists_mod
from pallas_kernels.sgm import tpu as tpu_mod
from pallas_kernels.sgm.lists import pair_lists
from pallas_kernels.sgm.tpu import sgm_backward_tpu, sgm_forward_tpu
from tests.test_sgm_kernels import F32, lists_of, lse_close, make_case, oracle, rel, run_kernel


def test_tpu_pair_lists_sorted_flagged_and_padded():
    """The dk/dv work list: pairs sorted by key block then query block, first/last flags per key block, padding
    repeating the last pair with no flag, and per-key-block pair counts."""
    idx = jnp.asarray([[[2, 0, 0], [0, 2, 3]], [[0, 0, 0], [0, 0, 0]]], jnp.int32)  # [BH=2, Nq=2, K=3]
    cnt = jnp.asarray([[1, 3], [0, 0]], jnp.int32)
    code, counts = (np.asarray(x) for x in pair_lists(idx, cnt, 4))
    F = lists_mod.PAIR_FLAGS
    decode = lambda c: (c // F // 2, c // F % 2, c % F)  # (kb, qb, flags) with Nq = 2
    V, FI, LA = lists_mod.PAIR_VALID, lists_mod.PAIR_FIRST, lists_mod.PAIR_LAST
    assert [decode(c) for c in code[0]] == [(0, 1, V | FI | LA), (2, 0, V | FI), (2, 1, V | LA), (3, 1, V | FI | LA),
                                            (3, 1, 0), (3, 1, 0)]
    assert counts[0].tolist() == [1, 0, 2, 1]
    assert [decode(c) for c in code[1]] == [(0, 0, 0)] * 6 and counts[1].tolist() == [0, 0, 0, 0]


def test_tpu_lists_split_into_calls_that_fit_smem(monkeypatch):
    """With a tiny SMEM budget the kernels run B·H in chunks (lax.map) and still match the oracle; a single
    (b, h) row over the budget is refused with the sizes."""
    c = make_case(35, B=2, H=2, D=64, bq=16, bkv=32, Nq=3, Nk=5, K=3, dtype=F32)
    monkeypatch.setattr(tpu_mod, "SMEM_BUDGET", 4 * 40)  # 2 of the 4 (b, h) rows per call
    run_kernel("tpu", c, seed=36)
    monkeypatch.setattr(tpu_mod, "SMEM_BUDGET", 16)
    with pytest.raises(ValueError, match="SMEM"):
        sgm_forward_tpu(c["q"], c["k"], c["v"], **lists_of(c), interpret=True)


def test_tpu_tile_rules():
    c = make_case(7)
    with pytest.raises(ValueError, match="multiple of 128"):
        jax.eval_shape(lambda: sgm_forward_tpu(**c, interpret=False))
    with pytest.raises(ValueError, match="multiples of 8"):
        sgm_forward_tpu(**{**c, "block_q": 12}, interpret=True)


def test_tpu_interpreter_two_cores_no_races():
    """The TPU-specific interpreter (pltpu.InterpretParams) simulates DMAs, SMEM/VMEM, NaN-filled uninitialised
    buffers, out-of-bounds-read errors and megacore sharding of the "parallel" grid axes; its race detector must
    find nothing and the results must still match the oracle."""
    from jax.experimental.pallas import tpu as pltpu

    ip = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, uninitialized_memory="nan")
    try:  # internal module holding the detector's result of the latest interpreted kernel (jax 0.11)
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    except ImportError:  # pragma: no cover
        ipc = None
    no_race = lambda: ipc is None or getattr(ipc, "races", None) is None or not ipc.races.races_found
    c = make_case(8)
    lst = lists_of(c)
    out, lse = sgm_forward_tpu(c["q"], c["k"], c["v"], **lst, interpret=ip)
    assert no_race()
    ref_out, ref_lse, vjp = oracle(c)
    assert rel(out, ref_out) <= 1e-5
    lse_close(lse, ref_lse, 1e-5)
    d_out = jnp.asarray(np.random.default_rng(80).normal(0.0, 1.0, out.shape), out.dtype)
    got = sgm_backward_tpu(c["q"], c["k"], c["v"], out, lse, d_out, **lst, interpret=ip)
    assert no_race()  # the dk/dv kernel (the last one interpreted)
    for name, g, w in zip(("dq", "dk", "dv"), got, vjp(d_out)):
        assert rel(g, w) <= 1e-4, (name, rel(g, w))


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-call", "chunked"])
def test_tpu_lowers_to_mosaic_for_real_tpu_tiles(device_kind, chunked, monkeypatch):
    """Without a TPU, lower (not compile) the non-interpret kernels at TPU tiles (128 × 128, D = 128, bf16) against an
    abstract TPU device: this runs Pallas' Mosaic lowering rules; Mosaic's own layout passes run only in libtpu.
    `chunked`: an SMEM budget of one (b, h) row per call, so every kernel runs under lax.map."""
    if chunked:
        monkeypatch.setattr(tpu_mod, "SMEM_BUDGET", 100)
    try:
        from jax._src.mesh import AbstractDevice, AbstractMesh
    except ImportError:  # pragma: no cover
        pytest.skip("jax internals moved")

    B, H, D, bq, bkv, Nq, Nk, K = 1, 2, 128, 128, 128, 3, 5, 3
    sds = jax.ShapeDtypeStruct
    q, k = sds((B, Nq * bq, H, D), jnp.bfloat16), sds((B, Nk * bkv, H, D), jnp.bfloat16)
    lst = (sds((B, H, Nq, K), jnp.int32), sds((B, H, Nq), jnp.int32), sds((B, Nk), jnp.int32))
    lse = sds((B, H, Nq * bq), jnp.float32)
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind=device_kind, num_cores=1,
                                                                     platform="tpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        fwd = jax.jit(functools.partial(sgm_forward_tpu, block_q=bq, block_kv=bkv))
        bwd = jax.jit(functools.partial(sgm_backward_tpu, block_q=bq, block_kv=bkv))
        texts = [fwd.trace(q, k, k, *lst).lower(lowering_platforms=("tpu",)).as_text(),
                 bwd.trace(q, k, k, q, lse, q, *lst).lower(lowering_platforms=("tpu",)).as_text()]
    assert texts[0].count("tpu_custom_call") == 1 and texts[1].count("tpu_custom_call") == 2
    assert all(("stablehlo.while" in t) == chunked for t in texts)  # lax.map over (b, h) chunks, only when chunked
