"""Sharded rollout: the chunk-by-chunk generation (`decmem_jax.rollout.engine`) over a device mesh, placed from
outside the model with the same logical-axis rules as training (`sharding.py`).

    placement = RolloutMesh.from_spec("data:2,tensor:2", dit.cfg, guidance=5.0)   # checks, before any model work
    placement.shard_model(dit)                       # parameters by PARAM_RULES (heads / FFN hidden on `tensor`)
    segment = engine.make_segment_fn(settings, shard=placement)

What is split where (docs/parallel.md):
  data     the two classifier-free-guidance branches: the batch-2 forward of `engine._velocity_fn` is constrained to
           one row per `data` device. The history cache (batch 1, shared by both branches) is replicated on `data`.
  tensor   attention heads (q/k/v/o, norm_q/norm_k, gate) and the FFN hidden dimension (PARAM_RULES), and the head
           axis of every cache field (CACHE_AXES below): SGM's block scores and top-k are per head, so each device
           pools, scores, selects and attends over its own heads' history only, and the cache never travels.
  fsdp, context  not used by the rollout (a batch-1 chunk of 4 latents has nothing to split there).

Activations are not annotated beyond the CFG batch: GSPMD propagates the parameters' and the cache's head split
through the layer. Only backends that XLA can partition run on a mesh: `xla` attention and the `reference` SGM
(`check_backends`); the cuDNN and Pallas kernels are custom calls that GSPMD would replicate (gathering every head's
cache onto every device), so asking for them on a mesh of more than one device raises instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from decmem_jax.models.cache import BlockKVCache, KVCache
from decmem_jax.parallel import mesh as mesh_lib
from decmem_jax.parallel.sharding import LOGICAL_RULES, ShardingError, logical_to_spec, param_shardings

ROLLOUT_AXES = ("data", "tensor")  # the mesh axes a rollout may use (the others must stay 1)

ROLLOUT_LOGICAL_RULES = {
    **LOGICAL_RULES,
    "cfg_branches": "data",  # the cond / uncond rows of the batch-2 CFG forward
    "cache_batch": None,  # the history's rows: 1, shared by both CFG branches, so replicated on `data`
    "cache_tokens": None,  # token (KVCache) or block-major slot (BlockKVCache) axis: every device keeps all frames
    "cache_blocks": None,  # pooled-key block axis
    "head_dim": None,
}

# Logical axes of every array field of each cache type (the `heads` axis maps to `tensor`, as for the attention
# projections whose outputs fill the cache). A cache type or array field missing here raises (no silent replication).
CACHE_AXES: dict[type, dict[str, tuple[str | None, ...]]] = {
    KVCache: dict(k=("layers", "cache_batch", "cache_tokens", "heads", "head_dim"),
                  v=("layers", "cache_batch", "cache_tokens", "heads", "head_dim"),
                  length=()),
    BlockKVCache: dict(k=("layers", "cache_batch", "cache_tokens", "heads", "head_dim"),
                       v=("layers", "cache_batch", "cache_tokens", "heads", "head_dim"),
                       pool=("layers", "cache_batch", "heads", "cache_blocks", "head_dim"),
                       length=()),
}


class MeshSpecError(ShardingError):
    """A rollout mesh that cannot run this model or these settings; the message names the option."""


def parse_mesh(spec: str, *, option: str = "rollout.mesh") -> dict[str, int]:
    """'data:2,tensor:2' -> {'data': 2, 'tensor': 2}; '' -> {} (one device)."""
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        name, sep, size = part.partition(":")
        name = name.strip()
        if not sep or not size.strip().isdigit() or int(size) < 1:
            raise MeshSpecError(f"{option}={spec!r}: {part!r} must be AXIS:SIZE with a positive size, e.g. "
                                "'data:2,tensor:2'")
        if name not in ROLLOUT_AXES:
            what = "is not used by the rollout" if name in mesh_lib.AXES else "is unknown"
            raise MeshSpecError(f"{option}={spec!r}: axis {name!r} {what}; the rollout splits {ROLLOUT_AXES} "
                                "(data: the two CFG branches, tensor: attention heads)")
        if name in sizes:
            raise MeshSpecError(f"{option}={spec!r}: axis {name!r} given twice")
        sizes[name] = int(size)
    return sizes


def check_backends(dit_cfg, devices: int, *, option: str = "rollout.mesh") -> None:
    """Raises unless the model's attention backends partition under GSPMD (pure XLA) when devices > 1."""
    if devices <= 1:
        return
    from decmem_jax.models.attention import resolve_attention_backend

    attention = resolve_attention_backend(dit_cfg.attention, dit_cfg.compute_dtype)
    if attention != "xla":
        raise MeshSpecError(f"{option}: attention backend {attention!r} (model.attention={dit_cfg.attention!r}) is a "
                            "custom call that does not partition over devices; a sharded rollout needs "
                            "--config.model.attention=xla (docs/parallel.md)")
    if dit_cfg.memory is not None:
        from pallas_kernels.sgm import resolve_sgm_backend

        sgm = resolve_sgm_backend(dit_cfg.memory.backend).name
        if sgm != "reference":
            raise MeshSpecError(f"{option}: SGM backend {sgm!r} (model.memory.backend={dit_cfg.memory.backend!r}) is "
                                "a Pallas kernel that does not partition over devices; a sharded rollout needs "
                                "--config.model.memory.backend=reference (docs/parallel.md)")


@dataclasses.dataclass(frozen=True)
class RolloutMesh:
    """Where a rollout's arrays live on `mesh` (hashable: jitted functions are cached per placement)."""

    mesh: Mesh

    @classmethod
    def from_spec(cls, spec: str | Mapping[str, int], dit_cfg, *, guidance: float, option: str = "rollout.mesh",
                  devices=None) -> "RolloutMesh | None":
        """The placement for `spec` ('' or {}: None, one device: today's unsharded path), after every check that
        can fail: axes, device count, heads and FFN width divisible by `tensor`, CFG for `data`, backends."""
        if not isinstance(spec, str):  # a mapping gets the same checks as the string form (axis names, sizes)
            spec = ",".join(f"{axis}:{size}" for axis, size in dict(spec).items())
        sizes = parse_mesh(spec, option=option)
        if not sizes:
            return None
        tensor, data = sizes.get("tensor", 1), sizes.get("data", 1)
        for what, n in (("attention heads", dit_cfg.num_heads), ("FFN hidden", dit_cfg.ffn_dim)):
            if n % tensor:
                raise MeshSpecError(f"{option}: {what} ({n}) are not divisible by tensor={tensor}")
        cfg_on = dit_cfg.conditioning is not None and float(guidance) != 1.0
        if data > 1 and not cfg_on:
            raise MeshSpecError(f"{option}: data={data} splits the two CFG branches, but CFG is off (guidance "
                                f"{guidance}, conditioning {'on' if dit_cfg.conditioning else 'off'}); use data:1")
        if data > 2:
            raise MeshSpecError(f"{option}: data={data}; there are two CFG branches to split (data:1 or data:2)")
        devices = list(jax.devices() if devices is None else devices)
        total = math.prod(sizes.values())
        if total > len(devices) or len(devices) % total:
            raise MeshSpecError(f"{option}={sizes}: {total} devices do not divide the {len(devices)} available")
        check_backends(dit_cfg, total, option=option)
        return cls(mesh_lib.make_mesh({a: sizes.get(a, 1) for a in mesh_lib.AXES}, devices[:total]))

    def spec(self, axes, shape=None, what="array") -> PartitionSpec:
        return logical_to_spec(axes, self.mesh, shape, rules=ROLLOUT_LOGICAL_RULES, what=what)

    # ----- placement (outside jit)
    def shard_model(self, model) -> None:
        """Moves the model's parameters onto the mesh, in place, as PARAM_RULES say."""
        params = nnx.state(model, nnx.Param)
        pure = nnx.to_pure_dict(params)
        placed = jax.device_put(pure, param_shardings(pure, self.mesh, rules=ROLLOUT_LOGICAL_RULES))
        nnx.replace_by_pure_dict(params, placed)
        nnx.update(model, params)

    def cache_shardings(self, cache):
        """The cache with a NamedSharding in place of every array field (CACHE_AXES)."""
        table = CACHE_AXES.get(type(cache))
        if table is None:
            raise ShardingError(f"sharding: cache type {type(cache).__name__} has no entry in CACHE_AXES "
                                "(decmem_jax/parallel/rollout.py)")
        fields = [f.name for f in dataclasses.fields(cache) if f.metadata.get("pytree_node", True)]
        missing = sorted(set(fields) - set(table))
        if missing:
            raise ShardingError(f"sharding: {type(cache).__name__} fields {missing} have no entry in CACHE_AXES "
                                "(decmem_jax/parallel/rollout.py)")
        return cache.replace(**{
            name: NamedSharding(self.mesh, self.spec(table[name], getattr(cache, name).shape,
                                                     f"{type(cache).__name__}.{name}"))
            for name in fields})

    def place_cache(self, cache):
        return jax.device_put(cache, self.cache_shardings(cache))

    def replicate(self, tree):
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def to_host_device(self, tree):
        """Arrays onto the default device (where the VAE decodes: the VAE is not sharded)."""
        return jax.device_put(tree, jax.devices()[0])

    # ----- constraints (inside jit)
    def constrain_cache(self, cache):
        return jax.lax.with_sharding_constraint(cache, self.cache_shardings(cache))

    def branches(self, tree):
        """Leading (batch) axis of every leaf on `data`: the cond and uncond rows on separate devices."""

        def one(x):
            spec = self.spec(("cfg_branches",) + (None,) * (x.ndim - 1), x.shape, "CFG batch")
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

        return jax.tree.map(one, tree)

    def cache_bytes_per_device(self, cache) -> dict[str, int]:
        """Bytes of the cache's arrays on each device (addressable shards)."""
        out: dict[str, int] = {}
        for leaf in jax.tree.leaves(cache):
            for s in leaf.addressable_shards:
                out[str(s.device)] = out.get(str(s.device), 0) + s.data.nbytes
        return out
