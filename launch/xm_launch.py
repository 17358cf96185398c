"""XManager launcher for the three training stages on multi-host GPU clusters and TPU pods.

    python launch/xm_launch.py --topology gpu-h100-8x8 --root gs://bucket/runs --experiment decmem-v1 \
        --wan-ckpt gs://bucket/ckpt/wan21 --csv gs://bucket/latents/latents.csv [--stages dense_short,dense_long,decmem]
        [--dry-run] [-- --config.train.lr=1e-5 ...]

Job specs (`build_jobs`) are plain dataclasses: the command every host runs, its environment, the mesh, the
workdir; building them contacts nothing (tests/test_launch.py checks them). `launch` imports xmanager only then,
and runs the stages one after the other (each stage starts from the previous stage's workdir).

Layout: <root>/<experiment>/<stage>/ is a stage's workdir (checkpoints/, tensorboard/, config.yaml, metrics.jsonl).
Every command carries --resume: a restarted (preempted) job continues from its latest checkpoint, a first start
begins from init_from.

Multi-host start-up: on GPU clusters (XManager's Vertex AI executor) each replica gets CLUSTER_SPEC and
`decmem_jax.parallel.mesh.init_distributed` derives the coordinator from it; on TPU pods jax finds its peers itself.
Meshes: GPU -> fsdp over the 8 NVLink-connected GPUs of a host, data across hosts; TPU -> fsdp over the whole slice
(ICI is fast enough for FSDP at 1.3B parameters).
"""

from __future__ import annotations

import argparse
import dataclasses
import posixpath
import shlex
import sys

STAGES = ("dense_short", "dense_long", "decmem")


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
    topology: Topology
    command: tuple[str, ...]  # argv, identical on every host
    env: dict[str, str]
    mesh: dict[str, int]
    workdir: str
    init_from: str

    def command_line(self) -> str:
        return shlex.join(self.command)


def mesh_for(topology: Topology) -> dict[str, int]:
    if topology.platform == "gpu":
        return {"data": topology.hosts, "fsdp": topology.chips_per_host, "tensor": 1, "context": 1}
    if topology.platform == "tpu":
        return {"data": 1, "fsdp": topology.chips, "tensor": 1, "context": 1}
    raise ValueError(f"launch: unknown platform {topology.platform!r}; expected 'gpu' or 'tpu'")


def build_jobs(topology: str | Topology, *, root: str, experiment: str, wan_ckpt: str, csv: str,
               stages=STAGES, global_batch: int = 64, extra_flags=(), python: str = "python") -> list[JobSpec]:
    """One JobSpec per stage, in order; each stage's init_from is the previous stage's workdir (stage 1: wan_ckpt,
    unless the chain starts later, when the stage before the first requested one is used)."""
    topo = TOPOLOGIES[topology] if isinstance(topology, str) else topology
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"launch: unknown stage(s) {unknown}; expected some of {STAGES}")
    mesh = mesh_for(topo)
    batch_shards = mesh["data"] * mesh["fsdp"]
    if global_batch % batch_shards:
        raise ValueError(f"launch: global batch {global_batch} is not divisible by data x fsdp = {batch_shards}")
    base = posixpath.join(root, experiment)
    jobs = []
    for stage in sorted(stages, key=STAGES.index):
        workdir = posixpath.join(base, stage)
        i = STAGES.index(stage)
        init = wan_ckpt if i == 0 else posixpath.join(base, STAGES[i - 1])
        command = (python, "-m", "decmem_jax.train", f"--config=configs/{stage}.py", f"--workdir={workdir}",
                   "--resume", f"--config.init_from={init}", f"--config.data.csv={csv}",
                   f"--config.train.batch={global_batch}",
                   *(f"--config.mesh.{axis}={size}" for axis, size in mesh.items()), *extra_flags)
        jobs.append(JobSpec(name=f"{experiment}-{stage}", stage=stage, topology=topo, command=command,
                            env={**COMMON_ENV, **ENV[topo.platform]}, mesh=mesh, workdir=workdir, init_from=init))
    return jobs


# ----- XManager (imported only here) -----

def _requirements(xm, topo: Topology):
    if topo.platform == "gpu":
        return xm.JobRequirements(**{topo.accelerator: topo.chips_per_host}, replicas=topo.hosts)
    return xm.JobRequirements(**{topo.accelerator: topo.tpu_topology})


def launch(jobs: list[JobSpec], *, title: str, image: str | None = None) -> None:
    """Creates an XManager experiment and runs the stages in order (each waits for the previous one)."""
    import asyncio
    import os

    try:
        from xmanager import xm, xm_local
    except ImportError as e:
        raise SystemExit(f"launch: xmanager is not installed ({e}); `pip install xmanager`, or use --dry-run / "
                         "launch/local.py") from None
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    async def run_all(experiment):
        for job in jobs:
            spec = xm_local.Vertex.Spec()
            [executable] = experiment.package([xm.python_container(
                executor_spec=spec, path=repo, base_image=image or "python:3.12",
                entrypoint=xm.CommandList([f"pip install -c constraints.txt -e . && {job.command_line()}"]))])
            executor = xm_local.Vertex(requirements=_requirements(xm, job.topology))
            unit = await experiment.add(xm.Job(executable=executable, executor=executor, env_vars=job.env,
                                               name=job.name))
            await unit.wait_until_complete()

    with xm_local.create_experiment(experiment_title=title) as experiment:
        asyncio.get_event_loop().run_until_complete(run_all(experiment))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", required=True, choices=sorted(TOPOLOGIES))
    p.add_argument("--root", required=True, help="parent of the experiment's stage workdirs")
    p.add_argument("--experiment", required=True)
    p.add_argument("--wan-ckpt", required=True, help="converted Wan2.1 DiT (python -m decmem_jax.convert dit)")
    p.add_argument("--csv", required=True, help="latents.csv of the latent cache")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--image", default=None, help="base container image")
    p.add_argument("--dry-run", action="store_true", help="print the job specs, launch nothing")
    args = p.parse_args(argv)
    jobs = build_jobs(args.topology, root=args.root, experiment=args.experiment, wan_ckpt=args.wan_ckpt,
                      csv=args.csv, stages=[s for s in args.stages.split(",") if s], global_batch=args.batch,
                      extra_flags=extra)
    for job in jobs:
        print(f"# {job.name}: {job.topology.hosts} host(s) x {job.topology.chips_per_host} {job.topology.accelerator}, "
              f"mesh {job.mesh}")
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in job.env.items()), job.command_line())
    if not args.dry_run:
        launch(jobs, title=args.experiment, image=args.image)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
