"""Wan2.1 DiT checkpoints: convert PyTorch weights to an Orbax checkpoint once, then `load_dit` it in one call.

A converted checkpoint is a directory (layout and helpers shared with the VAE in `orbax_io.py`):

    config.json       DiTConfig.to_json(), param_dtype = the stored weight dtype
    conversion.json   model "dit" and where it came from: source path and format, layout, subkey, tensor and
                      parameter counts
    params/           Orbax (StandardCheckpointer) checkpoint of the nested parameter dict of WanDiT

Conversion streams the source tensor by tensor into preallocated arrays (`keymap.assemble`), writes everything into a
hidden temporary directory next to `dst` and renames it into place only when complete: a failed conversion leaves
no output behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from decmem_jax.convert import keymap
from decmem_jax.convert.orbax_io import (CONFIG_FILE, CONVERSION_FILE, FORMAT_VERSION, PARAMS_DIR,  # noqa: F401
                                         WEIGHT_DTYPES, ConvertError, check_destination, convert_source, flatten,
                                         nest, read_model_config, resolve_config, restore_params, weight_dtype)
from decmem_jax.convert.sources import SourceError, open_source
from decmem_jax.models.config import DiTConfig, get_config
from decmem_jax.models.dit import WanDiT

# ----- conversion -----

def convert_dit(src: str | os.PathLike, dst: str | os.PathLike, *, layout: str = "auto", dtype: str = "f32",
                config: str | DiTConfig = "wan2.1-t2v-1.3b", subkey: str = "auto", overwrite: bool = False,
                progress: bool = True) -> Path:
    """Converts a PyTorch Wan2.1 DiT checkpoint (see `sources.open_source` for the accepted inputs) into a
    converted-checkpoint directory at `dst` and returns its path.

    layout: "auto" (from the key names), "original" (Wan / CausVid / Self-Forcing) or "diffusers".
    dtype: storage dtype of the converted weights, "f32" or "bf16".
    config: preset name or DiTConfig; its architecture must match the checkpoint (every mismatch is reported at once
    as keymap.CheckpointMismatch).
    subkey: which nested state dict of a training checkpoint to use ("auto": generator_ema > generator > model >
    state_dict > the file itself).
    """
    weight_dtype(dtype)  # validates before anything is read
    if layout != "auto" and layout not in keymap.TABLES:
        raise ConvertError(f"unknown layout {layout!r}; expected 'auto' or one of {sorted(keymap.TABLES)}")
    cfg = resolve_config(config, DiTConfig, get_config)
    dst = Path(dst).expanduser().absolute()
    check_destination(dst, overwrite)
    source = open_source(src, subkey=subkey)
    return convert_source(
        source, dst, model="dit", cfg=cfg, layout=layout, detect=keymap.detect_layout, dtype=dtype,
        assemble=lambda items, lay, np_dtype, desc: keymap.assemble(items, cfg, lay, dtype=np_dtype, source=desc),
        progress=progress)


# ----- loading -----

def read_config(path: str | os.PathLike) -> DiTConfig:
    """The DiTConfig stored in a converted checkpoint directory."""
    return read_model_config(path, "dit", DiTConfig)


def load_dit(path: str | os.PathLike, *, dtype: str | None = None, attention: str | None = None,
             remat: str | None = None) -> WanDiT:
    """Builds a WanDiT from a converted checkpoint directory, with optional runtime overrides of the compute dtype,
    attention backend and remat policy (weights stay in their stored dtype)."""
    path = Path(path).expanduser().absolute()
    overrides = {k: v for k, v in dict(dtype=dtype, attention=attention, remat=remat).items() if v is not None}
    cfg = read_config(path).replace(**overrides)
    return restore_params(path, nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))


__all__ = ["ConvertError", "SourceError", "convert_dit", "load_dit", "read_config", "nest", "flatten"]
