"""The DiT of a run config (`configs/common.py`): one translation from the config's `model` fields to a `DiTConfig`,
called by training, the rollout and the evaluation alike, so that a config file names the same model in all three.

Training builds the model with `dit_config(cfg)` (float32 master parameters, the run's `train.remat`); inference asks
for `dit_config(cfg, inference=True)` (no rematerialisation, `rollout.dtype`), and a trained checkpoint is loaded
with the run's runtime fields through `runtime_overrides` (`decmem_jax.weights.load_model`).
"""

from __future__ import annotations

from decmem_jax.errors import DecMemError
from decmem_jax.models.config import DiTConfig, get_config

MASTER_DTYPE = "float32"  # parameters, gradients and AdamW moments; the compute dtype is model.dtype


class ConfigError(DecMemError, ValueError):
    """A run config field with a bad value; the message names the field."""


def dit_config(cfg, *, inference: bool = False) -> DiTConfig:
    """The DiTConfig of a run config: preset + overrides, runtime policy, memory and conditioning (None when
    disabled). `inference=True`: what a rollout runs (`DiTConfig.for_inference`: remat "none", Linear layouts left
    to XLA under "auto") and the compute dtype `rollout.dtype` unless that is "auto"; the parameters stay in
    MASTER_DTYPE."""
    try:
        out = _dit_config(cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model config ({cfg.model.preset}): {e}") from e
    if inference:
        out = out.for_inference()
        if cfg.rollout.dtype != "auto":
            out = out.replace(dtype=cfg.rollout.dtype)
    return out


def _dit_config(cfg) -> DiTConfig:
    m = cfg.model
    memory = conditioning = None
    if m.memory.enabled:
        from decmem_jax.models.config import MemoryConfig

        fields = {k: v for k, v in m.memory.items() if k != "enabled"}
        if fields.get("layers") is not None:
            fields["layers"] = tuple(fields["layers"])
        memory = MemoryConfig(**fields)
    base = get_config(m.preset, **dict(m.overrides))
    if m.conditioning.enabled:
        from decmem_jax.models.config import ConditioningConfig

        fields = {k: v for k, v in m.conditioning.items() if k != "enabled"}
        conditioning = ConditioningConfig.from_dit(base.replace(dtype=m.dtype, param_dtype=MASTER_DTYPE), **fields)
    return base.replace(dtype=m.dtype, param_dtype=MASTER_DTYPE, attention=m.attention, remat=cfg.train.remat,
                        residual_dtype=m.residual_dtype, memory=memory, conditioning=conditioning)


def runtime_overrides(run_cfg: DiTConfig) -> dict:
    """The runtime fields of `run_cfg` a stored model is loaded with (attention backend, remat, compute dtype, Linear
    output layout); its architecture and parameter dtype stay the checkpoint's."""
    return dict(attention=run_cfg.attention, remat=run_cfg.remat, dtype=run_cfg.dtype,
                linear_layout=run_cfg.linear_layout)
