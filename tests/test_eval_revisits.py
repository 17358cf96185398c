"""The memory benchmark's bookkeeping on hand-made cases: the frame/latent/window timeline, the revisit rule, the
retrieval precision and heatmap, and the intervals over clips."""

import numpy as np
import pytest

from decmem_jax.eval import fvd, retrieval, summary
from decmem_jax.eval.revisits import RevisitRule, Timeline, find_revisits

TL = Timeline(context_frames=33, chunk=4, window=8)  # the shipped model's rollout: 9 context latents


def test_timeline_maps_frames_to_latents_chunks_and_windows():
    assert TL.context_latents == 9
    assert TL.latent(np.arange(10)).tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert TL.latent(33) == 9 and TL.latent(48) == 12 and TL.latent(49) == 13  # chunk 0 = frames 33..48
    assert TL.chunk_of([9, 12, 13, 16]).tolist() == [0, 0, 1, 1]
    assert TL.window_start([9, 12, 13]).tolist() == [5, 5, 9]  # chunk 0 (latents 9-12): window 5..12
    assert TL.num_chunks(32) == 2 and TL.num_chunks(33) == 3 and TL.num_chunks(600) == 38
    with pytest.raises(ValueError, match="context"):
        TL.chunk_of(8)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        Timeline(32, 4, 8)


def _poses(frames=65):
    """Every frame 10 blocks from every other (no view shared), pitch 0, yaw 0."""
    p = np.zeros((frames, 5))
    p[:, 0] = 10.0 * np.arange(frames)
    p[:, 1] = 20.0
    return p


def test_revisit_rule_on_hand_made_poses():
    p = _poses()
    p[50] = p[3]  # latent 13 (chunk 1, window from latent 9) sees frame 3 (latent 1): a revisit, source 3
    p[46] = p[16] + [0.9, 0, 0, 0, 14.0]  # latent 12 (chunk 0, window from 5) near frame 16 (latent 4): revisit
    p[47] = p[16] + [1.1, 0, 0, 0, 0]  # 1.1 blocks away: no
    p[45] = p[16] + [0, 0, 0, 16.0, 0]  # 16 degrees of pitch: no
    p[44] = p[20]  # frame 20 is latent 5, inside chunk 0's window: no
    p[2, 4], p[56, 4] = 179.0, -179.0  # 2 degrees apart across the wrap
    p[56, :4] = p[2, :4]  # latent 14 sees frame 2: a revisit
    p[60] = p[30]  # latent 15 sees frame 30 (latent 8 < 9: outside) ...
    p[40] = p[30]  # ... but frame 40 (latent 10, committed part of chunk 1's window) holds it too
    p[64] = p[61]  # same chunk, not committed yet: neither a source nor an exclusion
    got = find_revisits(p, TL, 32)
    assert got.frames.tolist() == [46, 50, 56]
    assert [s.tolist() for s in got.sources] == [[16], [3], [2]]
    assert {q: v.tolist() for q, v in got.query_targets(TL).items()} == {12: [4], 13: [1], 14: [1]}
    loose = find_revisits(p, TL, 32, RevisitRule(exclude_window=False))
    assert loose.frames.tolist() == [46, 50, 56, 60] and loose.sources[3].tolist() == [30]
    wide = find_revisits(p, TL, 32, RevisitRule(pos_tol=1.2, pitch_tol=20.0))
    assert wide.frames.tolist() == [45, 46, 47, 50, 56]


def test_generated_frames_are_sources_only_when_asked():
    p = _poses(97)
    p[90] = p[36]  # frame 36 was generated (latent 9, chunk 0); frame 90 (latent 23, window from 17) sees it again
    p[94] = p[7]  # frame 7 is context: a source under either rule
    assert find_revisits(p, TL, 64).frames.tolist() == [94]  # default: sources="context"
    got = find_revisits(p, TL, 64, RevisitRule(sources="any"))
    assert got.frames.tolist() == [90, 94] and got.sources[0].tolist() == [36]
    with pytest.raises(ValueError, match="sources"):
        RevisitRule(sources="all")


def test_standing_still_is_no_revisit_and_bad_poses_fail():
    still = np.zeros((65, 5))
    assert len(find_revisits(still, TL, 32)) == 0  # the window always holds the same view
    assert len(find_revisits(still, TL, 32, RevisitRule(exclude_window=False))) == 32
    with pytest.raises(ValueError, match="65 are needed"):
        find_revisits(still[:60], TL, 32)
    bad = still.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        find_revisits(bad, TL, 32)


def _selections(k=3, layers=2, heads=2, m=1, chunks=2, fill=99):
    ids = np.full((chunks, layers, heads, TL.chunk * m, k), fill, np.int64)
    counts = np.full((chunks, layers, heads, TL.chunk * m), k, np.int64)
    return ids, counts


def test_precision_counts_hits_among_the_real_picks_per_layer():
    ids, counts = _selections()
    # query latent 14 = chunk 1, row 1; relevant history latents {2, 3}
    ids[1, 0, 0, 1] = [2, 5, 3]  # 2 of 3, best is relevant
    ids[1, 0, 1, 1] = [7, 2, 0]  # 1 of 3, best is not
    ids[1, 1, 0, 1], counts[1, 1, 0, 1] = [3, 2, 2], 2  # 2 of 2 (the third entry is padding)
    ids[1, 1, 1, 1], counts[1, 1, 1, 1] = [0, 1, 3], 2  # 0 of 2: the relevant 3 is padding, not counted
    got = retrieval.precision(ids, counts, {14: np.array([2, 3])}, TL, 1)
    np.testing.assert_allclose(got.topk, [(2 / 3 + 1 / 3) / 2, (1 + 0) / 2])
    np.testing.assert_allclose(got.top1, [0.5, 0.5])
    assert got.queries == 1
    assert got.chance == pytest.approx(2 / 9)  # 2 relevant of latents 0..8
    assert got.ceiling == pytest.approx((2 / 3 + 2 / 3 + 1 + 1) / 4)  # min(K, |R|) / K per pick list


def test_precision_with_several_blocks_per_frame_and_failures():
    m = 2
    ids, counts = _selections(k=2, layers=1, heads=1, m=m)
    # query latent 9 = chunk 0, rows 0 and 1 (its two blocks); relevant latent 3 = blocks 6, 7
    ids[0, 0, 0, 0] = [7, 1]  # latent 3 then latent 0
    ids[0, 0, 0, 1] = [2, 9]  # latents 1 and 4
    got = retrieval.precision(ids, counts, {9: np.array([3])}, TL, m)
    assert got.topk.tolist() == [0.25] and got.top1.tolist() == [0.5]
    assert got.chance == pytest.approx(1 / 5)  # window of chunk 0 starts at latent 5
    empty = retrieval.precision(ids, counts, {}, TL, m)
    assert empty.queries == 0 and np.isnan(empty.topk).all()
    counts[0, 0, 0, 0] = 0
    with pytest.raises(ValueError, match="retrieved nothing"):
        retrieval.precision(ids, counts, {9: np.array([3])}, TL, m)
    with pytest.raises(ValueError, match="query blocks per chunk"):
        retrieval.precision(ids, counts, {9: np.array([3])}, TL, 1)
    with pytest.raises(ValueError, match="selections cover 2 chunks"):
        retrieval.precision(*_selections(), {17: np.array([3])}, TL, 1)


def test_heatmap_shares_sum_to_one_per_chunk():
    ids, counts = _selections(k=2, layers=1, heads=1)
    ids[0, 0, 0] = [[0, 1], [0, 1], [0, 2], [0, 0]]
    counts[0, 0, 0] = [2, 2, 2, 1]
    counts[1] = 0
    h = retrieval.heatmap(ids, counts, TL, 1, 17)
    np.testing.assert_allclose(h[0, :3], [4 / 7, 2 / 7, 1 / 7])
    assert h[0].sum() == pytest.approx(1) and h[1].sum() == 0


def test_mean_ci_is_students_t_over_clips():
    mean, lo, hi = summary.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert lo == pytest.approx(2 * mean - hi)
    assert summary.mean_ci([np.nan, 5.0]) == [5.0, None, None]
    assert summary.mean_ci([]) == [None, None, None]


def test_fvd_interval_is_a_jackknife_over_clips():
    rng = np.random.default_rng(0)
    truth = [rng.standard_normal((3, 8)) for _ in range(6)]
    same = summary.fvd_ci(truth, truth)
    assert same[0] == pytest.approx(0, abs=1e-9) and same[2] == pytest.approx(0, abs=1e-9)
    gen = [t + 2.0 + 0.5 * rng.standard_normal(t.shape) for t in truth]  # mean shift 2 in 8 dims: FVD ~ 32
    value, lo, hi = summary.fvd_ci(gen, truth)
    assert lo < value < hi and 25 < value < 45
    # the interval by hand: value +- 1.96 * the jackknife standard error of the leave-one-clip-out distances
    held = np.array([fvd.frechet_distance(np.concatenate(gen[:i] + gen[i + 1:]),
                                          np.concatenate(truth[:i] + truth[i + 1:])) for i in range(6)])
    se = np.sqrt(5 / 6 * np.sum((held - held.mean()) ** 2))
    assert hi - value == pytest.approx(1.96 * se, rel=1e-5) and value - lo == pytest.approx(1.96 * se, rel=1e-5)
    assert summary.fvd_ci([truth[0][:1]], [truth[0][:1]]) == [None, None, None]
    assert summary.fvd_ci([truth[0]], [truth[0]])[1:] == [None, None]  # one clip: no interval
    assert summary.segments(np.zeros((40, 2, 2, 3))).shape == (2, 16, 2, 2, 3)
