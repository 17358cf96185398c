"""The device mesh (named axes `data`, `fsdp`, `tensor`, `context`) and multi-host start-up from the environment.

    init_distributed()                                   # no-op on one host; jax.distributed.initialize otherwise
    mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 1, "context": 1})   # -1: the devices left over

Axis meanings (how the logical rules in `sharding.py` use them):
  data     pure data parallelism: parameters replicated, the batch split.
  fsdp     the batch split AND parameters/optimizer state sharded on their `embed` dimension (ZeRO-3 style; XLA
           all-gathers each layer's weights when it is used).
  tensor   Megatron-style: attention heads and the FFN hidden dimension split.
  context  the latent-frame (sequence) axis of the inputs split.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from decmem_jax.errors import DecMemError

log = logging.getLogger(__name__)


class DistributedError(DecMemError, ValueError):
    """A multi-process environment that cannot start: the message names the variables and what to set."""


AXES = ("data", "fsdp", "tensor", "context")


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Axis sizes in AXES order; at most one axis may be -1 (= num_devices / the product of the others)."""
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown}; the axes are {AXES}")
    shape = [int(sizes.get(a, 1)) for a in AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh: sizes {dict(zip(AXES, shape))} must be positive, with at most one -1")
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices are not a multiple of the fixed axes' product {fixed} "
                             f"({dict(zip(AXES, shape))})")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh: sizes {dict(zip(AXES, shape))} use {math.prod(shape)} devices, "
                         f"but {num_devices} are available")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes), topology-aware ordering from jax.make_mesh.
    Axes are `Auto` (GSPMD propagation): only parameters and step inputs/outputs carry shardings."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())


# ----- multi-host -----

def distributed_args(env: Mapping[str, str]) -> dict | None:
    """The `jax.distributed.initialize` arguments the environment asks for; None = single process.

    Recognised, in order:
      JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID)   explicit (our launchers set these)
      CLUSTER_SPEC (Vertex AI custom jobs, what XManager's Vertex executor runs on)
      SLURM_NTASKS > 1, or a multi-worker Cloud TPU (TPU_WORKER_HOSTNAMES with a comma): jax's auto-detection ({})
    """
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return _explicit_args(env)
    if env.get("CLUSTER_SPEC"):
        spec = json.loads(env["CLUSTER_SPEC"])
        cluster, task = spec["cluster"], spec["task"]
        pools = [p for p in ("workerpool0", "workerpool1") if p in cluster]
        hosts = [h for p in pools for h in cluster[p]]
        if len(hosts) <= 1:
            return None
        index = sum(len(cluster[p]) for p in pools[:pools.index(task["type"])]) + int(task["index"])
        port = env.get("JAX_COORDINATOR_PORT", "8476")
        return dict(coordinator_address=f"{hosts[0].split(':')[0]}:{port}", num_processes=len(hosts),
                    process_id=index)
    if int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return {}
    return None


def _explicit_args(env: Mapping[str, str]) -> dict:
    """JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, checked here: jax would otherwise accept an
    out-of-range id or a port-less address and wait for peers that never come (its timeout is minutes)."""
    address = env["JAX_COORDINATOR_ADDRESS"]
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
    if missing:
        raise DistributedError(f"mesh: JAX_COORDINATOR_ADDRESS is set but {missing} are not (set all three, or none "
                               "for a single process)")
    try:
        processes, process_id = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    except ValueError:
        raise DistributedError(f"mesh: JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                               f"{env['JAX_PROCESS_ID']!r} must be integers") from None
    if processes < 1 or not 0 <= process_id < processes:
        raise DistributedError(f"mesh: JAX_PROCESS_ID={process_id} is not one of the JAX_NUM_PROCESSES={processes} "
                               f"process ids 0..{processes - 1}")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"mesh: JAX_COORDINATOR_ADDRESS={address!r} is not HOST:PORT (the coordinator is "
                               "process 0's host and a free port, the same for every process)")
    return dict(coordinator_address=address, num_processes=processes, process_id=process_id)


def init_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Calls jax.distributed.initialize when the environment describes several processes (see distributed_args);
    must run before anything touches the devices. Returns whether it did.

    On CPU the processes' collectives go over gloo (jax's default, `jax_cpu_collectives_implementation`; the local
    launchers also set JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo)."""
    args = distributed_args(os.environ if env is None else env)
    if args is None:
        return False
    try:
        jax.distributed.initialize(**args)
    except RuntimeError as e:  # e.g. called after jax computed something, or called twice
        raise DistributedError(f"mesh: jax.distributed.initialize({args}) failed: {e} (init_distributed must be the "
                               "first thing that touches jax in the process)") from e
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
