"""The training loop: mesh, state (fresh, `init_from` or resumed), the jitted sharded step, checkpoints, signals,
non-finite detection and logging.

    run(cfg, workdir, resume=False) -> exit code

Step s (1-based) is dispatched, then the metrics of step s-1 are read (so the host prepares the next batch while the
device works). Before a checkpoint of step s is written, its own loss is read and checked: a non-finite loss or
gradient norm raises `NonFiniteError` and the state that produced it is never saved, so the last checkpoint on disk
is the last good one. SIGTERM (preemption) sets a flag; the loop then saves the current step, waits for the write
and returns 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from decmem_jax.errors import DecMemError
from decmem_jax.parallel import mesh as mesh_lib
from decmem_jax.parallel import sharding as shd
from decmem_jax.run_config import dit_config
from decmem_jax.train import checkpoint as ckpt_lib
from decmem_jax.train import data as data_lib
from decmem_jax.train import metrics as metrics_lib
from decmem_jax.train import state as state_lib
from decmem_jax.train.objective import Objective, loss_fn
from decmem_jax.weights import MODEL_CONFIG_FILE

log = logging.getLogger(__name__)


class TrainError(DecMemError, RuntimeError):
    """A run that cannot start or continue; the message is one line naming what to change."""


class NonFiniteError(TrainError):
    pass


# ----- the step -----

def _microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...] taking every n-th row, so each microbatch stays spread over the batch shards."""
    def split(x):
        if x.shape[0] % n:
            raise TrainError(f"train.batch={x.shape[0]} is not divisible by train.grad_accum={n}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_step(graphdef, tx, schedule, obj: Objective, grad_accum: int):
    """step(state, batch, context) -> (state, metrics): mean loss over the batch (accumulated over `grad_accum`
    microbatches), AdamW update, metrics {loss, grad_norm, lr, sigma_mean}."""

    def micro(params, mb, context, key):
        return loss_fn(state_lib.merge(graphdef, params), mb, context, key, obj)

    grad_fn = jax.value_and_grad(micro, has_aux=True)

    def step(state: state_lib.TrainState, batch: dict, context: jax.Array):
        rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
        if grad_accum == 1:
            (loss, aux), grads = grad_fn(state.params, batch, context, key)
        else:
            def body(acc, xs):
                i, mb = xs
                (l, a), g = grad_fn(state.params, mb, context, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, acc, (l, a, g)), None

            zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros((), jnp.float32), {"sigma_mean": jnp.zeros(())},
                                                  state.params))
            xs = (jnp.arange(grad_accum), _microbatches(batch, grad_accum))
            (loss, aux, grads), _ = jax.lax.scan(body, zeros, xs)
            loss, aux, grads = jax.tree.map(lambda x: x / grad_accum, (loss, aux, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state_lib.TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                   opt_state=opt_state, rng=jax.random.key_data(rng))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step), **aux}
        return new, metrics

    return step


def make_eval(graphdef, obj: Objective, seed: int):
    """eval(params, batch, context) -> {"eval_loss": the flow loss of a held-out batch under fixed noise (comparable
    across steps and with runs without the retrieval loss), + "eval_retrieval_top1"/"eval_retrieval_ce" when the
    objective has a retrieval loss}."""
    key = jax.random.key(seed)

    def evaluate(params, batch, context):
        loss, aux = loss_fn(state_lib.merge(graphdef, params), batch, context, key, obj)
        out = {"eval_loss": aux.get("flow_loss", loss)}
        out.update({f"eval_{k}": aux[k] for k in ("retrieval_top1", "retrieval_ce") if k in aux})
        return out

    return jax.jit(evaluate)


def _eval_batch(cfg, setup):
    """The first batch of data.eval_csv as global arrays, or None when no held-out set is configured."""
    import copy

    if not cfg.data.get("eval_csv"):
        return None
    ecfg = copy.deepcopy(cfg)
    with ecfg.unlocked():
        ecfg.data.csv = cfg.data.eval_csv
        ecfg.data.skip_corrupt = False
    return data_lib.to_global(next(data_lib.Batches(ecfg))[0], setup.batch_shardings)


def compile_step(step, shardings: state_lib.TrainState, batch_sh: dict, mesh, compiler_options=None):
    """compiler_options: XLA options (DebugOptions field names) for this program only, e.g. a benchmark's A/B."""
    rep = shd.replicated(mesh)
    return jax.jit(step, in_shardings=(shardings, batch_sh, rep), out_shardings=(shardings, rep),
                   donate_argnums=(0,), compiler_options=compiler_options or None)


@dataclasses.dataclass
class Setup:
    """Everything a run (or a benchmark / test step) needs, built from the config and the mesh."""

    cfg: object
    mesh: object
    dit_cfg: object
    graphdef: object
    tx: object
    schedule: object
    abstract: state_lib.TrainState  # ShapeDtypeStructs
    init: object  # () -> fresh TrainState
    shardings: state_lib.TrainState
    context: jax.Array  # the fixed text context, replicated
    batch_shardings: dict | None = None
    step: object = None  # jitted (state, batch, context) -> (state, metrics), donates the state; see compile()

    def fresh_state(self) -> state_lib.TrainState:
        return jax.jit(self.init, out_shardings=self.shardings)()

    def target(self) -> state_lib.TrainState:
        """The abstract state with shardings: the restore target."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract,
                            self.shardings)

    def compile(self, example_batch: dict, compiler_options: dict | None = None) -> None:
        """Fixes the input shardings from a (global) batch's shapes and jits the step (with `compiler_options`,
        XLA options for the step's program only)."""
        self.batch_shardings = shd.batch_shardings(example_batch, self.mesh)
        step = make_step(self.graphdef, self.tx, self.schedule, state_lib.objective(self.cfg),
                         int(self.cfg.train.grad_accum))
        self.step = compile_step(step, self.shardings, self.batch_shardings, self.mesh, compiler_options)


def build(cfg, mesh) -> Setup:
    """Model config, optimizer, abstract state and shardings for `cfg` on `mesh` (then `compile(batch)`)."""
    t = cfg.train
    dit_cfg = dit_config(cfg)
    tx, schedule = state_lib.make_optimizer(t)
    graphdef, abstract, init = state_lib.abstract_state(dit_cfg, tx, int(t.seed))
    shardings = state_lib.state_shardings(abstract, mesh, tx)
    context = shd.put(_text_context(cfg, dit_cfg), shd.replicated(mesh))
    return Setup(cfg, mesh, dit_cfg, graphdef, tx, schedule, abstract, init, shardings, context)


def global_shapes(batch: dict, global_batch: int) -> dict:
    return {k: jax.ShapeDtypeStruct((global_batch, *v.shape[1:]), v.dtype) for k, v in batch.items()}


# ----- run -----

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def readable_config(cfg) -> str:
    """The run config as plain YAML (ConfigDict.to_yaml tags Python objects)."""
    import yaml

    return yaml.safe_dump(json.loads(cfg.to_json_best_effort()), sort_keys=False, default_flow_style=False)


def _dump_config(cfg, workdir: Path, dit_cfg, flops: dict) -> None:
    _write_atomic(workdir / "config.yaml", readable_config(cfg))
    _write_atomic(workdir / "config.json", cfg.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    _write_atomic(workdir / MODEL_CONFIG_FILE, dit_cfg.to_json() + "\n")
    _write_atomic(workdir / "flops.json", json.dumps(flops, indent=2) + "\n")


class _Preemption:
    """SIGTERM -> save and exit 0. With several processes jax's own preemption sync point is used instead (every
    process must agree on the step at which all of them save)."""

    def __init__(self):
        self.flag = False
        self.multi = jax.process_count() > 1
        self.previous = None
        if not self.multi:
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _text_context(cfg, dit_cfg) -> np.ndarray:
    from decmem_jax.models.conditioning import fixed_text_context

    return fixed_text_context(dit_cfg.text_len, dit_cfg.text_dim, cfg.data.text_context or None)


class _Monitor:
    """Reads a finished step's metrics: the non-finite check, step time / tokens/s / MFU, logging, progress bar."""

    def __init__(self, cfg, writer, flops: dict, peak: float | None, ckpt, start_step: int):
        self.t, self.writer, self.flops, self.peak, self.ckpt = cfg.train, writer, flops, peak, ckpt
        self.bar = tqdm(total=int(self.t.steps), initial=start_step, desc=f"train {cfg.stage}", unit="step",
                        disable=jax.process_index() != 0 or not self.t.progress)
        self.last = None  # (step, wall time) of the last finished step

    def finish(self, step: int, device_metrics: dict) -> None:
        m = {k: float(shd.local_value(v)) for k, v in device_metrics.items()}
        now = time.perf_counter()
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            self.ckpt.wait()  # in-flight saves are of checked, good states: let them land before naming the last
            raise NonFiniteError(f"train: non-finite loss {m['loss']} / grad norm {m['grad_norm']} at step {step}; "
                                 f"stopped without saving it, last good checkpoint: step {self.ckpt.latest_step()} "
                                 f"in {self.ckpt.directory} (lower train.lr or check the data)")
        if self.last is not None and self.last[0] == step - 1:  # steady state: excludes compilation
            dt = now - self.last[1]
            m.update(step_time_s=dt, tokens_per_s=self.flops["tokens_per_step"] / dt,
                     mfu=metrics_lib.mfu(self.flops["train_step"], dt, self.peak, jax.device_count()))
        self.last = (step, now)
        if step % int(self.t.log_every) == 0 or step == int(self.t.steps):
            self.writer.scalars(step, m)
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        self.bar.update(1)


def _initial_state(cfg, setup: Setup, ckpt, latest: int | None):
    """(state, data iterator state): resumed from `latest`, or fresh with `init_from` parameters."""
    if latest is not None:
        state, data_state = ckpt.restore(latest, setup.target())
        log.info("resumed %s at step %d", ckpt.directory, latest)
        return state, data_state
    state = setup.fresh_state()
    if cfg.init_from == "random":
        log.warning("init_from='random': training from a random initialisation")
        return state, None
    state = ckpt_lib.load_init_params(cfg.init_from, state, setup.shardings)
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.shardings.opt_state)(state.params)
    return dataclasses.replace(state, opt_state=opt_state), None


def run(cfg, workdir: str | os.PathLike, *, resume: bool = False) -> int:
    """Trains `cfg` (configs/common.py) in `workdir`; returns 0 when done or preempted (checkpoint written)."""
    mesh_lib.init_distributed()
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    mesh = mesh_lib.make_mesh(dict(cfg.mesh))
    setup = build(cfg, mesh)
    ckpt = ckpt_lib.Checkpointer(workdir, every=cfg.checkpointing.every, keep=cfg.checkpointing.keep,
                                 async_save=cfg.checkpointing.async_save, model_config=setup.dit_cfg)
    writer = preempt = monitor = None
    try:
        latest = ckpt.latest_step()
        if latest is not None and not resume:
            raise TrainError(f"{workdir}: holds checkpoints up to step {latest}; pass --resume to continue it, or "
                             "use a new --workdir")
        if latest is None and not cfg.init_from:
            raise TrainError("init_from is empty: set --config.init_from=PATH (converted Wan weights for stage 1, "
                             "the previous stage's workdir for later stages) or 'random'")
        state, data_state = _initial_state(cfg, setup, ckpt, latest)
        step = int(shd.local_value(state.step))

        batches = data_lib.Batches(cfg, data_state)
        batch, batch_state = next(batches)
        setup.compile(global_shapes(batch, int(t.batch)))
        frames, hw = batch["latents"].shape[1], batch["latents"].shape[2:4]
        flops = metrics_lib.step_flops(setup.dit_cfg, batch=int(t.batch), frames=frames, hw=hw, chunk=int(t.chunk))
        peak = metrics_lib.peak_flops(jax.devices()[0].device_kind, float(t.peak_tflops))
        writer = metrics_lib.MetricWriter(workdir)
        if jax.process_index() == 0:
            _dump_config(cfg, workdir, setup.dit_cfg, {**flops, "peak_flops_per_chip": peak,
                                                        "chips": jax.device_count()})
            writer.text("config", readable_config(cfg))
            writer.text("flops", f"train step FLOPs: {flops['train_step']:.4g}\n\n{metrics_lib.FLOP_FORMULA}")
        log.info("%s: %d params, mesh %s, batch %d x %d latents of %s; %.4g FLOPs per step", cfg.stage,
                 state_lib.num_params(state.params), mesh_lib.describe(mesh), t.batch, frames, hw,
                 flops["train_step"])

        held_out = _eval_batch(cfg, setup)
        evaluate = make_eval(setup.graphdef, state_lib.objective(cfg), int(t.seed)) if held_out is not None else None
        eval_every = int(t.get("eval_every", 0))

        def log_eval(at: int) -> None:
            if evaluate is not None:
                values = {k: float(shd.local_value(v)) for k, v in
                          evaluate(state.params, held_out, setup.context).items()}
                writer.scalars(at, values)
                log.info("step %d: held-out %s", at, ", ".join(f"{k[5:]} {v:.5f}" for k, v in values.items()))

        preempt = _Preemption()
        monitor = _Monitor(cfg, writer, flops, peak, ckpt, step)
        pending = None  # (step, device metrics) dispatched but not yet read
        while step < int(t.steps):
            state, metrics = setup.step(state, data_lib.to_global(batch, setup.batch_shardings), setup.context)
            step += 1
            if pending is not None:
                monitor.finish(*pending)  # the previous step, while this one runs
            pending = (step, metrics)
            stop = preempt.reached(step)
            if stop or ckpt.should_save(step) or step == int(t.steps):
                monitor.finish(*pending)  # never save a state whose loss was not checked
                pending = None
                ckpt.save(step, state, batch_state, stage=cfg.stage)
                if step == int(t.steps):
                    log_eval(step)
                if stop:
                    log.warning("SIGTERM: saved step %d in %s; exiting", step, ckpt.directory)
                    break
            if eval_every and step % eval_every == 0 and step < int(t.steps):
                log_eval(step)
            if step < int(t.steps):
                batch, batch_state = next(batches)
    finally:
        if monitor is not None:
            monitor.bar.close()
        if preempt is not None:
            preempt.restore()
        ckpt.close()  # waits for in-flight saves (all of checked, good states)
        if writer is not None:
            writer.close()
    return 0
