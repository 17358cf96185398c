"""What a training run is made of: the sharded train state (fp32 master parameters, AdamW state, step, RNG), stage
initialisation (`init_from`), the objective and the optimizer. The model config comes from `decmem_jax.run_config`,
shared with the rollout.

Parameters live as a nested dict of arrays (`nnx.to_pure_dict` of the model's Params): the same tree Orbax stores,
`parallel.sharding` annotates and `convert.orbax_io.restore_params` reads. The graph (module structure) is
rebuilt from the config whenever a `WanDiT` is needed (`nnx.merge(graphdef, nnx.State(params))`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from decmem_jax.models.config import DiTConfig
from decmem_jax.models.dit import WanDiT
from decmem_jax.parallel import sharding as shd
from decmem_jax.run_config import ConfigError
from decmem_jax.train.objective import Objective

log = logging.getLogger(__name__)

# Parameters that a later stage may add on top of its `init_from` checkpoint; they keep their (zero) init.
NEW_PARAM_PATTERNS = (r"blocks/(.*/)?gate(/.*)?", r"conditioning/.*")


# ----- configs -----

def objective(cfg) -> Objective:
    cond = cfg.model.conditioning
    if cfg.train.grad_accum < 1 or cfg.train.batch % cfg.train.grad_accum:
        raise ConfigError(f"train.batch={cfg.train.batch} must be a multiple of train.grad_accum="
                          f"{cfg.train.grad_accum} >= 1")
    if cfg.train.get("retrieval_loss", 0.0) and not cfg.model.memory.enabled:
        raise ConfigError(f"train.retrieval_loss={cfg.train.retrieval_loss} trains SGM's block scores, but this "
                          "model has no memory (model.memory.enabled is False): set it to 0 for dense stages")
    try:
        return Objective(chunk=cfg.train.chunk, sigma_shift=cfg.train.sigma_shift, dropout=cfg.train.action_dropout,
                         conditioned=bool(cond.enabled), poses=bool(cond.enabled and cond.pose == "added"),
                         context_noise=float(cfg.train.get("context_noise", 0.0)),
                         retrieval_loss=float(cfg.train.get("retrieval_loss", 0.0)))
    except ValueError as e:
        raise ConfigError(f"train config: {e}") from e


# ----- optimizer -----

def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup to `lr` (then constant or cosine decay), global-norm clipping and weight decay."""
    if t.schedule == "constant":
        after = optax.constant_schedule(t.lr)
    elif t.schedule == "cosine":
        after = optax.cosine_decay_schedule(t.lr, max(int(t.steps) - int(t.warmup), 1))
    else:
        raise ConfigError(f"train.schedule={t.schedule!r}; expected 'constant' or 'cosine'")
    schedule = after
    if int(t.warmup) > 0:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, t.lr, int(t.warmup)), after], [int(t.warmup)])
    tx = optax.chain(optax.clip_by_global_norm(t.clip), optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps,
                                                                    weight_decay=t.weight_decay))
    return tx, schedule


# ----- train state -----

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # nested dict of fp32 master weights
    opt_state: Any
    rng: jax.Array  # uint32 raw key data (jax.random.key_data), split once per step


def abstract_model(dit_cfg: DiTConfig, seed: int = 0):
    """(graphdef, abstract param dict of ShapeDtypeStructs) without allocating anything."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: WanDiT(dit_cfg, rngs=nnx.Rngs(seed))), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("train: WanDiT has non-parameter state; the train step only carries nnx.Param")
    return graphdef, nnx.to_pure_dict(params)


def merge(graphdef, params: dict) -> WanDiT:
    return nnx.merge(graphdef, nnx.State(params))


def state_shardings(abstract: TrainState, mesh: Mesh, tx) -> TrainState:
    """NamedShardings of every leaf: parameters and their AdamW moments by the rules, everything else replicated."""
    psh = shd.param_shardings(abstract.params, mesh)
    rep = shd.replicated(mesh)
    # tree_map_params finds the parameter-shaped subtrees of the optimizer state by re-running tx.init.
    tx_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, psh, transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=psh, opt_state=tx_sh, rng=rep)


def abstract_state(dit_cfg: DiTConfig, tx, seed: int):
    """(graphdef, abstract TrainState of ShapeDtypeStructs, init function). `jax.jit(init, out_shardings=...)()`
    makes a fresh state directly in its shards; resuming restores into the abstract state instead."""
    graphdef, _ = abstract_model(dit_cfg, seed)

    def init() -> TrainState:
        params = nnx.to_pure_dict(nnx.split(WanDiT(dit_cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)[1])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.key(seed + 1)))

    return graphdef, jax.eval_shape(init), init


def path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def num_params(params: dict) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
