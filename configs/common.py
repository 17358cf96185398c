"""Shared pieces of the run configs: `train_config(stage)` builds the training config of one of the three stages.

    python -m decmem_jax.train --config=configs/dense_short.py --config.init_from=ckpt/wan21 --workdir runs/s1
    python -m decmem_jax.train --config=configs/dense_long.py --config.init_from=runs/s1 --workdir runs/s2
    python -m decmem_jax.train --config=configs/decmem.py --config.init_from=runs/s2 --workdir runs/s3

Stages (`docs/method.md` §11; step counts are OPEN: the paper's 25K causal-adaptation steps
split 10K short + 15K long, then the paper's 25K memory steps):
  dense_short  block-causal dense attention, 21-latent clips (81 frames), from converted Wan2.1 weights
  dense_long   the same on 60-latent clips (237 frames), from dense_short
  decmem       SGM + ALM + gate (zero-initialised) on 60-latent clips, from dense_long
Action/pose conditioning (zero-initialised) is on from stage 1, so the CFG dropout is learnt throughout.
"""

from __future__ import annotations

import ml_collections

STAGES = ("dense_short", "dense_long", "decmem")
_STAGE = {  # clip_latents (T_LAT), steps, memory on
    "dense_short": (21, 10_000, False),
    "dense_long": (60, 15_000, False),
    "decmem": (60, 25_000, True),
}


def train_config(stage: str) -> ml_collections.ConfigDict:
    """The full training config of `stage` at the real (Wan2.1-1.3B, 352x640) size."""
    if stage not in _STAGE:
        raise ValueError(f"configs/common.py: unknown stage {stage!r}; expected one of {STAGES}")
    clip_latents, steps, memory = _STAGE[stage]
    c = ml_collections.ConfigDict()
    c.stage = stage
    # Converted Wan2.1 weights (stage 1) or the previous stage's workdir; "random" starts from scratch.
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    c.model.preset = "wan2.1-t2v-1.3b"
    c.model.overrides = ml_collections.ConfigDict()  # other DiTConfig fields, e.g. num_layers for a small run
    c.model.dtype = "auto"  # compute: bfloat16 on GPU/TPU (float32 on CPU); weights are float32 (master copy)
    c.model.attention = "auto"
    c.model.residual_dtype = "float32"
    c.model.memory = ml_collections.ConfigDict(dict(
        enabled=memory, blocks_per_frame=6, block_slots=192, top_k=80, window=8, candidates="all", backend="auto",
        layers=None, sgm=True, score_on="rope"))
    # layers: DiT blocks with DecMem attention, e.g. (0, 1, 2); None = all. sgm=False: inference with the ALM window
    # only (the memory benchmark's alm_only variant). score_on: what SGM scores, "rope" or "content" (MemoryConfig)
    c.model.conditioning = ml_collections.ConfigDict(dict(enabled=True, hidden=256, pose="added", pose_scale=16.0))

    c.data = ml_collections.ConfigDict()
    c.data.source = "latents"  # "latents" (decmem_jax.data.encode_latents output) | "synthetic"
    c.data.csv = ""  # latents.csv
    c.data.clip_latents = clip_latents  # T_LAT; trained on the largest whole number of chunks (21 -> 20)
    c.data.size = (352, 640)  # pixels; synthetic latents are size / 8
    c.data.seed = 0
    c.data.skip_corrupt = True
    c.data.first_action = "noop"
    c.data.num_threads = 4
    c.data.prefetch = 4
    c.data.text_context = ""  # .npy/.npz umT5 embedding of the empty prompt; "" = zeros (fixed_text_context)
    c.data.cache_latents = False  # keep the latent files in host memory after their first read (small data sets)
    c.data.eval_csv = ""  # held-out latents.csv: its first batch gives the logged `eval_loss` ("" = none)

    c.train = ml_collections.ConfigDict()
    c.train.steps = steps
    c.train.batch = 64  # global (all hosts)
    c.train.grad_accum = 1
    c.train.lr = 2e-5
    c.train.warmup = 1000
    c.train.schedule = "constant"  # after warmup: "constant" | "cosine"
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.weight_decay = 0.0
    c.train.clip = 1.0  # global gradient norm
    # DiTConfig.remat: none | full | save_sgm | save_attention | save_qkv | offload_qkv | offload_ffn | dots |
    # dots_no_batch (docs/training.md). save_sgm = full, except
    # that the SGM kernel's output and LSE are kept: at 60 latents on an H200, 7.02 s instead of 7.57 per stage-3 step,
    # peak 72.5 GB instead of 71.1 (docs/benchmarks.md). On a 141 GB GPU save_attention is 5-7% faster again at 90 GB; the
    # default stays the one that fits an 80 GB H100.
    c.train.remat = "save_sgm"
    c.train.action_dropout = 0.1  # CFG: noisy copy's conditioning zeroed per sample
    c.train.sigma_shift = 5.0
    c.train.context_noise = 0.0  # > 0: noise the history copy to U(0, this) per chunk (train/objective.py); 0 = method
    c.train.retrieval_loss = 0.0  # > 0: pose-supervised loss on SGM's block scores (memory.retrieval_loss); 0 = method
    c.train.chunk = 4  # latents per chunk
    c.train.seed = 0
    c.train.log_every = 10
    c.train.eval_every = 0  # steps between held-out losses (data.eval_csv); 0 = only at the end
    c.train.progress = True
    c.train.peak_tflops = 0.0  # per chip, for MFU; 0 = look up the device kind

    # Sizes of the mesh axes; one may be -1 (all remaining devices). The launcher sets them per topology.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, context=1))

    c.checkpointing = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True))
    return c
