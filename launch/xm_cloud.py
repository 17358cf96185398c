"""XManager on Google Cloud: the jobs of one stage on a GPU cluster (Vertex AI or GKE) or a TPU pod (GKE), the image
they run in, fixes for what xmanager 0.8.5 maps wrongly, and an offline rendering of what would be submitted.

    render_stage(spec, executor)   -> the Vertex AI worker pools / Kubernetes Jobs of one stage, as dicts
    check_stage(spec, executor, r) -> raises CloudSpecError unless they ask for the topology's hardware, replicas and a
                                      jax.distributed start-up that decmem_jax.parallel.mesh resolves to every host

Rendering goes through xmanager's own requirement -> resource functions (vertex.get_machine_spec,
kubernetes.requirements_from_executor / node_selector_from_executor / annotations_from_executor) with an image path in
place of the built image; nothing contacts a cloud or needs credentials. What only a real launch does (building and
pushing the image, the API calls) is not covered: launch/README.md says what was verified against what.

Multi-host start-up:
  vertex  a stage is one CustomJob: worker pool 0 = one chief replica, pool 1 = the other hosts (Vertex AI rejects
          more than one replica in the first pool). Vertex AI gives each replica CLUSTER_SPEC, which
          decmem_jax.parallel.mesh.init_distributed turns into the coordinator (pool 0's host) and the process index.
  gke     xmanager's Kubernetes executor makes one Job (one pod) per xm.Job and ignores `replicas`, so a stage is one
          Job per host. Pods get hostname = their job name and subdomain `experiments` (a headless service xmanager
          creates), so host 0 is reachable as <name>.experiments; every pod gets JAX_COORDINATOR_ADDRESS /
          JAX_NUM_PROCESSES / JAX_PROCESS_ID, and on TPUs also TPU_WORKER_ID / TPU_WORKER_HOSTNAMES, which libtpu
          needs to join the hosts of a slice (GKE only sets them itself for indexed Jobs, which xmanager does not make).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from launch.specs import COORDINATOR_PORT, JobSpec, Topology

EXECUTORS = ("vertex", "gke")
GKE_SERVICE = "experiments"  # the headless service xmanager's Kubernetes client creates for its pods
SOURCE_DIR = "decmem-jax"  # the staged source's directory name: the image's /decmem-jax, its working directory
BASE_IMAGE = "python:3.12-slim"
# jax's accelerator plugin per platform; its version follows jax's pin in constraints.txt.
PIP_EXTRA = {"gpu": "jax[cuda13]", "tpu": "jax[tpu]"}
# What the image needs from the repository (not .venv, runs, data or weights): the package, its configs and metadata.
SOURCE_FILES = ("pyproject.toml", "constraints.txt", "README.md")
SOURCE_DIRS = ("decmem_jax", "pallas_kernels", "configs")

# Accelerator -> cloud resource names that xmanager 0.8.5 gets wrong or leaves out (keys: xm.ResourceType names,
# lower case). Vertex AI: its get_machine_spec only knows A100 and L4 machines and gives every other GPU
# n1-standard-4, which cannot carry H100/H200. GKE: it labels every GPU "nvidia-tesla-<type>" (true only for the older
# Tesla GPUs), and for TPUs sets neither the slice node selectors nor the google.com/tpu resource, only the annotation
# of the legacy TPU-node API (v2/v3).
VERTEX_MACHINE = {"h100": ("a3-highgpu-8g", 8), "h200": ("a3-ultragpu-8g", 8)}  # machine type, GPUs it carries
GKE_GPU_LABEL = {"h100": "nvidia-h100-80gb", "h200": "nvidia-h200-141gb"}
GKE_TPU_LABEL = {"tpu_v5p": "tpu-v5p-slice", "tpu_v6e": "tpu-v6e-slice"}
GKE_TPU_CHIPS_PER_HOST = {"tpu_v5p": 4, "tpu_v6e": 4}  # multi-host slice nodes (ct5p-hightpu-4t, ct6e-standard-4t)


class CloudSpecError(ValueError):
    """A rendered job does not ask for what the topology needs."""


def check_executor(executor: str, topo: Topology) -> None:
    if executor not in EXECUTORS:
        raise ValueError(f"--executor: {executor!r} is not a cloud executor; expected one of {EXECUTORS}")
    if executor == "vertex" and topo.platform != "gpu":
        raise ValueError(f"--executor=vertex: {topo.accelerator} is a TPU; xmanager's Vertex AI executor maps only TPU "
                         "v2/v3, so TPU pods go through --executor=gke")
    key = topo.accelerator.lower()
    known = VERTEX_MACHINE if executor == "vertex" else {**GKE_GPU_LABEL, **GKE_TPU_LABEL}
    if key not in known:
        raise ValueError(f"--topology: accelerator {topo.accelerator} has no {executor} resource mapping here; add it "
                         f"to launch/xm_cloud.py (known: {sorted(known)})")
    if executor == "vertex" and topo.chips_per_host != VERTEX_MACHINE[key][1]:
        raise ValueError(f"--topology: {topo.chips_per_host} {topo.accelerator} per host; the Vertex AI machine "
                         f"{VERTEX_MACHINE[key][0]} carries {VERTEX_MACHINE[key][1]}")


# ----- the image -----

def stage_source(repo: str | Path, dest: str | Path) -> str:
    """Copies what the image needs into dest/decmem-jax (xmanager copies the whole directory it is given into the
    Docker context: the repository itself would carry .venv, runs and data). Returns that directory."""
    repo, out = Path(repo), Path(dest) / SOURCE_DIR
    out.mkdir(parents=True)
    for name in SOURCE_FILES:
        shutil.copy2(repo / name, out / name)
    for name in SOURCE_DIRS:
        shutil.copytree(repo / name, out / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(out)


def docker_instructions(platform: str) -> list[str]:
    """Dockerfile steps after xmanager's FROM: install the project with the pinned versions plus jax's plugin for
    the platform, at build time (not at every start), and run from the source directory so configs/ resolves."""
    return ["ENV LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1",
            f"COPY --chown=1000:root {SOURCE_DIR}/ /{SOURCE_DIR}",
            f"WORKDIR /{SOURCE_DIR}",
            f'RUN python -m pip install --no-cache-dir -c constraints.txt . "{PIP_EXTRA[platform]}"']


def packageable(xm, xm_local, executor: str, source: str, platform: str, *, base_image: str | None = None,
                push_image_tag: str | None = None):
    """The python_container every stage of the experiment runs (its args select the stage)."""
    spec_cls = xm_local.Vertex.Spec if executor == "vertex" else xm_local.Kubernetes.Spec
    return xm.python_container(executor_spec=spec_cls(push_image_tag=push_image_tag), path=source,
                               base_image=base_image or BASE_IMAGE, docker_instructions=docker_instructions(platform),
                               entrypoint=xm.CommandList(["python -m decmem_jax.train"]))


# ----- one stage's jobs -----

def requirements(xm, topo: Topology, replicas: int = 1):
    if topo.platform == "gpu":
        return xm.JobRequirements(**{topo.accelerator: topo.chips_per_host}, replicas=replicas)
    return xm.JobRequirements(**{topo.accelerator: topo.tpu_topology})  # the slice; one pod per host of it


def gke_host_names(full_job_name: Callable[[str], str], hosts: int) -> list[str]:
    """Pod hostnames of a stage's hosts: xmanager names a pod after its full job name with '_' -> '-'."""
    return [full_job_name(f"host{i}").replace("_", "-") for i in range(hosts)]


def gke_host_env(topo: Topology, i: int, names: list[str]) -> dict[str, str]:
    if topo.hosts == 1:
        return {}
    env = {"JAX_COORDINATOR_ADDRESS": f"{names[0]}.{GKE_SERVICE}:{COORDINATOR_PORT}",
           "JAX_NUM_PROCESSES": str(topo.hosts), "JAX_PROCESS_ID": str(i)}
    if topo.platform == "tpu":
        env.update(TPU_WORKER_ID=str(i), TPU_WORKER_HOSTNAMES=",".join(f"{n}.{GKE_SERVICE}" for n in names))
    return env


def stage_jobs(xm, xm_local, spec: JobSpec, executable, executor: str,
               full_job_name: Callable[[str], str] | None = None) -> dict:
    """{job name: xm.Job} of one stage. The image's entrypoint is `python -m decmem_jax.train`, so a job's args are
    the stage command after it. GKE needs the work unit's full_job_name (pod hostnames for the coordinator)."""
    topo, args = spec.topology, list(spec.command[3:])
    if executor == "vertex":
        jobs = {"chief": xm.Job(executable, xm_local.Vertex(requirements=requirements(xm, topo)), args=args,
                                env_vars=spec.env)}
        if topo.hosts > 1:
            jobs["workers"] = xm.Job(executable, xm_local.Vertex(requirements=requirements(xm, topo, topo.hosts - 1)),
                                     args=args, env_vars=spec.env)
        return jobs
    names = gke_host_names(full_job_name, topo.hosts)
    return {f"host{i}": xm.Job(executable, xm_local.Kubernetes(requirements=requirements(xm, topo)), args=args,
                               env_vars={**spec.env, **gke_host_env(topo, i, names)}) for i in range(topo.hosts)}


# ----- fixes to xmanager 0.8.5's resource mapping -----

def _accelerator(executor) -> str:
    acc = executor.requirements.accelerator
    return acc.name.lower() if acc is not None else ""


def install_fixes() -> None:
    """Wraps xmanager's requirement -> resource functions for the accelerators in the tables above (their clients
    look them up at call time, so both a launch and render_stage see the fixed values). Idempotent."""
    from xmanager.cloud import kubernetes, vertex

    if getattr(vertex.get_machine_spec, "decmem_fix", False):
        return
    machine_spec, k8s_limits = vertex.get_machine_spec, kubernetes.requirements_from_executor
    k8s_selector, k8s_annotations = kubernetes.node_selector_from_executor, kubernetes.annotations_from_executor

    def get_machine_spec(job):
        spec, key = machine_spec(job), _accelerator(job.executor)
        if key in VERTEX_MACHINE:
            machine, gpus = VERTEX_MACHINE[key]
            if spec["accelerator_count"] != gpus:
                raise ValueError(f"Vertex AI: {spec['accelerator_count']} x {key} do not fit {machine} ({gpus})")
            spec["machine_type"] = machine
        return spec

    def requirements_from_executor(executor):
        limits, key = k8s_limits(executor), _accelerator(executor)
        if key in GKE_TPU_CHIPS_PER_HOST:
            limits.limits = {**(limits.limits or {}), "google.com/tpu": str(GKE_TPU_CHIPS_PER_HOST[key])}
        return limits

    def node_selector_from_executor(executor):
        key = _accelerator(executor)
        if key in GKE_GPU_LABEL:
            return {"cloud.google.com/gke-accelerator": GKE_GPU_LABEL[key]}
        if key in GKE_TPU_LABEL:
            return {"cloud.google.com/gke-tpu-accelerator": GKE_TPU_LABEL[key],
                    "cloud.google.com/gke-tpu-topology": executor.requirements.topology.name}
        return k8s_selector(executor)

    def annotations_from_executor(executor):
        return {} if _accelerator(executor) in GKE_TPU_LABEL else k8s_annotations(executor)

    stock = (machine_spec, k8s_limits, k8s_selector, k8s_annotations)
    for fn, original in zip((get_machine_spec, requirements_from_executor, node_selector_from_executor,
                             annotations_from_executor), stock):
        fn.decmem_fix, fn.stock = True, original  # .stock: xmanager's own mapping, for tests and the record
    vertex.get_machine_spec = get_machine_spec
    kubernetes.requirements_from_executor = requirements_from_executor
    kubernetes.node_selector_from_executor = node_selector_from_executor
    kubernetes.annotations_from_executor = annotations_from_executor


# ----- offline rendering and checks -----

def render_stage(spec: JobSpec, executor: str, image: str = "gcr.io/PROJECT/decmem-jax:TAG") -> list[dict]:
    """What one stage would submit, built offline through xmanager's mapping (fixes installed): Vertex AI worker pool
    specs (one CustomJob) or Kubernetes Jobs (one per host), as plain dicts."""
    from xmanager import xm, xm_local
    from xmanager.xm import utils
    from xmanager.xm_local import executables

    check_executor(executor, spec.topology)
    install_fixes()
    image_exe = executables.GoogleContainerRegistryImage(name="decmem-jax", image_path=image)
    jobs = stage_jobs(xm, xm_local, spec, image_exe, executor, full_job_name=lambda n: f"1700000000000_1_{n}")
    out = []
    if executor == "vertex":
        from google.cloud import aiplatform_v1 as aip
        from xmanager.cloud import vertex

        for job in jobs.values():
            pool = aip.WorkerPoolSpec(
                machine_spec=vertex.get_machine_spec(job), replica_count=job.executor.requirements.replicas,
                container_spec=aip.ContainerSpec(image_uri=image, args=job.args.to_list(utils.ARGV_ESCAPER),
                                                 env=[{"name": k, "value": v} for k, v in job.env_vars.items()]))
            out.append(aip.WorkerPoolSpec.to_dict(pool, use_integers_for_enums=False))
        return out
    from kubernetes import client as k8s
    from xmanager.cloud import kubernetes

    for name, job in jobs.items():
        pod_name = f"1700000000000_1_{name}".replace("_", "-")
        container = k8s.V1Container(name=pod_name, image=image, args=job.args.to_list(utils.ARGV_ESCAPER),
                                    resources=kubernetes.requirements_from_executor(job.executor),
                                    env=[k8s.V1EnvVar(name=k, value=v) for k, v in job.env_vars.items()])
        pod = k8s.V1PodSpec(hostname=pod_name, subdomain=GKE_SERVICE, restart_policy="Never", containers=[container],
                            node_selector=kubernetes.node_selector_from_executor(job.executor))
        body = k8s.V1Job(metadata=k8s.V1ObjectMeta(name=pod_name), spec=k8s.V1JobSpec(backoff_limit=0, template=(
            k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(
                labels={"service": GKE_SERVICE},
                annotations=kubernetes.annotations_from_executor(job.executor)), spec=pod))))
        out.append(k8s.ApiClient().sanitize_for_serialization(body))
    return out


def _fail(spec: JobSpec, executor: str, what: str):
    raise CloudSpecError(f"{spec.name} on {executor}: {what}")


def check_stage(spec: JobSpec, executor: str, rendered: list[dict]) -> dict:
    """Checks the rendered jobs against the topology: accelerator type and count per host, replicas / pods = hosts,
    the stage command, and that decmem_jax.parallel.mesh.distributed_args gives every host a distinct process index
    of hosts with the same coordinator. Returns a short summary for printing."""
    from decmem_jax.parallel.mesh import distributed_args

    topo, args = spec.topology, list(spec.command[3:])
    key = topo.accelerator.lower()
    if executor == "vertex":
        machine, gpus = VERTEX_MACHINE[key]
        replicas = [int(p["replica_count"]) for p in rendered]  # int64: a string in the proto's dict form
        if replicas != ([1, topo.hosts - 1] if topo.hosts > 1 else [1]):
            _fail(spec, executor, f"replicas {replicas} for {topo.hosts} hosts")
        for p in rendered:
            ms = p["machine_spec"]
            right_gpu = ms["accelerator_type"].startswith(f"NVIDIA_{key.upper()}")
            if (ms["machine_type"], ms["accelerator_count"]) != (machine, gpus) or not right_gpu:
                _fail(spec, executor, f"machine spec {ms} is not {machine} with {gpus} x {key}")
            if p["container_spec"]["args"] != args:
                _fail(spec, executor, "container args are not the stage command")
        # What Vertex AI sets on each replica: pool 0 = chief, pool 1 = workers.
        cluster = {f"workerpool{i}": [f"pool{i}-{r}:2222" for r in range(n)] for i, n in enumerate(replicas)}
        envs = [{"CLUSTER_SPEC": json.dumps({"cluster": cluster, "task": {"type": pool, "index": r}})}
                for pool, hosts in cluster.items() for r in range(len(hosts))]
        summary = {"machine": machine, "accelerator": rendered[0]["machine_spec"]["accelerator_type"],
                   "per_host": gpus, "replicas": replicas}
    else:
        if len(rendered) != topo.hosts:
            _fail(spec, executor, f"{len(rendered)} Kubernetes Jobs for {topo.hosts} hosts")
        envs = []
        for body in rendered:
            pod = body["spec"]["template"]["spec"]
            [container] = pod["containers"]
            limits, selector = container["resources"]["limits"], pod["nodeSelector"]
            if topo.platform == "gpu":
                want = ({"nvidia.com/gpu": str(topo.chips_per_host)},
                        {"cloud.google.com/gke-accelerator": GKE_GPU_LABEL[key]})
            else:
                want = ({"google.com/tpu": str(topo.chips_per_host)},
                        {"cloud.google.com/gke-tpu-accelerator": GKE_TPU_LABEL[key],
                         "cloud.google.com/gke-tpu-topology": topo.tpu_topology})
            if (limits, selector) != want:
                _fail(spec, executor, f"resources {limits} / node selector {selector}, expected {want}")
            if container["args"] != args:
                _fail(spec, executor, "container args are not the stage command")
            envs.append({e["name"]: e["value"] for e in container["env"]})
        summary = {"pods": len(rendered), "limits": limits, "node_selector": selector}
    for k, v in spec.env.items():
        if any(env.get(k, v) != v for env in envs):
            _fail(spec, executor, f"environment {k} differs from the job spec's")
    starts = [distributed_args(env) for env in envs]
    if topo.hosts > 1:
        coords = {s["coordinator_address"] for s in starts if s}
        if (None in starts or len(coords) != 1 or sorted(s["process_id"] for s in starts) != list(range(topo.hosts))
                or {s["num_processes"] for s in starts} != {topo.hosts}):
            _fail(spec, executor, f"jax.distributed start-up {starts} is not {topo.hosts} processes of one coordinator")
        summary["coordinator"] = coords.pop()
    elif any(starts):
        _fail(spec, executor, f"a single host would start jax.distributed: {starts}")
    return summary

