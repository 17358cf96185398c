"""Stage dense_short: see configs/common.py. `python -m decmem_jax.train --config=configs/dense_short.py --workdir DIR`."""

from configs import common  # importable wherever the tools load this file from (decmem_jax.cli.configs_importable)


def get_config():
    return common.train_config("dense_short")
