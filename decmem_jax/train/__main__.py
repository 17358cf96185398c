"""`python -m decmem_jax.train --config=configs/{dense_short,dense_long,decmem}.py [--config.x=...] --workdir DIR
[--resume]`: trains one stage (see docs/training.md). Exit codes: 0 done or preempted (checkpoint written),
1 a run error (printed as one line: bad paths, a data CSV of the wrong kind, non-finite loss, checkpoint/model
mismatch, sharding rules) or a crash (with its traceback), 2 a bad flag or an unknown --config.x field (one line,
with the nearest field names)."""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from decmem_jax.cli import check_data_csvs, define_config_flag, fail, parse_flags

_CONFIG = define_config_flag("config", None, "run config file (configs/*.py[:arg])")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, TensorBoard, config dump")
_RESUME = flags.DEFINE_bool("resume", False, "continue from the latest complete checkpoint in --workdir")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes at INFO
    from decmem_jax.errors import DecMemError
    from decmem_jax.train.loop import run

    try:  # wrong data files are known before the model is built
        check_data_csvs(_CONFIG.value)
    except ValueError as e:
        return fail(e, 1)
    try:
        return run(_CONFIG.value, _WORKDIR.value, resume=_RESUME.value)
    except DecMemError as e:  # the project's errors; anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)  # one-line errors, "did you mean" for an unknown --config.x field
