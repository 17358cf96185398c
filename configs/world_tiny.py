"""The small world model shipped in weights/world_tiny: its VAE, the three stages and its rollout
(`--config=configs/world_tiny.py:STAGE`).

    python -m decmem_jax.train --config=configs/world_tiny.py:dense_short --workdir runs/world_tiny/s1
    python -m decmem_jax.train --config=configs/world_tiny.py:dense_long --workdir runs/world_tiny/s2
    python -m decmem_jax.train --config=configs/world_tiny.py:decmem --workdir runs/world_tiny/s3
    python -m decmem_jax.rollout --config=configs/world_tiny.py:decmem --context=clip.mp4 --actions=clip.npz ...

`scripts/train_world_tiny.sh` runs the whole recipe (data, VAE, latents, the three stages, evaluation) and
docs/world_model.md records how the shipped weights were made. The model is the `world-tiny` preset (dim 256, 8
layers, 4 heads of 64, 8.1M parameters) on 64x64 frames: 8x8 latents, 16 tokens per latent frame. Memory (stage 3):
one 16-token block per frame (padded to the kernels' 64 slots), an ALM window of 8 latents (the chunk and the 4
before it) and SGM over the top 8 frames OUTSIDE that window: at this size a pooled frame is one block, and letting
SGM pick frames the window already covers would spend its budget on them instead of on the distant past. SGM scores
q and k before RoPE (score_on="content"): what a frame shows, not how far back it is (docs/memory.md).
Training differs from the 1.3B recipe where the size asks for it: from scratch at lr 3e-4 / 2e-4 with cosine decay,
flow shift 2.0 (few tokens per frame need less shift than 480p), no remat, latents cached in memory, and the history
copy noised to U(0, 0.1) per chunk (`train.context_noise`, see train/objective.py) against drift in long rollouts,
and, in stage 3, a retrieval loss that teaches SGM's block scores to rank the frames showing the same view (from the
camera poses; `train.retrieval_loss`, an addition to the method, see docs/memory.md).
The rollout fields (decmem_jax/rollout/settings.py) default to the shipped weights.
"""

from configs import common  # importable wherever the tools load this file from (decmem_jax.cli.configs_importable)

WEIGHTS = "weights/world_tiny"  # relative to the repository root (the CLIs run there)
DATA = "runs/world_tiny"  # the recipe's working folder (data, latents, run directories)

# Weight of the pose-supervised retrieval loss on SGM's block scores in stage 3 (train/objective.py; not in the
# DecMem paper): without it the scores of this small model stayed at chance (docs/memory.md).
RETRIEVAL_LOSS = 0.1

# stage -> (latents folder, clip latents, steps, batch, peak learning rate, warmup steps). Stage 3 trains on the
# long clips (493 frames, every one a revisit script): with 60-latent clips SGM's retrieval, measured teacher-forced
# on patrol clips, fell from 0.50 top-1 at 60 latents to 0.38 at 196 (docs/memory.md), so it must see long histories.
_STAGES = {
    "dense_short": ("latents", 21, 6000, 64, 3e-4, 300),
    "dense_long": ("latents", 60, 1500, 32, 2e-4, 100),
    "decmem": ("latents_long", 124, 2500, 16, 2e-4, 100),
}


def vae_config():
    """`python -m decmem_jax.train.vae --config=configs/world_tiny.py:vae`: the world-tiny VAE from scratch."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.stage = "vae"
    c.model = ml_collections.ConfigDict(dict(preset="world-tiny", overrides=ml_collections.ConfigDict(),
                                             dtype="auto"))  # auto: bfloat16 compute on GPU/TPU, float32 on CPU
    c.data = ml_collections.ConfigDict(dict(csv=f"{DATA}/data/train.csv", clip_frames=17, size=(64, 64), seed=0,
                                            max_clips=0))  # max_clips 0 = every clip of the CSV
    c.loss = ml_collections.ConfigDict(dict(l1=1.0, lpips=0.2, kl=1e-6))
    c.train = ml_collections.ConfigDict(dict(steps=6000, batch=16, lr=4e-4, warmup=200, schedule="cosine", b1=0.9,
                                             b2=0.99, eps=1e-8, weight_decay=0.0, clip=1.0, seed=0, log_every=50,
                                             progress=True))
    c.checkpointing = ml_collections.ConfigDict(dict(every=1000, keep=2, async_save=True))
    return c


def get_config(stage: str = "decmem"):
    from decmem_jax.rollout.settings import add_rollout_fields

    stage = stage or "decmem"
    if stage == "vae":
        return vae_config()
    if stage not in _STAGES:
        raise ValueError(f"configs/world_tiny.py: unknown stage {stage!r}; expected vae or one of {tuple(_STAGES)}")
    c = common.train_config(stage)
    latents, clip_latents, steps, batch, lr, warmup = _STAGES[stage]
    c.init_from = "random" if stage == "dense_short" else f"{DATA}/{common.STAGES[common.STAGES.index(stage) - 1]}"
    c.model.preset = "world-tiny"
    c.model.memory.update(blocks_per_frame=1, block_slots=64, top_k=8, window=8, candidates="outside_window",
                          score_on="content")
    c.model.conditioning.hidden = 128
    c.data.csv = f"{DATA}/{latents}/latents.csv"
    c.data.clip_latents = clip_latents
    c.data.size = (64, 64)
    c.data.cache_latents = True  # 800 clips of 60 latents: 98 MB; stage 3's 240 of 124 latents: 122 MB
    c.data.num_threads = 8
    c.data.prefetch = 16
    c.train.update(steps=steps, batch=batch, lr=lr, warmup=warmup, schedule="cosine", weight_decay=0.01,
                   remat="none", sigma_shift=2.0, context_noise=0.1, log_every=50,
                   retrieval_loss=RETRIEVAL_LOSS if stage == "decmem" else 0.0)
    c.mesh.update(data=1, fsdp=-1, tensor=1, context=1)
    c.checkpointing.update(every=500, keep=2)

    add_rollout_fields(c)
    c.checkpoint = f"{WEIGHTS}/{'decmem' if stage == 'decmem' else 'dense'}"
    c.vae_checkpoint = f"{WEIGHTS}/vae"
    c.vae_preset = "world-tiny"
    c.rollout.update(height=64, width=64, context_frames=33, chunk=4, steps=10, shift=c.train.sigma_shift,
                     guidance=2.0, segment_chunks=4)
    return c
