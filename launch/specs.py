"""What every launcher runs, without any launcher library: the stage chain, topologies, one JobSpec per stage.

`build_jobs` turns a topology (or None: this machine, mesh left to the config) into one JobSpec per stage: the
argv every host runs, its environment, the mesh and the workdir. Nothing here imports xmanager or contacts anything,
so the specs are testable anywhere (tests/test_launch.py) and shared by launch/local.py and launch/xm_launch.py.

Layout: <root>/<experiment>/<stage>/ is a stage's workdir (checkpoints/, tensorboard/, config.yaml, metrics.jsonl).
Every command carries --resume: a restarted (preempted) job continues from its latest checkpoint, a first start
begins from init_from.
"""

from __future__ import annotations

import dataclasses
import posixpath
import shlex

from configs.common import STAGES  # the stage chain is the configs' own: one definition for configs and launchers
DEFAULT_CONFIG = "configs/{stage}.py"  # relative to the repository root (the container's working directory)
COORDINATOR_PORT = 8476  # jax.distributed coordinator; the same default as decmem_jax.parallel.mesh for CLUSTER_SPEC


@dataclasses.dataclass(frozen=True)
class Topology:
    platform: str  # "gpu" | "tpu"
    accelerator: str  # XManager resource name: "H100", "H200", "tpu_v5p", "tpu_v6e", ...
    hosts: int
    chips_per_host: int
    tpu_topology: str = ""  # e.g. "4x4x4" for TPU slices

    @property
    def chips(self) -> int:
        return self.hosts * self.chips_per_host


TOPOLOGIES: dict[str, Topology] = {
    "gpu-h100-8x8": Topology("gpu", "H100", hosts=8, chips_per_host=8),
    "gpu-h200-8x8": Topology("gpu", "H200", hosts=8, chips_per_host=8),
    "gpu-h100-1x8": Topology("gpu", "H100", hosts=1, chips_per_host=8),
    "tpu-v5p-128": Topology("tpu", "tpu_v5p", hosts=16, chips_per_host=4, tpu_topology="4x4x4"),
    "tpu-v6e-64": Topology("tpu", "tpu_v6e", hosts=16, chips_per_host=4, tpu_topology="8x8"),
}

# Environment per platform. GPU: let JAX take most of the memory; the latency-hiding scheduler overlaps the FSDP
# all-gathers / reduce-scatters with compute. TPU: libtpu's async collective fusion does the same there.
ENV = {
    "gpu": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92",
            "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"},
    "tpu": {"LIBTPU_INIT_ARGS": "--xla_tpu_enable_async_collective_fusion=true "
                                "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true"},
}
COMMON_ENV = {"TF_CPP_MIN_LOG_LEVEL": "1", "PYTHONUNBUFFERED": "1"}


@dataclasses.dataclass(frozen=True)
class JobSpec:
    name: str
    stage: str
    topology: Topology | None  # None: this machine
    command: tuple[str, ...]  # argv, identical on every host
    env: dict[str, str]
    mesh: dict[str, int]  # {} = the config's mesh (this machine)
    workdir: str
    init_from: str

    def command_line(self) -> str:
        return shlex.join(self.command)


def topology(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise ValueError(f"--topology: unknown topology {name!r}; expected one of {sorted(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def mesh_for(topo: Topology) -> dict[str, int]:
    if topo.platform == "gpu":  # FSDP traffic stays on a host's NVLink, data parallelism across hosts
        return {"data": topo.hosts, "fsdp": topo.chips_per_host, "tensor": 1, "context": 1}
    if topo.platform == "tpu":  # ICI is fast enough for FSDP over the whole slice at 1.3B parameters
        return {"data": 1, "fsdp": topo.chips, "tensor": 1, "context": 1}
    raise ValueError(f"launch: unknown platform {topo.platform!r}; expected 'gpu' or 'tpu'")


def check_stages(stages) -> list[str]:
    """The requested stages in chain order; unknown names are an error naming --stages."""
    stages = [s for s in stages if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"--stages: unknown or no stage(s) {unknown or stages}; expected some of {list(STAGES)}")
    return sorted(dict.fromkeys(stages), key=STAGES.index)


def build_jobs(topo: str | Topology | None, *, root: str, experiment: str, wan_ckpt: str, csv: str,
               stages=STAGES, global_batch: int | None = 64, extra_flags=(), python: str = "python",
               config: str = DEFAULT_CONFIG) -> list[JobSpec]:
    """One JobSpec per stage, in chain order; each stage's init_from is the previous stage's workdir (the first
    stage: wan_ckpt, unless the chain starts later, when the stage before the first requested one is used).

    topo None means this machine: no mesh flags (the config's mesh, fsdp over all local devices) and no accelerator
    environment. `config` is the config argument with `{stage}` in it ("configs/{stage}.py",
    "configs/train_tiny.py:{stage}"); csv "" leaves data.csv to the config (synthetic latents); global_batch None
    leaves train.batch to the config."""
    topo = topology(topo) if isinstance(topo, str) else topo
    stages = check_stages(stages)
    if "{stage}" not in config:
        raise ValueError(f"--config: {config!r} has no '{{stage}}' placeholder")
    mesh = mesh_for(topo) if topo is not None else {}
    if mesh and global_batch is not None and global_batch % (mesh["data"] * mesh["fsdp"]):
        raise ValueError(f"--batch: global batch {global_batch} is not divisible by data x fsdp = "
                         f"{mesh['data'] * mesh['fsdp']} of this topology")
    base = posixpath.join(root, experiment)
    jobs = []
    for stage in stages:
        workdir = posixpath.join(base, stage)
        i = STAGES.index(stage)
        init = wan_ckpt if i == 0 else posixpath.join(base, STAGES[i - 1])
        command = (python, "-m", "decmem_jax.train", f"--config={config.format(stage=stage)}",
                   f"--workdir={workdir}", "--resume", f"--config.init_from={init}",
                   *([f"--config.data.csv={csv}"] if csv else []),
                   *([f"--config.train.batch={global_batch}"] if global_batch is not None else []),
                   *(f"--config.mesh.{axis}={size}" for axis, size in mesh.items()), *extra_flags)
        env = {**COMMON_ENV, **(ENV[topo.platform] if topo is not None else {})}
        jobs.append(JobSpec(name=f"{experiment}-{stage}", stage=stage, topology=topo, command=command, env=env,
                            mesh=mesh, workdir=workdir, init_from=init))
    return jobs


def process_env(i: int, processes: int, port: int, gpus_per_process: int = 0) -> dict[str, str]:
    """Environment of local process i of a multi-process run on this machine, read by
    decmem_jax.parallel.mesh.init_distributed (CPU collectives over gloo; local GPUs split between the processes if
    asked)."""
    env = dict(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    if gpus_per_process:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(i * gpus_per_process,
                                                                     (i + 1) * gpus_per_process))
    return env
