"""The XManager launch path (needs the `launch` extra: pip install -c constraints.txt -e ".[launch]").

- `xmanager launch launch/xm_launch.py` with the local executor runs the tiny three-stage chain on the CPU as ONE
  experiment of three work units (recorded in a temporary XManager database), each stage started after the previous
  one finished and initialised from its workdir; the final DecMem checkpoint loads with its memory gate;
- a failing stage stops the chain (exit 1, later stages never start);
- the cluster jobs (Vertex AI GPU pools, GKE GPU and TPU pods) are built through xmanager's own requirement ->
  resource mapping and checked offline: accelerator type and count per host, replicas / pods = hosts, the stage
  command, and a jax.distributed start-up that decmem_jax.parallel.mesh resolves for every host; nothing is submitted;
- the pinned cloud clients accept what xmanager 0.8.5 passes them (the reason for `kubernetes<37`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xmanager", reason="xmanager is not installed (the optional `launch` extra: "
                                       "pip install -c constraints.txt -e '.[launch]')")

from launch import specs, xm_cloud  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = 3  # per stage: enough for a checkpoint, a resume-able workdir and init_from of the next stage


def _xmanager_launch(tmp_path: Path, *script_args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`xmanager launch launch/xm_launch.py -- ...` (the console script, or the same entry point through this
    Python), with XManager's experiment database in tmp_path instead of ~/.xmanager."""
    db = tmp_path / "db.yaml"
    db.write_text(f"sql_connector: sqlite\nsql_connection_settings:\n  backend: sqlite\n"
                  f"  db_name: {tmp_path / 'xm.sqlite3'}\n")
    script = Path(sys.executable).parent / "xmanager"
    cli = [str(script)] if script.is_file() else [sys.executable, "-c",
                                                  "from xmanager.cli.cli import entrypoint; entrypoint()"]
    # A fresh persistent compilation cache: dense_long compiles the same programs as dense_short (the tiny stages
    # differ only in init_from), so the chain spends its time on the three stages, not on compiling twice.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run([*cli, "launch", "launch/xm_launch.py", "--", f"--xm_db_yaml_config_path={db}",
                           *script_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _tiny(root: Path, *extra: str) -> list[str]:
    return [f"--root={root}", "--experiment=tiny", "--wan_ckpt=random", "--csv=",
            "--stage_config=configs/train_tiny.py", "--", f"--config.train.steps={STEPS}",
            "--config.train.progress=false", *extra]


def test_local_xmanager_experiment_runs_the_three_stages(tmp_path):
    root = tmp_path / "runs"
    r = _xmanager_launch(tmp_path, *_tiny(root))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # One experiment, three work units, in the database XManager was pointed at.
    db = sqlite3.connect(tmp_path / "xm.sqlite3")
    [(experiment_id, title)] = db.execute("SELECT experiment_id, experiment_title FROM experiment").fetchall()
    units = db.execute("SELECT experiment_id, work_unit_id FROM work_unit ORDER BY work_unit_id").fetchall()
    assert title == "tiny" and units == [(experiment_id, 1), (experiment_id, 2), (experiment_id, 3)]

    # Dependent: each stage's work unit was added only after the previous one was done.
    events = [line for line in r.stdout.splitlines() if line.startswith("[xm_launch]")]
    assert events == [f"[xm_launch] {s}: {e}" for s in specs.STAGES
                      for e in (f"experiment {experiment_id}, work unit {specs.STAGES.index(s) + 1}", "done")]

    # Three workdirs, each finished (final checkpoint, metrics up to the last step) and started from the one before.
    init = "random"
    for stage in specs.STAGES:
        workdir = root / "tiny" / stage
        assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(STEPS)]
        assert json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == STEPS
        cfg = json.loads((workdir / "config.json").read_text())
        assert (cfg["stage"], cfg["init_from"]) == (stage, init)
        init = str(workdir)

    # The final checkpoint is a complete DecMem model: it loads, with the memory gate stage 3 added.
    from flax import nnx

    from decmem_jax.weights import load_model

    final = root / "tiny" / "decmem" / "checkpoints" / str(STEPS)
    assert {"params", "opt_state", "meta", "data", "model_config"} <= {p.name for p in final.iterdir()}
    model = load_model(root / "tiny" / "decmem")
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    assert model.cfg.memory is not None and {"blocks/gate/kernel", "blocks/gate/bias"} <= paths


def test_failed_stage_stops_the_chain(tmp_path):
    root = tmp_path / "runs"
    r = _xmanager_launch(tmp_path, *_tiny(root, "--config.no_such_field=1"), timeout=300)
    assert r.returncode == 1
    assert "xm_launch: error: stage dense_short failed" in r.stderr and "later stages not started" in r.stderr
    assert "[xm_launch] dense_long" not in r.stdout and not (root / "tiny" / "dense_long").exists()


CLUSTERS = [("gpu-h100-8x8", "vertex"), ("gpu-h200-8x8", "vertex"), ("gpu-h100-1x8", "vertex"),
            ("gpu-h100-8x8", "gke"), ("gpu-h200-8x8", "gke"), ("tpu-v5p-128", "gke"), ("tpu-v6e-64", "gke")]
ARGS = dict(root="gs://bucket/runs", experiment="exp1", wan_ckpt="gs://bucket/ckpt/wan21",
            csv="gs://bucket/latents/latents.csv")


@pytest.mark.parametrize("topology, executor", CLUSTERS)
def test_cluster_jobs_are_built_through_xmanager_and_checked(topology, executor):
    topo = specs.TOPOLOGIES[topology]
    for job in specs.build_jobs(topology, **ARGS):
        rendered = xm_cloud.render_stage(job, executor)
        summary = xm_cloud.check_stage(job, executor, rendered)
        if topo.hosts > 1:
            assert summary["coordinator"].endswith(f":{specs.COORDINATOR_PORT}")
    if executor == "vertex":  # spot checks of what check_stage verifies
        assert summary["machine"] == {"H100": "a3-highgpu-8g", "H200": "a3-ultragpu-8g"}[topo.accelerator]
        assert summary["replicas"] == ([1, topo.hosts - 1] if topo.hosts > 1 else [1])
    else:
        assert summary["pods"] == topo.hosts
        env = {e["name"]: e["value"] for e in rendered[-1]["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["JAX_PROCESS_ID"] == str(topo.hosts - 1) and env["JAX_NUM_PROCESSES"] == str(topo.hosts)
        if topo.platform == "tpu":
            assert env["TPU_WORKER_ID"] == str(topo.hosts - 1)
            assert len(env["TPU_WORKER_HOSTNAMES"].split(",")) == topo.hosts


def test_checks_catch_what_stock_xmanager_would_submit():
    """Without the fixes, xmanager 0.8.5 asks Vertex AI for an n1-standard-4 with 8 H100s and GKE for TPU pods
    without TPUs; check_stage rejects both."""
    from xmanager import xm, xm_local
    from xmanager.cloud import kubernetes, vertex
    from xmanager.xm_local import executables

    image = executables.GoogleContainerRegistryImage(name="decmem-jax", image_path="gcr.io/p/d:t")
    [job] = specs.build_jobs("gpu-h100-8x8", stages=["decmem"], **ARGS)
    pools = xm_cloud.render_stage(job, "vertex")  # installs the fixes; .stock is xmanager's own function
    chief = xm_cloud.stage_jobs(xm, xm_local, job, image, "vertex")["chief"]
    assert vertex.get_machine_spec.stock(chief)["machine_type"] == "n1-standard-4"
    assert vertex.get_machine_spec(chief)["machine_type"] == "a3-highgpu-8g"
    bad = json.loads(json.dumps(pools))
    bad[1]["machine_spec"]["machine_type"] = "n1-standard-4"
    with pytest.raises(xm_cloud.CloudSpecError, match="machine spec"):
        xm_cloud.check_stage(job, "vertex", bad)

    [tpu_job] = specs.build_jobs("tpu-v5p-128", stages=["decmem"], **ARGS)
    pods = xm_cloud.render_stage(tpu_job, "gke")
    executor = xm_local.Kubernetes(requirements=xm_cloud.requirements(xm, tpu_job.topology))
    assert kubernetes.node_selector_from_executor.stock(executor) == {}
    assert kubernetes.requirements_from_executor.stock(executor).limits == {}
    bad = json.loads(json.dumps(pods))
    bad[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] = {}
    with pytest.raises(xm_cloud.CloudSpecError, match="resources"):
        xm_cloud.check_stage(tpu_job, "gke", bad)
    with pytest.raises(xm_cloud.CloudSpecError, match="15 Kubernetes Jobs for 16 hosts"):
        xm_cloud.check_stage(tpu_job, "gke", pods[:-1])


def test_image_holds_the_source_and_installs_the_pins(tmp_path):
    from xmanager import xm, xm_local

    source = Path(xm_cloud.stage_source(REPO, tmp_path))
    assert source.name == xm_cloud.SOURCE_DIR
    assert sorted(p.name for p in source.iterdir()) == sorted(xm_cloud.SOURCE_FILES + xm_cloud.SOURCE_DIRS)
    assert (source / "configs" / "decmem.py").is_file() and (source / "decmem_jax" / "train" / "__main__.py").is_file()
    assert not list(source.rglob("__pycache__"))
    for executor, platform in (("vertex", "gpu"), ("gke", "tpu")):
        p = xm_cloud.packageable(xm, xm_local, executor, str(source), platform, push_image_tag="gcr.io/p/d:t")
        spec = p.executable_spec
        assert spec.path == str(source) and spec.entrypoint.commands == ["python -m decmem_jax.train"]
        assert p.executor_spec.push_image_tag == "gcr.io/p/d:t"
        assert spec.docker_instructions[-1].endswith(f'-c constraints.txt . "{xm_cloud.PIP_EXTRA[platform]}"')


def test_pinned_cloud_clients_accept_what_xmanager_passes():
    """xmanager's Kubernetes client calls V1EnvVar(name, value) positionally (kubernetes 37's pydantic models
    refuse it: hence `kubernetes<37` in the launch extra); its Vertex client calls CustomJob(...).submit(...)."""
    import inspect

    from google.cloud import aiplatform
    from kubernetes import client as k8s

    assert k8s.V1EnvVar("A", "1").value == "1"
    inspect.signature(aiplatform.CustomJob).bind(project="p", location="l", display_name="n", worker_pool_specs=[],
                                                 base_output_dir="", staging_bucket="gs://b")
    inspect.signature(aiplatform.CustomJob.submit).bind(None, service_account=None, tensorboard="",
                                                        enable_web_access=True)
