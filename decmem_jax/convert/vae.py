"""Wan2.1 VAE checkpoints: convert PyTorch weights to an Orbax checkpoint once, then `load_vae` it in one call.

Accepted sources (read tensor by tensor through `sources.open_source`):
- the original `Wan2.1_VAE.pth` (a plain state dict of Wan's `WanVAE_`, keys like `encoder.downsamples.0.residual.2.
  weight`), or a directory holding it (e.g. a Wan-AI/Wan2.1-T2V-1.3B download);
- diffusers `AutoencoderKLWan` weights: `vae/diffusion_pytorch_model.safetensors`, the `vae/` directory, or the
  repository root holding `vae/` (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers); any other single safetensors file works too.

The output directory has the same layout as a converted DiT (`orbax_io.py`): `config.json` (VAEConfig),
`conversion.json` (model "vae", source, layout, counts) and `params/`; it is written to a temporary directory and
renamed into place only when complete.
"""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from decmem_jax.convert import vae_keymap
from decmem_jax.convert.orbax_io import (ConvertError, check_destination, convert_source, read_model_config,
                                         resolve_config, restore_params, weight_dtype)
from decmem_jax.convert.sources import SourceError, open_source
from decmem_jax.models.vae import VAEConfig, WanVAE, get_vae_config

ORIGINAL_FILE = "Wan2.1_VAE.pth"  # the VAE's name in the original Wan2.1 repositories
DIFFUSERS_SUBFOLDER = "vae"


def _source_path(src: str | os.PathLike) -> Path:
    """A directory holding the original Wan2.1_VAE.pth (an original Wan repository also holds the DiT's
    diffusion_pytorch_model.safetensors at its root) means that file; anything else goes to `open_source`."""
    path = Path(src).expanduser()
    return path / ORIGINAL_FILE if path.is_dir() and (path / ORIGINAL_FILE).is_file() else path


def convert_vae(src: str | os.PathLike, dst: str | os.PathLike, *, layout: str = "auto", dtype: str = "f32",
                config: str | VAEConfig = "wan2.1-vae", overwrite: bool = False, progress: bool = True) -> Path:
    """Converts a PyTorch Wan2.1 VAE checkpoint (see the module docstring) into a converted-checkpoint directory at
    `dst` and returns its path.

    layout: "auto" (from the key names), "original" (Wan2.1_VAE.pth) or "diffusers" (AutoencoderKLWan).
    dtype: storage dtype of the converted weights, "f32" or "bf16".
    config: preset name ("wan2.1-vae", "tiny") or VAEConfig; its architecture must match the checkpoint (every missing,
    unexpected or mis-shaped key is reported at once as keymap.CheckpointMismatch).
    """
    weight_dtype(dtype)  # validates before anything is read
    if layout != "auto" and layout not in vae_keymap.LAYOUTS:
        raise ConvertError(f"unknown layout {layout!r}; expected 'auto' or one of {sorted(vae_keymap.LAYOUTS)}")
    cfg = resolve_config(config, VAEConfig, get_vae_config)
    dst = Path(dst).expanduser().absolute()
    check_destination(dst, overwrite)
    source = open_source(_source_path(src), subfolder=DIFFUSERS_SUBFOLDER)
    return convert_source(
        source, dst, model="vae", cfg=cfg, layout=layout, dtype=dtype,
        detect=lambda keys: vae_keymap.detect_vae_layout(keys, cfg),
        assemble=lambda items, lay, np_dtype, desc: vae_keymap.assemble_vae(items, cfg, lay, dtype=np_dtype,
                                                                             source=desc),
        progress=progress)


def read_vae_config(path: str | os.PathLike) -> VAEConfig:
    """The VAEConfig stored in a converted VAE checkpoint directory."""
    return read_model_config(path, "vae", VAEConfig)


def load_vae(path: str | os.PathLike, *, dtype: str | None = None) -> WanVAE:
    """Builds a WanVAE from a converted checkpoint directory; `dtype` overrides the compute dtype (weights stay in
    their stored dtype)."""
    path = Path(path).expanduser().absolute()
    cfg = read_vae_config(path)
    if dtype is not None:
        try:
            cfg = cfg.replace(dtype=dtype)
        except ValueError as e:
            raise ConvertError(str(e)) from None
    return restore_params(path, nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))


__all__ = ["ConvertError", "SourceError", "convert_vae", "load_vae", "read_vae_config"]
