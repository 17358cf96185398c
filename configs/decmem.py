"""DecMem (SGM + ALM + gate): stage-3 training (configs/common.py) and rollout (decmem_jax/rollout/settings.py).

    python -m decmem_jax.train --config=configs/decmem.py --config.init_from=DENSE_LONG_WORKDIR --workdir DIR
    python -m decmem_jax.rollout --config=configs/decmem.py --config.checkpoint=DIR --config.vae_checkpoint=VAE \
        --context=clip.mp4 --actions=clip.npz --num_frames=600 --out=world.mp4
"""

from configs import common  # importable wherever the tools load this file from (decmem_jax.cli.configs_importable)


def get_config():
    from decmem_jax.rollout.settings import add_rollout_fields

    return add_rollout_fields(common.train_config("decmem"))
