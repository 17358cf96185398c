"""`python -m decmem_jax.train --config=configs/{dense_short,dense_long,decmem}.py [--config.x=...] --workdir DIR
[--resume]`: trains one stage (see docs/training.md). Exit codes: 0 done or preempted (checkpoint written),
1 a run error (printed as one line: bad paths, non-finite loss, checkpoint/model mismatch, sharding rules) or a
crash (with its traceback)."""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py[:arg])", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, TensorBoard, config dump")
_RESUME = flags.DEFINE_bool("resume", False, "continue from the latest complete checkpoint in --workdir")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes at INFO
    from decmem_jax.convert.orbax_io import ConvertError
    from decmem_jax.parallel.sharding import ShardingError
    from decmem_jax.train.checkpoint import CheckpointError
    from decmem_jax.train.loop import TrainError, run
    from decmem_jax.train.state import ConfigError

    try:
        return run(_CONFIG.value, _WORKDIR.value, resume=_RESUME.value)
    except (TrainError, ConfigError, CheckpointError, ShardingError, ConvertError) as e:  # others: bugs, traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    app.run(main)
