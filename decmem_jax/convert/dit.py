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
                                         WEIGHT_DTYPES, ConvertError, check_checkpoint_dir, check_destination,
                                         flatten, nest, restore_params, weight_dtype, write_checkpoint)
from decmem_jax.convert.sources import SourceError, open_source
from decmem_jax.models.config import DiTConfig, get_config
from decmem_jax.models.dit import WanDiT

# ----- conversion -----

def _resolve_config(config: str | DiTConfig) -> DiTConfig:
    if isinstance(config, DiTConfig):
        return config
    try:
        return get_config(config)
    except ValueError as e:
        raise ConvertError(str(e)) from None


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
    from tqdm.auto import tqdm

    np_dtype, dtype_name = weight_dtype(dtype)
    if layout != "auto" and layout not in keymap.TABLES:
        raise ConvertError(f"unknown layout {layout!r}; expected 'auto' or one of {sorted(keymap.TABLES)}")
    cfg = _resolve_config(config).replace(param_dtype=dtype_name)
    dst = Path(dst).expanduser().absolute()
    check_destination(dst, overwrite)

    source = open_source(src, subkey=subkey)
    if layout == "auto":
        try:
            layout = keymap.detect_layout(source.keys())
        except ValueError as e:
            raise ConvertError(f"{source.path}: {e}") from None
    items = tqdm(source, total=len(source), desc=f"converting {source.path.name}", unit="tensor",
                 disable=not progress)
    flat = keymap.assemble(items, cfg, layout, dtype=np_dtype, source=source.describe())
    num_params = int(sum(a.size for a in flat.values()))

    record = dict(source=str(source.path), source_format=source.kind, layout=layout, subkey=source.subkey,
                  num_tensors=len(source), num_params=num_params, param_dtype=dtype_name)
    return write_checkpoint(dst, flat, model="dit", config_json=cfg.to_json(), record=record)


# ----- loading -----

def read_config(path: str | os.PathLike) -> DiTConfig:
    """The DiTConfig stored in a converted checkpoint directory."""
    path = check_checkpoint_dir(path, "dit")
    try:
        return DiTConfig.from_json((path / CONFIG_FILE).read_text())
    except (ValueError, TypeError) as e:
        raise ConvertError(f"{path / CONFIG_FILE}: invalid DiT config ({e})") from None


def load_dit(path: str | os.PathLike, *, dtype: str | None = None, attention: str | None = None,
             remat: str | None = None) -> WanDiT:
    """Builds a WanDiT from a converted checkpoint directory, with optional runtime overrides of the compute dtype,
    attention backend and remat policy (weights stay in their stored dtype)."""
    path = Path(path).expanduser().absolute()
    overrides = {k: v for k, v in dict(dtype=dtype, attention=attention, remat=remat).items() if v is not None}
    cfg = read_config(path).replace(**overrides)
    return restore_params(path, nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))


__all__ = ["ConvertError", "SourceError", "convert_dit", "load_dit", "read_config", "nest", "flatten"]
