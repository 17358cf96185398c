"""The FlexAttention peer of benchmarks/sgm_kernel.py (benchmarks/sgm_peers.py) computes SGM attention: its BlockMask,
built from the SGM lists at 64-token granularity, against the SGM reference on CPU (eager and compiled), with an
empty list, partial, full and fully padded key blocks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")

import jax.numpy as jnp  # noqa: E402

from benchmarks.sgm_peers import flex_block_mask, rel  # noqa: E402
from pallas_kernels.sgm.reference import sgm_reference  # noqa: E402

B, H, D, BQ, BKV, NQ, NK, K = 1, 2, 64, 192, 192, 2, 5, 3


@pytest.fixture(scope="module")
def case():
    r = np.random.default_rng(0)
    q = r.normal(0, 2, (B, NQ * BQ, H, D)).astype(np.float32)
    k = r.normal(0, 2, (B, NK * BKV, H, D)).astype(np.float32)
    v = r.normal(0, 1, (B, NK * BKV, H, D)).astype(np.float32)
    idx = np.sort(np.stack([r.choice(NK, K, replace=False) for _ in range(B * H * NQ)]), -1)
    idx = idx.reshape(B, H, NQ, K).astype(np.int32)
    idx[0, 0, 0] = [0, 2, 3]  # a full block (192 valid) and a short one (60) in one list
    cnt = np.array([[[3, 2], [1, 0]]], np.int32)  # head 1's second query block lists nothing
    lens = np.array([[147, 145, 192, 60, 147]], np.int32)
    ref, _ = sgm_reference(*(jnp.asarray(x) for x in (q, k, v, idx, cnt, lens)), block_q=BQ, block_kv=BKV)
    return q, k, v, idx, cnt, lens, np.asarray(ref)


def _run(case, exact, compiled):
    q, k, v, idx, cnt, lens, _ = case
    bm = flex_block_mask(idx, cnt, lens, block_q=BQ, block_kv=BKV, tq=NQ * BQ, tk=NK * BKV, device="cpu",
                         exact=exact)
    attn = torch.compile(flex_mod.flex_attention) if compiled else flex_mod.flex_attention
    bhtd = lambda x: torch.from_numpy(x).permute(0, 2, 1, 3).contiguous()
    out = attn(bhtd(q), bhtd(k), bhtd(v), block_mask=bm, scale=D ** -0.5)
    return bm, out.permute(0, 2, 1, 3).numpy()


def test_block_lists_cover_exactly_the_sub_blocks_with_valid_selected_keys(case):
    _, _, _, idx, cnt, lens, _ = case
    bm, _ = _run(case, exact=True, compiled=False)
    want = np.zeros((B, H, NQ * 3, NK * 3), bool)
    for h in range(H):
        for qb in range(NQ):
            for j in idx[0, h, qb, :cnt[0, h, qb]]:
                for s in range(3):
                    want[0, h, 3 * qb: 3 * qb + 3, 3 * j + s] = lens[0, j] > 64 * s
    assert np.array_equal(bm.to_dense().numpy().astype(bool), want)


def test_eager_with_the_exact_mask_matches_the_reference(case):
    _, out = _run(case, exact=True, compiled=False)
    assert rel(out, case[-1]) <= 1e-5
    assert not out[0, BQ:, 1].any()  # the empty list: zeros


def test_compiled_with_the_length_mask_matches_the_reference(case):
    """What the benchmark times: the compiled kernel visits the listed sub-blocks only, masking by length."""
    _, out = _run(case, exact=False, compiled=True)
    assert rel(out, case[-1]) <= 1e-5


def test_cube_lists_for_vsa_and_cudnn_bsa(case):
    """The 64-token form of the lists that vsa and cuDNN's block-sparse attention take: each 64-row q tile lists its
    query block's sub-blocks that hold valid keys (a 60-valid block: one; 147: three), in order, with their sizes."""
    from benchmarks.sgm_peers import cube_lists

    _, _, _, idx, cnt, lens, _ = case
    c = dict(idx=jnp.asarray(idx), cnt=jnp.asarray(cnt), lens=jnp.asarray(lens), bq=BQ, bkv=BKV)
    ids, num, sizes = (np.asarray(x) for x in cube_lists(c))
    assert sizes.tolist() == [64, 64, 19, 64, 64, 17, 64, 64, 64, 60, 0, 0, 64, 64, 19]
    for h in range(H):
        for tile in range(NQ * 3):
            qb = tile // 3
            want = [3 * j + s for j in idx[0, h, qb, :cnt[0, h, qb]] for s in range(3) if lens[0, j] > 64 * s]
            assert ids[0, h, tile, :num[0, h, tile]].tolist() == want
