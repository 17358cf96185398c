"""The DiT and VAE a rollout runs, from a run config: `build_models` loads converted or trained checkpoints and checks
them against the config's model (or builds random weights for smoke runs). The rollout CLI, the interactive session
and the memory benchmark's variants load through here, so the three agree on what a checkpoint may differ in: the
memory's inference settings (top_k, window, backend: no new parameters, `with_memory`), nothing of the architecture.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

from decmem_jax.errors import DecMemError

log = logging.getLogger(__name__)

ARCHITECTURE_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "patch_size", "in_channels", "out_channels",
                       "text_dim", "text_len", "freq_dim")


class RolloutError(DecMemError, ValueError):
    """A bad input or setting; the message names the file or field."""


def build_models(c):
    """(DiT, VAE, note) from the config: converted/trained checkpoints, or random weights (loudly)."""
    import jax
    from flax import nnx

    from decmem_jax.models.dit import WanDiT
    from decmem_jax.models.vae import WanVAE, get_vae_config
    from decmem_jax.run_config import dit_config

    dtype = c.rollout.dtype
    run_cfg = dit_config(c, inference=True)
    if c.random_weights:
        print("=" * 78 + "\nWARNING: RANDOM WEIGHTS (config.random_weights=True). The video is noise: this run only "
              "checks\nthat the pipeline works. Pass --config.checkpoint and --config.vae_checkpoint for real output.\n"
              + "=" * 78, file=sys.stderr, flush=True)
        dit = WanDiT(run_cfg, rngs=nnx.Rngs(0))
        vae = WanVAE(get_vae_config(c.vae_preset, **({} if dtype == "auto" else {"dtype": dtype})),
                     rngs=nnx.Rngs(1))
        nnx.update(dit, jax.device_put(nnx.state(dit), jax.devices()[0]))
        nnx.update(vae, jax.device_put(nnx.state(vae), jax.devices()[0]))
        return dit, vae, "random weights"
    from decmem_jax.convert.vae import load_vae
    from decmem_jax.run_config import runtime_overrides
    from decmem_jax.weights import load_model

    dit = load_model(c.checkpoint, **runtime_overrides(run_cfg))
    stored = dit.cfg
    differ = architecture_differences(stored, run_cfg)
    if differ:
        raise RolloutError(f"config.checkpoint {c.checkpoint}: the stored model does not match the run config's model "
                           f"({'; '.join(differ)}); use the config the weights were trained with")
    if (stored.memory is None) != (run_cfg.memory is None):
        raise RolloutError(f"config.checkpoint {c.checkpoint}: the stored model has memory={stored.memory is not None} "
                           f"but model.memory.enabled={run_cfg.memory is not None}; a DecMem rollout needs a stage-3 "
                           f"checkpoint (or set --config.model.memory.enabled={stored.memory is not None})")
    if run_cfg.memory is not None and run_cfg.memory != stored.memory:  # top-k, window, backend: no new parameters
        changed = [f"{k}: checkpoint {getattr(stored.memory, k)!r} -> run {v!r}" for k, v in
                   vars(run_cfg.memory).items() if getattr(stored.memory, k) != v]
        log.warning("config.checkpoint %s was trained with other memory settings; this rollout uses the run "
                    "config's (%s)", c.checkpoint, "; ".join(changed))
        dit = with_memory(dit, run_cfg.memory)
    vae = load_vae(c.vae_checkpoint, **({} if dtype == "auto" else {"dtype": dtype}))
    return dit, vae, f"checkpoint {c.checkpoint}"


def architecture_differences(a, b, names=("checkpoint", "config")) -> list[str]:
    """'field: <names[0]> X, <names[1]> Y' for every architecture field (and the conditioning) in which the
    DiTConfigs a and b differ."""
    out = [f"{f}: {names[0]} {getattr(a, f)}, {names[1]} {getattr(b, f)}" for f in ARCHITECTURE_FIELDS
           if getattr(a, f) != getattr(b, f)]

    def shape(cond):  # the conditioning's architecture (its dtype policy may differ)
        return None if cond is None else {k: v for k, v in dataclasses.asdict(cond).items() if "dtype" not in k}

    if shape(a.conditioning) != shape(b.conditioning):
        out.append(f"conditioning: {names[0]} {shape(a.conditioning)}, {names[1]} {shape(b.conditioning)}")
    return out


def with_memory(dit, memory):
    """The same parameters under another MemoryConfig (an inference setting: no new parameters)."""
    from flax import nnx

    from decmem_jax.models.dit import WanDiT

    new = nnx.eval_shape(lambda: WanDiT(dit.cfg.replace(memory=memory), rngs=nnx.Rngs(0)))
    nnx.update(new, nnx.state(dit))
    return new


def weights_sha256(module) -> str:
    """SHA-256 of a module's parameters as loaded (orbax_io.params_sha256: equals the exported record)."""
    import jax
    from flax import nnx

    from decmem_jax.convert.orbax_io import flatten, params_sha256

    return params_sha256(flatten(jax.device_get(nnx.to_pure_dict(nnx.state(module, nnx.Param)))))
