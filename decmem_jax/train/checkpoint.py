"""Training checkpoints (Orbax `CheckpointManager`: async, keep-N, atomic) and stage initialisation. Reading a trained
model back for inference is `decmem_jax.weights`, which owns the layout below (and does not need the training code).

A run's workdir holds `checkpoints/<step>/` with the items

    params/        StandardSave of the fp32 parameter dict  (same format as a converted checkpoint's params/, so
                   `convert.orbax_io.restore_params(step_dir, abstract_model)` reads it)
    opt_state/     StandardSave of the optax state
    meta/          JSON: step, RNG key data, stage
    data/          the input iterator's state, one file per process (grain's CheckpointHandler)
    model_config/  JSON: the DiTConfig (`to_json`) of the run

Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete; tmp directories are deleted
at start-up and a step directory without Orbax's `_CHECKPOINT_METADATA` or one of the items (e.g. a copy cut short)
is moved to `checkpoints.incomplete/`: neither is ever loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp

from decmem_jax.models.config import DiTConfig
from decmem_jax.parallel import sharding as shd
from decmem_jax.train.state import NEW_PARAM_PATTERNS, TrainState, path_str
from decmem_jax.weights import CKPT_DIR, CheckpointError, complete_steps, resolve_params_dir, step_is_complete

log = logging.getLogger(__name__)

INCOMPLETE_DIR = "checkpoints.incomplete"


class _StateHolder:
    """Hands grain's checkpoint handler the iterator state captured when the step's batch was drawn (the live
    iterator may already be ahead, prefetching), and receives the restored state."""

    def __init__(self, state: bytes = b""):
        self.state = state

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:  # called by grain's handler after a restore
        pass


class Checkpointer:
    """The run's CheckpointManager: `save(step, state, data_state)`, `restore(step, abstract) -> (state, data)`."""

    def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int, async_save: bool = True,
                 model_config: DiTConfig | None = None):
        self.directory = Path(workdir).absolute() / CKPT_DIR
        self.every = int(every)
        if jax.process_index() == 0:
            self._set_aside_incomplete()
        if jax.process_count() > 1:  # nobody lists the directory before process 0 has tidied it
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("decmem_checkpoint_dir_tidied")
        self.model_config = model_config
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def _set_aside_incomplete(self) -> None:
        if not self.directory.is_dir():
            return
        for p in sorted(self.directory.iterdir()):
            if p.name.isdigit() and not step_is_complete(p):
                dest = self.directory.parent / INCOMPLETE_DIR / f"{p.name}-{int(time.time())}"
                dest.parent.mkdir(exist_ok=True)
                os.replace(p, dest)
                log.warning("checkpoint %s is incomplete (interrupted save?); moved to %s, not loaded", p, dest)

    def latest_step(self) -> int | None:
        steps = complete_steps(self.directory)
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: TrainState, data_state: bytes, *, stage: str = "") -> None:
        """Starts an async save of `state` after `step` optimizer steps (returns once the arrays are copied)."""
        meta = dict(step=int(step), rng=shd.local_value(state.rng).tolist(), stage=stage,
                    saved_at=time.strftime("%Y-%m-%d %H:%M:%S"))
        model_cfg = json.loads(self.model_config.to_json()) if self.model_config is not None else {}
        args = ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                  opt_state=ocp.args.StandardSave(state.opt_state), meta=ocp.args.JsonSave(meta),
                                  data=grain_ckpt.CheckpointSave(_StateHolder(data_state)),
                                  model_config=ocp.args.JsonSave(model_cfg))
        self.manager.save(int(step), args=args, force=True)

    def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, bytes]:
        """The state at `step` placed as `abstract`'s ShapeDtypeStructs (with shardings) say, and the data state."""
        self._check_fits(step, abstract.params)
        holder = _StateHolder()
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract.params),
                                  opt_state=ocp.args.StandardRestore(abstract.opt_state),
                                  meta=ocp.args.JsonRestore(), data=grain_ckpt.CheckpointRestore(holder))
        try:
            out = self.manager.restore(int(step), args=args)
        except Exception as e:
            raise CheckpointError(f"{self.directory / str(step)}: cannot restore ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from e
        rng = shd.put(np.asarray(out["meta"]["rng"], np.uint32), abstract.rng.sharding)
        step_arr = shd.put(np.int32(out["meta"]["step"]), abstract.step.sharding)
        state = TrainState(step=step_arr, params=out["params"], opt_state=out["opt_state"], rng=rng)
        return state, holder.state

    def _check_fits(self, step: int, params) -> None:
        """A clear error when the run's model is not the checkpoint's (e.g. a changed config on --resume)."""
        from decmem_jax.convert.orbax_io import flatten

        stored = stored_param_shapes(self.directory / str(step) / "params")
        model = {path_str(k): tuple(v.shape) for k, v in flatten(params).items()}
        if stored != model:
            diff = sorted(set(stored) ^ set(model)) + sorted(p for p in stored if p in model and stored[p] != model[p])
            raise CheckpointError(f"{self.directory / str(step)}: the checkpoint's parameters differ from the model "
                                  f"of this config ({len(diff)} paths, e.g. {diff[:4]}); resume with the config the "
                                  "run was started with")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----- init_from: a later stage starts from an earlier one's parameters -----

def stored_param_shapes(params_dir: Path) -> dict[str, tuple[int, ...]]:
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(params_dir).item_metadata.tree
    from decmem_jax.convert.orbax_io import flatten

    return {path_str(k): tuple(v.shape) for k, v in flatten(tree).items()}


def load_init_params(path: str | os.PathLike, state: TrainState, shardings: TrainState) -> TrainState:
    """Parameters of `state` replaced by the ones stored at `path` (see resolve_params_dir), restored straight into
    their shards; the optimizer state must be re-initialised by the caller.

    Every stored parameter must exist in the model with the same shape; model parameters absent from the checkpoint
    are allowed only for NEW_PARAM_PATTERNS (memory gate, conditioning), which keep their zero-output init. Stored
    bf16 weights are restored as fp32 master weights."""
    from decmem_jax.convert.orbax_io import flatten, nest

    src = resolve_params_dir(path)
    stored = stored_param_shapes(src / "params")
    flat = flatten(state.params)
    flat_sh = flatten(shardings.params)
    model = {path_str(k): k for k in flat}
    unexpected = sorted(set(stored) - set(model))
    missing = sorted(p for p in model if p not in stored)
    not_new = [p for p in missing if not any(re.fullmatch(pat, p) for pat in NEW_PARAM_PATTERNS)]
    shapes = [f"{p} {stored[p]} vs {tuple(flat[model[p]].shape)}" for p in stored
              if p in model and stored[p] != tuple(flat[model[p]].shape)]
    problems = [f"{what} {items}" for what, items in (("unexpected", unexpected), ("missing", not_new),
                                                      ("mis-shaped (checkpoint vs model)", shapes)) if items]
    if problems:
        raise CheckpointError(f"init_from {src}: the checkpoint does not fit the model: {'; '.join(problems)}")
    target = nest({model[p]: jax.ShapeDtypeStruct(flat[model[p]].shape, flat[model[p]].dtype,
                                                  sharding=flat_sh[model[p]]) for p in stored})
    with ocp.StandardCheckpointer() as ckptr:
        restored = flatten(ckptr.restore(src / "params", target))
    for k, v in restored.items():
        flat[tuple(k)] = v
    if missing:
        log.info("init_from %s: %d parameters not in the checkpoint keep their init: %s", src, len(missing), missing)
    log.info("init_from %s: %d parameters restored", src, len(restored))
    return TrainState(step=state.step, params=nest(flat), opt_state=state.opt_state, rng=state.rng)
