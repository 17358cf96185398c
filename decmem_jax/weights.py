"""Trained DiT parameters on disk, read back for inference: where a path's parameters are and `load_model`.

Two layouts hold parameters. A training workdir (`decmem_jax.train.checkpoint` writes it) has `checkpoints/<step>/`
with the items ITEMS, of which `params/` (the parameter dict) and `model_config/` (the DiTConfig JSON) matter here, and
`model_config.json` at its root; a step is complete once Orbax wrote `_CHECKPOINT_METADATA` and every item. A
converted checkpoint (`python -m decmem_jax.convert`, `decmem_jax.train.export`) has `params/`, `config.json` and
`conversion.json`. The rollout, the evaluation and the play server load models through this module, so inference
never imports the training code; training reuses the same layout constants to write it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from decmem_jax.errors import DecMemError
from decmem_jax.models.config import DiTConfig

CKPT_DIR = "checkpoints"
ITEMS = ("params", "opt_state", "meta", "data", "model_config")
MODEL_CONFIG_FILE = "model_config.json"  # also written at the workdir root


class CheckpointError(DecMemError, ValueError):
    """A checkpoint path that holds nothing usable, or one that does not fit the model."""


def step_is_complete(step_dir: Path) -> bool:
    """Whether a training step directory was fully written (Orbax's marker and every item)."""
    return (step_dir / "_CHECKPOINT_METADATA").is_file() and all((step_dir / i).is_dir() for i in ITEMS)


def complete_steps(directory: Path) -> list[int]:
    """Steps under `directory` (a checkpoints/ folder) that were fully written, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and step_is_complete(p))


def resolve_params_dir(path: str | os.PathLike) -> Path:
    """The directory holding a `params/` item: a converted checkpoint or a step dir as given; for a run's workdir or
    its checkpoints/ folder, the latest complete step."""
    path = Path(path).expanduser().absolute()
    if (path / "params").is_dir():
        return path
    for candidate in (path / CKPT_DIR, path):
        steps = complete_steps(candidate)
        if steps:
            return candidate / str(steps[-1])
    raise CheckpointError(f"{path}: holds no parameters (expected a converted checkpoint with params/, a training "
                          f"step directory, or a training workdir with complete steps under {CKPT_DIR}/)")


def stored_model_config(step_or_converted: Path) -> str | None:
    """The DiTConfig JSON next to a params/ item (training step or converted checkpoint), if recorded."""
    for f in (step_or_converted / "model_config" / "metadata", step_or_converted / "config.json"):
        if f.is_file():
            return f.read_text()
    return None



def load_model(path: str | os.PathLike, **overrides):
    """A WanDiT with trained parameters from a run's workdir (latest step), its checkpoints/ folder or a step
    directory. `overrides` change runtime fields of the stored DiTConfig (dtype, attention, remat, ...)."""
    from flax import nnx

    from decmem_jax.convert.orbax_io import restore_params
    from decmem_jax.models.dit import WanDiT

    step_dir = resolve_params_dir(path)
    if (step_dir / "conversion.json").is_file():  # a converted checkpoint says what it holds
        from decmem_jax.convert.orbax_io import check_checkpoint_dir

        check_checkpoint_dir(step_dir, "dit")
    text = stored_model_config(step_dir)
    if text is None:
        root = Path(path).expanduser().absolute()
        text = (root / MODEL_CONFIG_FILE).read_text() if (root / MODEL_CONFIG_FILE).is_file() else None
    if text is None:
        raise CheckpointError(f"{step_dir}: no model config recorded (model_config/ item or {MODEL_CONFIG_FILE})")
    if "base_dim" in json.loads(text):
        raise CheckpointError(f"{step_dir}: holds a VAE (its model config is a VAEConfig), not a DiT; pass it as "
                              "the VAE (e.g. --config.vae_checkpoint) and a DiT run or checkpoint here")
    cfg = DiTConfig.from_json(text).replace(**overrides)
    return restore_params(step_dir, nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
