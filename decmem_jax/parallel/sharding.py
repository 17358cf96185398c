"""Declarative sharding: parameter paths -> logical axis names -> mesh axes, kept outside the model.

Two tables, MaxText-style:
  PARAM_RULES    (regex on the '/'-joined parameter path, logical axis name per dimension); the first full match
                 wins. A parameter that matches no row raises: new parameters need a row here, never a silent
                 replication.
  LOGICAL_RULES  logical axis name -> mesh axis, tuple of mesh axes, or None (replicated on purpose). A logical name
                 missing from it raises, as does a mesh axis used twice in one array or a dimension that the mesh
                 axes do not divide.

Activations are not annotated: the step's inputs carry shardings (`batch` on data+fsdp, `frames` on context) and XLA's
propagation (GSPMD) shards everything in between.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from decmem_jax.errors import DecMemError

Rule = str | tuple[str, ...] | None

LOGICAL_RULES: dict[str, Rule] = {
    # activations / inputs
    "batch": ("data", "fsdp"),
    "frames": "context",  # latent frames of the inputs
    "video_frames": None,  # per-video-frame conditioning (1 + 4(F-1) rows: not divisible by a frame split)
    "height": None,
    "width": None,
    "channels": None,
    "features": None,
    # parameters
    "layers": None,  # the stacked-block axis (scanned over)
    "embed": "fsdp",  # the model width D: FSDP shards every weight on it
    "embed_out": None,  # the second D of the square text/time MLP kernels (one array cannot use fsdp twice)
    "heads": "tensor",  # attention projections' head-major output (N * head_dim)
    "mlp": "tensor",  # FFN hidden
    "modulation": None,  # the 6 (block) / 2 (head) modulation rows, and the 6*D time projection output
    "text": None,  # umT5 feature width (4096)
    "freq": None,  # sinusoidal timestep features
    "patch": None,  # patch kernel (pt, ph, pw, C_in) and head output (pt*ph*pw*C_out)
    "cond_in": None,  # conditioning MLP input features
    "cond_hidden": None,  # conditioning MLP hidden width
}

_ATTN = r"blocks/(self_attn|cross_attn)"
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (_ATTN + r"/(q|k|v)/kernel", ("layers", "embed", "heads")),
    (_ATTN + r"/(q|k|v)/bias", ("layers", "heads")),
    (_ATTN + r"/o/kernel", ("layers", "heads", "embed")),
    (_ATTN + r"/o/bias", ("layers", "embed")),
    (_ATTN + r"/norm_(q|k)/scale", ("layers", "heads")),  # RMSNorm over all heads (before the head split)
    (r"blocks/(.*/)?gate(/.*)?/kernel", ("layers", "embed", "heads")),  # DecMem gate: Linear(dim -> dim)
    (r"blocks/(.*/)?gate(/.*)?/bias", ("layers", "heads")),
    (r"blocks/ffn/fc1/kernel", ("layers", "embed", "mlp")),
    (r"blocks/ffn/fc1/bias", ("layers", "mlp")),
    (r"blocks/ffn/fc2/kernel", ("layers", "mlp", "embed")),
    (r"blocks/ffn/fc2/bias", ("layers", "embed")),
    (r"blocks/modulation", ("layers", "modulation", "embed")),
    (r"blocks/norm\d/(scale|bias)", ("layers", "embed")),
    (r"head/modulation", ("modulation", "embed")),
    (r"head/linear/kernel", ("embed", "patch")),
    (r"head/linear/bias", ("patch",)),
    (r"patch_embedding/kernel", ("patch", "patch", "patch", "patch", "embed")),
    (r"patch_embedding/bias", ("embed",)),
    (r"text_embedding/linear_1/kernel", ("text", "embed")),
    (r"time_embedding/linear_1/kernel", ("freq", "embed")),
    (r"(text|time)_embedding/linear_2/kernel", ("embed", "embed_out")),
    (r"(text|time)_embedding/linear_(1|2)/bias", ("embed",)),
    (r"time_projection/kernel", ("embed", "modulation")),
    (r"time_projection/bias", ("modulation",)),
    (r"conditioning/.*/linear_1/kernel", ("cond_in", "cond_hidden")),
    (r"conditioning/.*/linear_1/bias", ("cond_hidden",)),
    (r"conditioning/.*/linear_2/kernel", ("cond_hidden", "embed")),
    (r"conditioning/.*/linear_2/bias", ("embed",)),
)

# Inputs of the train step, by batch key (leading axis = batch).
BATCH_AXES: dict[str, tuple[str, ...]] = {
    "latents": ("batch", "frames", "height", "width", "channels"),
    "actions": ("batch", "video_frames", "features"),
    "poses": ("batch", "video_frames", "features"),
}


class ShardingError(DecMemError, ValueError):
    """A parameter without a rule, an unknown logical axis, or a mesh that does not divide an array."""


def param_axes(path: str, ndim: int, rules: Sequence = PARAM_RULES) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at `path` ('/'-joined) from the first fully matching rule."""
    for pattern, axes in rules:
        if re.fullmatch(pattern, path):
            if len(axes) != ndim:
                raise ShardingError(f"sharding: rule {pattern!r} gives {len(axes)} axes {axes} for parameter "
                                    f"{path!r} of rank {ndim}; fix PARAM_RULES in decmem_jax/parallel/sharding.py")
            return axes
    raise ShardingError(f"sharding: parameter {path!r} matches no row of PARAM_RULES in "
                        "decmem_jax/parallel/sharding.py; add one (parameters are never replicated silently)")


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None, *,
                    rules: Mapping[str, Rule] = LOGICAL_RULES, what: str = "array") -> PartitionSpec:
    """PartitionSpec of an array whose dimensions have the logical names `axes` (None = replicated on purpose).
    Raises on a logical name without a rule, a mesh axis used twice, or (with `shape`) a dimension that the product of
    its mesh axes' sizes does not divide. Mesh axes of size 1 are dropped from the spec."""
    used: dict[str, str] = {}
    spec = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"sharding: {what} has logical axis {name!r} with no entry in LOGICAL_RULES "
                                f"(decmem_jax/parallel/sharding.py); known: {sorted(rules)}")
        target = rules[name]
        mesh_axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for m in mesh_axes:
            if m not in mesh.shape:
                raise ShardingError(f"sharding: logical axis {name!r} maps to mesh axis {m!r}, which the mesh "
                                    f"({dict(mesh.shape)}) does not have")
            if m in used:
                raise ShardingError(f"sharding: {what}: mesh axis {m!r} claimed by both {used[m]!r} and {name!r}")
            used[m] = name
        mesh_axes = tuple(m for m in mesh_axes if mesh.shape[m] > 1)
        if shape is not None and mesh_axes:
            size = math.prod(mesh.shape[m] for m in mesh_axes)
            if shape[i] % size:
                raise ShardingError(f"sharding: {what} dimension {i} ({name!r}, size {shape[i]}) is not divisible "
                                    f"by mesh axes {mesh_axes} of total size {size}")
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _path_str(path) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(key))
    return "/".join(parts)


def param_shardings(params, mesh: Mesh, *, param_rules: Sequence = PARAM_RULES,
                    rules: Mapping[str, Rule] = LOGICAL_RULES):
    """NamedShardings for a nested dict of parameters (arrays or ShapeDtypeStructs; e.g. `nnx.to_pure_dict`)."""

    def one(path, leaf):
        name = _path_str(path)
        axes = param_axes(name, len(leaf.shape), param_rules)
        return NamedSharding(mesh, logical_to_spec(axes, mesh, leaf.shape, rules=rules, what=f"parameter {name!r}"))

    return jax.tree_util.tree_map_with_path(one, params)


def batch_shardings(batch, mesh: Mesh, *, rules: Mapping[str, Rule] = LOGICAL_RULES):
    """NamedShardings for a train-step batch (dict of arrays or shapes keyed as BATCH_AXES)."""
    out = {}
    for key, leaf in batch.items():
        if key not in BATCH_AXES:
            raise ShardingError(f"sharding: batch key {key!r} has no entry in BATCH_AXES "
                                f"(decmem_jax/parallel/sharding.py); known: {sorted(BATCH_AXES)}")
        spec = logical_to_spec(BATCH_AXES[key], mesh, leaf.shape, rules=rules, what=f"batch[{key!r}]")
        out[key] = NamedSharding(mesh, spec)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put(value, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) as a global array with `sharding`; works across hosts."""
    import numpy as np

    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def local_value(x: jax.Array):
    """The value of a replicated global array, read from this process's first shard (no cross-host transfer)."""
    import numpy as np

    return np.asarray(x.addressable_shards[0].data)
