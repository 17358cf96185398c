"""XManager launch script: the three training stages as one experiment of dependent work units (each stage starts
when the previous one has finished, from its workdir), on this machine, a GPU cluster or a TPU pod.

    # This machine (XManager's local executor: each stage is a subprocess running this Python):
    xmanager launch launch/xm_launch.py -- --root=runs --experiment=exp1 --wan_ckpt=ckpt/wan21 \
        --csv=data/latents/latents.csv [--stages=dense_long,decmem] [--processes=2] [-- --config.train.steps=100]
    # GPU cluster on Vertex AI or GKE, TPU pod on GKE (builds and pushes an image, needs gcloud credentials):
    xmanager launch launch/xm_launch.py -- --executor=vertex --topology=gpu-h100-8x8 --root=gs://BUCKET/runs \
        --experiment=exp1 --wan_ckpt=gs://BUCKET/ckpt/wan21 --csv=gs://BUCKET/latents/latents.csv
    # --dry_run: print the job specs and, for a cluster, build the jobs through xmanager and check them offline

`python launch/xm_launch.py ...` is the same as `xmanager launch launch/xm_launch.py -- ...`. Flags after the next
`--` (the second one with `xmanager launch`, whose first ends its own arguments) are appended to every stage's
`python -m decmem_jax.train` command. XManager's own flags (--xm_*) work too,
e.g. --xm_db_yaml_config_path (where the local experiment database lives; default ~/.xmanager).

The job specs come from launch/specs.py; the cloud executors, the image and the offline checks from
launch/xm_cloud.py. launch/README.md says what was run and verified where.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `xmanager launch` imports this file as a top-level module, with launch/ on the path
    sys.path.insert(0, str(REPO))

from launch.specs import (DEFAULT_CONFIG, STAGES, TOPOLOGIES, JobSpec, build_jobs,  # noqa: E402
                          process_env, topology)

try:  # defines XManager's --xm_* flags (`xmanager launch` passes --xm_launch_script); a dry run needs no xmanager
    from xmanager import xm as _xm, xm_flags as _xm_flags  # noqa: F401
except ImportError:
    pass

__all__ = ["STAGES", "TOPOLOGIES", "JobSpec", "build_jobs", "main", "run_local", "run_cloud"]

# Names chosen not to clash with the absl flags of decmem_jax's own CLIs (--config, --workdir, ...), which share
# absl's global flag registry when both are imported in one process (tests).
_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "vertex", "gke"],
                              "local: this machine; vertex: Vertex AI custom jobs (GPU); gke: Kubernetes on GKE "
                              "(GPU or TPU)")
_TOPOLOGY = flags.DEFINE_string("topology", None, f"cluster or pod (vertex/gke only): {', '.join(sorted(TOPOLOGIES))}")
_ROOT = flags.DEFINE_string("root", None, "parent of the experiment's stage workdirs (<root>/<experiment>/<stage>)")
_EXPERIMENT = flags.DEFINE_string("experiment", None, "experiment title and directory name")
_WAN_CKPT = flags.DEFINE_string("wan_ckpt", None, "init_from of the first stage: a converted Wan2.1 DiT "
                                "(python -m decmem_jax.convert dit), a workdir, or 'random'")
_CSV = flags.DEFINE_string("csv", None, "latents.csv of the latent cache; '' leaves data to the config (the tiny "
                           "configs' synthetic latents)")
_STAGES = flags.DEFINE_list("stages", list(STAGES), "stages to run, in chain order")
_STAGE_CONFIG = flags.DEFINE_string("stage_config", None, "one config file for every stage, called as FILE:STAGE "
                                    "(e.g. configs/train_tiny.py); default configs/<stage>.py")
_BATCH = flags.DEFINE_integer("batch", None, "global batch; default: the config's on this machine, 64 on a cluster")
_PROCESSES = flags.DEFINE_integer("processes", 1, "local only: N processes per stage, one multi-process jax run "
                                  "(jax.distributed over localhost, CPU collectives over gloo)")
_PORT = flags.DEFINE_integer("coordinator_port", 12355, "local only: jax.distributed coordinator port (--processes)")
_IMAGE = flags.DEFINE_string("base_image", None, "cluster only: base image of the built container (default "
                             "python:3.12-slim)")
_PUSH_TAG = flags.DEFINE_string("push_image_tag", None, "cluster only: where the built image is pushed "
                                "(default: XManager's gcr.io/<project>/...)")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the jobs (and check a cluster's offline); launch nothing")


class LaunchError(Exception):
    """Bad flags or a failed stage: printed as one line, exit code 1."""


def _options(extra: list[str]) -> dict:
    """Checks the flags together; every error names its flag."""
    for name in ("root", "experiment", "wan_ckpt", "csv"):
        if flags.FLAGS[name].value is None:
            raise LaunchError(f"--{name} is required")
    bad = [a for a in extra if not a.startswith("--")]
    if bad:
        raise LaunchError(f"arguments after '--' go to every stage's decmem_jax.train and must be flags: {bad}")
    local = _EXECUTOR.value == "local"
    if local and _TOPOLOGY.value:
        raise LaunchError("--topology: not used with --executor=local (this machine's devices; the mesh comes from "
                          "the config)")
    if not local and not _TOPOLOGY.value:
        raise LaunchError(f"--topology is required with --executor={_EXECUTOR.value}")
    if not local and _PROCESSES.value != 1:
        raise LaunchError("--processes: local only; a cluster's hosts come from --topology")
    if _PROCESSES.value < 1:
        raise LaunchError(f"--processes: {_PROCESSES.value} is not a positive number")
    config = _config_template(_STAGE_CONFIG.value, local)
    try:
        topo = None if local else topology(_TOPOLOGY.value)
        if topo is not None:
            from launch import xm_cloud

            xm_cloud.check_executor(_EXECUTOR.value, topo)
        batch = _BATCH.value if (local or _BATCH.value is not None) else 64
        jobs = build_jobs(topo, root=_ROOT.value, experiment=_EXPERIMENT.value, wan_ckpt=_WAN_CKPT.value,
                          csv=_CSV.value, stages=_STAGES.value, global_batch=batch, extra_flags=extra,
                          python=sys.executable if local else "python", config=config)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    return dict(jobs=jobs, executor=_EXECUTOR.value, processes=_PROCESSES.value, port=_PORT.value,
                base_image=_IMAGE.value, push_image_tag=_PUSH_TAG.value)


def _config_template(path: str | None, local: bool) -> str:
    """The stages' --config with a {stage} placeholder. Local jobs run in the launcher's working directory, so the
    file is made absolute; in a cluster's image the working directory is the source, so it stays relative to it."""
    if path is None:
        return str(REPO / DEFAULT_CONFIG) if local else DEFAULT_CONFIG
    file = Path(path).resolve() if local else REPO / path
    in_image = not os.path.isabs(path) and Path(path).parts[0] == "configs"  # the image holds configs/, see xm_cloud
    if not file.is_file() or not (local or in_image):
        raise LaunchError(f"--stage_config: {path} is not a config file" + ("" if local else
                          " under configs/ (relative to the repository root: the image holds that folder)"))
    return f"{file if local else path}:{{stage}}"


def _print_jobs(jobs: list[JobSpec], processes: int) -> None:
    for job in jobs:
        where = (f"{job.topology.hosts} host(s) x {job.topology.chips_per_host} {job.topology.accelerator}, "
                 f"mesh {job.mesh}" if job.topology else f"this machine, {processes} process(es)")
        print(f"# {job.name}: {where}; init_from {job.init_from}")
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in job.env.items()), job.command_line(), flush=True)


def _import_xmanager():
    try:
        from xmanager import xm, xm_local
    except ImportError as e:
        raise LaunchError(f"xmanager is not installed ({e}): pip install -c constraints.txt -e \".[launch]\"") \
            from None
    return xm, xm_local


async def _run_stages(xm_local, title: str, stage_units) -> int:
    """One experiment; the stages' work units one after the other, each added once the previous one completed."""
    from xmanager import xm

    async with xm_local.create_experiment(experiment_title=title) as experiment:
        units = stage_units(experiment)
        for stage, unit in units:
            work_unit = await experiment.add(unit)
            print(f"[xm_launch] {stage}: experiment {experiment.experiment_id}, work unit {work_unit.work_unit_id}",
                  flush=True)
            try:
                await work_unit.wait_until_complete()
            except xm.ExperimentUnitError as e:
                raise LaunchError(f"stage {stage} failed ({e}); later stages not started") from None
            print(f"[xm_launch] {stage}: done", flush=True)
    return 0


def run_local(jobs: list[JobSpec], *, title: str, processes: int = 1, port: int = 12355) -> int:
    """The stages through XManager's local executor: `xm.binary` executables of this Python (no container), so each
    work unit is `python -m decmem_jax.train ...` as a subprocess of this launcher; --processes N makes a stage a
    group of N jobs of one jax.distributed run."""
    xm, xm_local = _import_xmanager()
    # This checkout's code, whichever decmem_jax the interpreter has installed (an editable install elsewhere).
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)

    def stage_units(experiment):
        [python] = experiment.package([xm.binary(executor_spec=xm_local.Local.Spec(), path=sys.executable)])
        for job in jobs:
            def make(name, extra_env, job=job):  # the name prefixes the job's streamed output
                return xm.Job(python, xm_local.Local(), name=name, args=list(job.command[1:]),
                              env_vars={**job.env, "PYTHONPATH": pythonpath, **extra_env})

            if processes == 1:
                yield job.stage, make(job.stage, {})
            else:
                yield job.stage, xm.JobGroup(**{f"{job.stage}_{i}": make(f"{job.stage}_{i}",
                                                                         process_env(i, processes, port))
                                                for i in range(processes)})

    return asyncio.run(_run_stages(xm_local, title, stage_units))


def run_cloud(jobs: list[JobSpec], *, title: str, executor: str, base_image: str | None = None,
              push_image_tag: str | None = None) -> int:
    """The stages on Vertex AI or GKE: one image (built from a staged copy of the source and pushed by XManager's
    packaging, which needs docker or Cloud Build and gcloud credentials), one work unit per stage."""
    xm, xm_local = _import_xmanager()
    from launch import xm_cloud

    xm_cloud.install_fixes()
    platform = jobs[0].topology.platform

    def stage_units(experiment):
        with tempfile.TemporaryDirectory() as tmp:
            source = xm_cloud.stage_source(REPO, tmp)
            [image] = experiment.package([xm_cloud.packageable(xm, xm_local, executor, source, platform,
                                                               base_image=base_image, push_image_tag=push_image_tag)])
        for job in jobs:
            if executor == "vertex":
                yield job.stage, xm.JobGroup(**xm_cloud.stage_jobs(xm, xm_local, job, image, executor))
            else:  # pod hostnames (the coordinator's address) are known once the work unit exists
                async def generator(work_unit, job=job):
                    await work_unit.add(xm.JobGroup(**xm_cloud.stage_jobs(
                        xm, xm_local, job, image, executor, full_job_name=work_unit.get_full_job_name)))
                yield job.stage, generator

    return asyncio.run(_run_stages(xm_local, title, stage_units))


def dry_run(opts: dict) -> int:
    jobs = opts["jobs"]
    _print_jobs(jobs, opts["processes"])
    if opts["executor"] == "local":
        return 0
    from launch import xm_cloud

    try:
        import xmanager  # noqa: F401
    except ImportError:
        print("# xmanager is not installed: the cluster jobs were not built or checked (pip install -e \".[launch]\")")
        return 0
    for job in jobs:
        rendered = xm_cloud.render_stage(job, opts["executor"])
        print(f"# {job.stage} on {opts['executor']}, built through xmanager and checked: "
              f"{xm_cloud.check_stage(job, opts['executor'], rendered)}", flush=True)
    return 0


def main(argv) -> int:
    """absl entry point (`xmanager launch` calls it after parsing the flags): argv[1:] are the flags after `--`."""
    try:
        opts = _options(list(argv[1:]))
        if _DRY_RUN.value:
            return dry_run(opts)
        jobs, title = opts["jobs"], _EXPERIMENT.value
        _print_jobs(jobs, opts["processes"])
        if opts["executor"] == "local":
            return run_local(jobs, title=title, processes=opts["processes"], port=opts["port"])
        return run_cloud(jobs, title=title, executor=opts["executor"], base_image=opts["base_image"],
                         push_image_tag=opts["push_image_tag"])
    except LaunchError as e:
        print(f"xm_launch: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    app.run(main)
