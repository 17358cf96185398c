"""Rollout fields of a run config (`configs/decmem.py`, `configs/tiny.py`) and their validation.

    checkpoint        a training workdir / step dir (stage 3 for DecMem), or a converted DiT dir; the model's
                      architecture is the stored one (model.memory settings such as top_k or window may change, but
                      a dense checkpoint cannot run with memory: that is what stage-3 training initialises)
    vae_checkpoint    converted VAE dir (`python -m decmem_jax.convert vae`)
    random_weights    True: random DiT and VAE (smoke tests; the output is noise and the CLI says so loudly)
    rollout.*         geometry, memory-bank length, sampler and CFG, streaming (below)
"""

from __future__ import annotations

import ml_collections

from decmem_jax.format import is_frame_count
from decmem_jax.rollout.engine import SamplerSettings


def add_rollout_fields(c: ml_collections.ConfigDict, *, random_weights: bool = False) -> ml_collections.ConfigDict:
    """Adds the rollout fields (paper protocol defaults, docs/method.md §12-13) to a run config, in place."""
    c.checkpoint = ""
    c.vae_checkpoint = ""
    c.vae_preset = "wan2.1-vae"  # used with random_weights
    c.random_weights = random_weights
    c.rollout = ml_collections.ConfigDict(dict(
        height=352, width=640,  # pixels; the context video must have exactly this size
        context_frames=221,  # ground-truth frames teacher-forced into the memory bank (1 + 4k)
        chunk=4,  # latents per generated chunk (16 frames)
        steps=20, solver="unipc", shift=5.0, schedule="wan",
        guidance=5.0,  # action CFG scale (paper protocol: 7.5); 1.0 = off
        segment_chunks=4,  # chunks per jitted lax.scan call (the video file grows after each)
        fps=10,
        capacity=0,  # cache capacity in latents; 0 = exactly context + generated
        include_context=False,  # also write the (VAE-reconstructed) context frames to the mp4
        text_context="",  # .npy/.npz text embedding; "" = zeros (models/conditioning.fixed_text_context)
        dtype="auto",  # compute dtype of the DiT and VAE (auto: bf16 on GPU/TPU, fp32 on CPU)
        # Device mesh of the DiT, e.g. "data:2,tensor:2" (data: the two CFG branches, tensor: attention heads and
        # their KV cache; docs/parallel.md); "" = one device, the unsharded path. The VAE stays on one device.
        mesh="",
    ))
    return c


def sampler_settings(c) -> SamplerSettings:
    r = c.rollout
    return SamplerSettings(steps=int(r.steps), solver=r.solver, shift=float(r.shift), guidance=float(r.guidance),
                           schedule=r.schedule)


def placement(c, dit_cfg=None):
    """The rollout's device placement (`parallel.rollout.RolloutMesh`) for rollout.mesh, or None for one device.
    Every check that can fail (axes, device count, heads, CFG, attention backends) raises MeshSpecError naming
    rollout.mesh here, before any model work. dit_cfg: the DiTConfig that will run (default: the config's)."""
    from decmem_jax.parallel.rollout import RolloutMesh
    from decmem_jax.run_config import dit_config

    if not str(c.rollout.mesh).strip():
        return None
    return RolloutMesh.from_spec(str(c.rollout.mesh), dit_cfg or dit_config(c, inference=True),
                                 guidance=float(c.rollout.guidance))


def check(c) -> list[str]:
    """Problems with the rollout fields, each naming the field."""
    r, problems = c.rollout, []
    if not is_frame_count(r.context_frames):
        problems.append(f"rollout.context_frames={r.context_frames} must be 1 + 4k (the VAE's frame rule)")
    for name in ("height", "width"):
        if r[name] <= 0 or r[name] % 16:
            problems.append(f"rollout.{name}={r[name]} must be a positive multiple of 16 (VAE x8, patch x2)")
    for name in ("chunk", "steps", "segment_chunks", "fps"):
        if r[name] < 1:
            problems.append(f"rollout.{name}={r[name]} must be >= 1")
    if not c.random_weights and not c.checkpoint:
        problems.append("checkpoint is empty: pass --config.checkpoint=DIR (a converted DiT or a training workdir), "
                        "or --config.random_weights=True for a smoke run")
    if not c.random_weights and not c.vae_checkpoint:
        problems.append("vae_checkpoint is empty: pass --config.vae_checkpoint=DIR (python -m decmem_jax.convert vae)")
    return problems
