"""Tiny DecMem with RANDOM weights, for smoke runs on a CPU (the video is noise; the CLI says so):

    python -m decmem_jax.rollout --config=configs/tiny.py --context=clip.mp4 --actions=clip.npz --num_frames=64 \\
        --out=world.mp4

64x64 clips from the world generator (`python -m decmem_jax.data.generate_world`): 8x8 latents, 16 tokens per
frame in 2 memory blocks, a 2-layer DiT, the tiny VAE, 17 context frames, chunks of 4 latents, 4 UniPC steps.
"""

from configs import common  # importable wherever the tools load this file from (decmem_jax.cli.configs_importable)


def get_config():
    from decmem_jax.rollout.settings import add_rollout_fields

    c = add_rollout_fields(common.train_config("decmem"), random_weights=True)
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    c.model.attention = "xla"
    c.model.memory.update(blocks_per_frame=2, block_slots=64, top_k=8, window=8, backend="auto")
    c.model.conditioning.hidden = 32
    c.train.remat = "none"
    c.vae_preset = "tiny"
    c.rollout.update(height=64, width=64, context_frames=17, chunk=4, steps=4, segment_chunks=4, dtype="float32")
    return c
