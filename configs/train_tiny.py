"""Tiny versions of the three stages for CPU tests and smoke runs (training and rollout):
`--config=configs/train_tiny.py:decmem`.

Tiny DiT (dim 256, 2 layers), 8 latents of 8x8 (16 tokens per frame, 2 chunks of 4; memory: one 64-slot block per
frame, top-4, window 8), batch 2, float32, synthetic latents unless data.source/csv are overridden.
"""

from configs import common  # importable wherever the tools load this file from (decmem_jax.cli.configs_importable)


def get_config(stage: str = "decmem"):
    from decmem_jax.rollout.settings import add_rollout_fields

    c = common.train_config(stage or "decmem")
    c.init_from = "random"
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    c.model.attention = "xla"
    c.model.memory.update(blocks_per_frame=1, block_slots=64, top_k=4, window=8)
    c.model.conditioning.hidden = 32
    c.data.source = "synthetic"
    c.data.clip_latents = 8
    c.data.size = (64, 64)  # 8x8 latents
    c.data.num_threads = 1
    c.data.prefetch = 2
    c.train.steps = 50
    c.train.batch = 2
    c.train.lr = 1e-3
    c.train.warmup = 5
    c.train.remat = "none"
    c.train.log_every = 1
    c.mesh.update(data=1, fsdp=-1, tensor=1, context=1)
    c.checkpointing.update(every=10, keep=2)
    # Rollout fields matching this training config, so a tiny run's checkpoint rolls out with the same memory settings:
    #   python -m decmem_jax.rollout --config=configs/train_tiny.py:decmem --config.checkpoint=RUN_DIR ...
    # (its latents are 8x8 at 64x64, the shipped world-tiny VAE's geometry).
    add_rollout_fields(c)
    c.vae_checkpoint = "weights/world_tiny/vae"
    c.rollout.update(height=64, width=64, context_frames=17, chunk=4, steps=4, shift=c.train.sigma_shift,
                     segment_chunks=4, dtype="float32")
    return c
