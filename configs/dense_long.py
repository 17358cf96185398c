"""Stage dense_long: see configs/common.py. `python -m decmem_jax.train --config=configs/dense_long.py --workdir DIR`."""

try:
    from configs import common
except ImportError:  # loaded from outside the repository root
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import common


def get_config():
    return common.train_config("dense_long")
