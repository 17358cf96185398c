"""Whole clips of a video CSV decoded into host memory: for small data sets that are read many times (the VAE's
training windows, its reconstruction scores, the latent statistics of an export), where decoding once beats a
streaming pipeline."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from decmem_jax import video as video_io
from decmem_jax.run_config import ConfigError


def read_clip_paths(csv_path: str | os.PathLike) -> list[str]:
    """The video paths of a `build_csv` index (column video_path, relative to the CSV's folder)."""
    from decmem_jax.data.pipeline import CsvSource

    if not csv_path or not os.path.isfile(csv_path):
        raise ConfigError(f"data.csv {csv_path!r}: file not found (run decmem_jax.data.build_csv first)")
    try:
        source = CsvSource(csv_path)
    except ValueError as e:
        raise ConfigError(f"data.csv: {e}") from None
    if not len(source):
        raise ConfigError(f"data.csv {csv_path}: no clips")
    return [source[i][1]["video_path"] for i in range(len(source))]


def load_clips(paths: list[str], size: tuple[int, int], *, limit: int | None = None, progress: bool = True,
               threads: int = 8) -> list[np.ndarray]:
    """Every clip decoded to uint8 [T, H, W, 3] (resized/cropped to `size`), in order."""
    paths = paths[:limit] if limit else paths
    with ThreadPoolExecutor(threads) as pool:
        it = pool.map(lambda p: video_io.read_video(p, size=size), paths)
        return list(tqdm(it, total=len(paths), desc="loading clips", unit="clip", disable=not progress))
