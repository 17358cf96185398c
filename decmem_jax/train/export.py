"""Export a training run as a converted checkpoint (the format `load_dit` / `load_vae` read, see
`decmem_jax.convert.orbax_io`): the latest step's parameters in the storage dtype, the model config with runtime
fields reset, and provenance in conversion.json (run, step, date and the parameters' SHA-256, which the loaders
check).

    python -m decmem_jax.train.export --workdir runs/world_tiny/decmem --out weights/world_tiny/decmem
    python -m decmem_jax.train.export --workdir runs/world_tiny/vae --out weights/world_tiny/vae \\
        --stats-csv runs/world_tiny/data/train.csv      # a VAE: measure its latent statistics first

The model kind (DiT or VAE) is read from the run's stored config. A VAE export needs `--stats-csv`: the per-channel
mean and standard deviation of its raw latents over those clips become `latents_mean` / `latents_std` of the
exported config, so `encode` gives the normalised latents the DiT trains on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from decmem_jax.convert.orbax_io import (ConvertError, check_destination, flatten, params_sha256, weight_dtype,
                                         write_checkpoint)
from decmem_jax.errors import DecMemError
from decmem_jax.weights import CheckpointError, resolve_params_dir, stored_model_config

STATS_CLIPS = 64  # training clips whose latents give a VAE's statistics
STATS_FRAMES = 33  # first frames of each (1 + 4k)


def _model_kind(config_json: str) -> str:
    return "vae" if "base_dim" in json.loads(config_json) else "dit"


def export(workdir, out, *, dtype: str = "bf16", stats_csv: str | None = None, overwrite: bool = False,
           progress: bool = True) -> Path:
    """Writes the latest step of the run at `workdir` as a converted checkpoint at `out`; returns `out`."""
    import jax
    from flax import nnx

    from decmem_jax.convert.orbax_io import restore_params
    from decmem_jax.models.config import DiTConfig
    from decmem_jax.models.vae import VAEConfig, WanVAE

    np_dtype, dtype_name = weight_dtype(dtype)
    out = Path(out).expanduser().absolute()
    check_destination(out, overwrite)
    step_dir = resolve_params_dir(workdir)
    text = stored_model_config(step_dir)
    if not text or text.strip() in ("", "{}"):
        raise CheckpointError(f"{step_dir}: no model config recorded; cannot tell what model it holds")
    kind = _model_kind(text)
    if kind == "vae":
        from decmem_jax.data.clips import load_clips, read_clip_paths
        from decmem_jax.train import vae as vae_train

        if not stats_csv:
            raise ConvertError("a VAE export needs --stats-csv (training clips for its latent statistics)")
        cfg = VAEConfig.from_json(text).replace(dtype="float32", param_dtype="float32")
        model = restore_params(step_dir, nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
        clips = load_clips(read_clip_paths(stats_csv), None, limit=STATS_CLIPS, progress=progress)
        mean, std = vae_train.latent_stats(model, clips, STATS_FRAMES)
        cfg = cfg.replace(latents_mean=mean, latents_std=std)
    else:
        from decmem_jax.models.dit import WanDiT

        cfg = DiTConfig.from_json(text).replace(dtype="auto", attention="auto", remat="none",
                                                linear_layout="auto")
        model = restore_params(step_dir, nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = {k: np.asarray(jax.device_get(v)).astype(np_dtype) for k, v in flatten(params).items()}
    meta = json.loads((step_dir / "meta" / "metadata").read_text()) if (step_dir / "meta").is_dir() else {}
    record = dict(source=str(step_dir), source_format="decmem_jax.train run", layout="native",
                  step=meta.get("step"), stage=meta.get("stage"), exported_at=time.strftime("%Y-%m-%d %H:%M:%S"),
                  num_params=int(sum(a.size for a in flat.values())), param_dtype=dtype_name,
                  params_sha256=params_sha256(flat))
    cfg = cfg.replace(param_dtype=dtype_name)
    if getattr(cfg, "conditioning", None) is not None:  # its weights are stored in the same dtype
        cfg = cfg.replace(conditioning=dataclasses.replace(cfg.conditioning, param_dtype=dtype_name))
    return write_checkpoint(out, flat, model=kind, config_json=cfg.to_json(), record=record)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m decmem_jax.train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training run directory (its latest complete step), or a step")
    p.add_argument("--out", required=True, help="converted checkpoint directory to write")
    p.add_argument("--dtype", default="bf16", help="storage dtype: bf16 (default) or f32")
    p.add_argument("--stats-csv", default=None, help="VAE only: build_csv index of training clips for the latent "
                                                      "statistics")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    try:
        out = export(args.workdir, args.out, dtype=args.dtype, stats_csv=args.stats_csv, overwrite=args.overwrite)
    except (DecMemError, ValueError) as e:  # ValueError: a config JSON the dataclasses reject
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
