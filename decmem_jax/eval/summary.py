"""Scores and their 95% intervals over clips for the memory benchmark.

- Frame metrics per clip (`clip_scores`): PSNR, SSIM, LPIPS of every generated frame against the clip's true frame
  (`decmem_jax.eval.metrics`), averaged over the clip's generated frames, and over its revisit frames only (NaN
  when the clip has none). A frame identical to the truth has an infinite PSNR (copy_last does this while the camera
  stands still): per-frame PSNR is capped at `PSNR_CAP` dB so that one such frame cannot make a mean infinite.
- Interval of a mean (`mean_ci`): Student's t over the clips' means, mean +- t(0.975, n-1) s / sqrt(n); clips
  without a value (NaN) are left out; one clip gives no interval.
- FVD (`fvd_ci`): the generated frames of every clip are cut into `FVD_FRAMES`-frame segments (a tail shorter than
  that is dropped), so are the true frames at the same places; FVD is the Fréchet distance of the I3D features of
  all segments (`decmem_jax.eval.fvd`). Its interval is a leave-one-clip-out **jackknife**: the FVD of the set
  without clip i, for every i, gives the standard error sqrt((n-1)/n * sum_i (FVD_-i - mean)^2), and the interval is
  FVD +- 1.96 se, floored at 0. Not a bootstrap: a resample drawn with replacement repeats clips, and a Fréchet
  distance estimated from fewer distinct samples is larger, so the percentile interval lay above the value (measured:
  copy_last 765.0 with [777.8, 950.1]); and its 1,000 draws x 5 variants of 400-dimensional matrix square roots
  ran past a job's time limit on an H200 host. The jackknife needs n distances per variant and repeats no clip.
"""

from __future__ import annotations

import math

import numpy as np

PSNR_CAP = 60.0  # dB
FVD_FRAMES = 16  # frames per FVD segment (the usual FVD clip length)
METRICS = ("psnr", "ssim", "lpips")


def _value(x) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def mean_ci(values, confidence: float = 0.95) -> list:
    """[mean, lo, hi] of the finite values (None where undefined)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if len(v) == 0:
        return [None, None, None]
    mean = float(v.mean())
    if len(v) == 1:
        return [_value(mean), None, None]
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return [_value(mean), _value(mean - half), _value(mean + half)]


def frame_scores(generated: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame PSNR (capped), SSIM and LPIPS of uint8 frames [T, H, W, 3] against the truth."""
    from decmem_jax.eval import metrics

    if generated.shape != truth.shape:
        raise ValueError(f"generated {generated.shape} and true {truth.shape} frames differ in shape")
    return {"psnr": np.minimum(metrics.psnr(generated, truth).per_frame[0], PSNR_CAP),
            "ssim": np.asarray(metrics.ssim(generated, truth).per_frame[0], np.float64),
            "lpips": np.asarray(metrics.lpips(generated, truth).per_frame[0], np.float64)}


def clip_scores(per_frame: dict[str, np.ndarray], revisit_rows: np.ndarray) -> dict[str, float]:
    """Means over all generated frames and over the revisit rows (indices into the generated frames)."""
    out = {}
    for name in METRICS:
        v = per_frame[name]
        out[name] = float(v.mean())
        out[f"revisit_{name}"] = float(v[revisit_rows].mean()) if len(revisit_rows) else float("nan")
    return out


def segments(frames: np.ndarray, length: int = FVD_FRAMES) -> np.ndarray:
    """[S, length, H, W, 3]: consecutive non-overlapping segments of frames [T, H, W, 3], the tail dropped."""
    s = len(frames) // length
    return frames[:s * length].reshape(s, length, *frames.shape[1:])


def fvd_ci(generated: list[np.ndarray], truth: list[np.ndarray]) -> list:
    """[FVD of all segments, lo, hi] from per-clip I3D features [S_i, 400], the interval a leave-one-clip-out
    jackknife (module docstring); None where fewer than 2 segments make a set, no interval for one clip."""
    from decmem_jax.eval.fvd import frechet_distance

    if len(generated) != len(truth) or any(len(g) != len(t) for g, t in zip(generated, truth)):
        raise ValueError("fvd_ci needs the same clips and segments on both sides")
    if sum(len(g) for g in generated) < 2:
        return [None, None, None]
    value = frechet_distance(np.concatenate(generated), np.concatenate(truth))
    n = len(generated)
    if n < 2:
        return [_value(value), None, None]
    held_out = []
    for i in range(n):
        g = np.concatenate([x for k, x in enumerate(generated) if k != i])
        if len(g) < 2:  # the other clips hold fewer than 2 segments: no distance without clip i
            return [_value(value), None, None]
        held_out.append(frechet_distance(g, np.concatenate([x for k, x in enumerate(truth) if k != i])))
    held_out = np.asarray(held_out)
    se = math.sqrt((n - 1) / n * float(np.sum((held_out - held_out.mean()) ** 2)))
    return [_value(value), _value(max(value - 1.96 * se, 0.0)), _value(value + 1.96 * se)]
