"""Launchers: the job specs for a GPU cluster and a TPU pod (built without xmanager or any cluster), the local
launcher's stage chain, and the XManager launch script's dry run and flag errors. What needs xmanager (the local
XManager run, the cluster jobs built through it) is in tests/test_xm_launch.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch import local, specs, xm_launch

REPO = Path(__file__).resolve().parents[1]

ARGS = dict(root="gs://bucket/runs", experiment="exp1", wan_ckpt="gs://bucket/ckpt/wan21",
            csv="gs://bucket/latents/latents.csv")


def _flags(job) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in job.command if a.startswith("--") and "=" in a)


def test_gpu_jobs():
    jobs = xm_launch.build_jobs("gpu-h100-8x8", **ARGS)
    assert [j.stage for j in jobs] == ["dense_short", "dense_long", "decmem"]
    for job in jobs:
        f = _flags(job)
        assert job.command[:3] == ("python", "-m", "decmem_jax.train") and "--resume" in job.command
        assert f["config"] == f"configs/{job.stage}.py"
        assert job.workdir == f"gs://bucket/runs/exp1/{job.stage}" == f["workdir"]
        assert job.mesh == {"data": 8, "fsdp": 8, "tensor": 1, "context": 1}
        assert [f[f"config.mesh.{a}"] for a in ("data", "fsdp", "tensor", "context")] == ["8", "8", "1", "1"]
        assert f["config.train.batch"] == "64" and f["config.data.csv"] == ARGS["csv"]
        assert job.topology.hosts == 8 and job.topology.chips_per_host == 8 and job.topology.accelerator == "H100"
        assert "--xla_gpu_enable_latency_hiding_scheduler=true" in job.env["XLA_FLAGS"]
        assert "LIBTPU_INIT_ARGS" not in job.env
    # Stage chain: Wan weights -> dense_short -> dense_long -> decmem.
    assert [_flags(j)["config.init_from"] for j in jobs] == [
        ARGS["wan_ckpt"], "gs://bucket/runs/exp1/dense_short", "gs://bucket/runs/exp1/dense_long"]


def test_tpu_jobs_and_partial_chain():
    jobs = xm_launch.build_jobs("tpu-v5p-128", stages=("decmem",), extra_flags=("--config.train.lr=1e-5",), **ARGS)
    [job] = jobs
    assert job.mesh == {"data": 1, "fsdp": 64, "tensor": 1, "context": 1}
    assert job.topology.platform == "tpu" and job.topology.tpu_topology == "4x4x4" and job.topology.chips == 64
    assert "LIBTPU_INIT_ARGS" in job.env and "XLA_FLAGS" not in job.env
    f = _flags(job)
    assert f["config.init_from"] == "gs://bucket/runs/exp1/dense_long"  # the previous stage's workdir
    assert f["config.train.lr"] == "1e-5" and job.command[-1] == "--config.train.lr=1e-5"


def test_this_machine_jobs_leave_mesh_and_batch_to_the_config():
    jobs = specs.build_jobs(None, root="/r", experiment="e", wan_ckpt="random", csv="", global_batch=None,
                            config="configs/train_tiny.py:{stage}", python="py")
    for job in jobs:
        assert job.mesh == {} and job.topology is None and "XLA_FLAGS" not in job.env
        assert not any(a.startswith(("--config.mesh.", "--config.train.batch", "--config.data.csv"))
                       for a in job.command)
        assert f"--config=configs/train_tiny.py:{job.stage}" in job.command


def test_bad_requests_raise():
    with pytest.raises(ValueError, match="--stages: unknown"):
        xm_launch.build_jobs("gpu-h100-8x8", stages=("stage4",), **ARGS)
    with pytest.raises(ValueError, match="--batch: .* not divisible"):
        xm_launch.build_jobs("gpu-h100-8x8", global_batch=12, **ARGS)
    with pytest.raises(ValueError, match="--topology: unknown topology"):
        xm_launch.build_jobs("gpu-h100-9x9", **ARGS)


def _launch_script(*args: str) -> subprocess.CompletedProcess:
    """launch/xm_launch.py as `python launch/xm_launch.py` (absl parses its flags, as under `xmanager launch`)."""
    return subprocess.run([sys.executable, str(REPO / "launch" / "xm_launch.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_stage_chain():
    r = _launch_script("--root=/r", "--experiment=e", "--wan_ckpt=random", "--csv=",
                       "--stage_config=configs/train_tiny.py", "--dry_run", "--", "--config.train.steps=5")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "-m decmem_jax.train" in line]
    assert len(lines) == 3 and all(line.endswith("--config.train.steps=5") for line in lines)
    # Local jobs run in the launcher's working directory: the config path is made absolute.
    assert f"--config={REPO}/configs/train_tiny.py:dense_long" in lines[1]
    assert "--config.init_from=/r/e/dense_short" in lines[1] and "--config.init_from=/r/e/dense_long" in lines[2]


@pytest.mark.parametrize("args, error", [
    (["--executor=vertex", "--topology=tpu-v5p-128"], "--executor=vertex: tpu_v5p is a TPU"),
    (["--executor=gke"], "--topology is required with --executor=gke"),
    (["--topology=gpu-h100-8x8"], "--topology: not used with --executor=local"),
    (["--executor=gke", "--topology=gpu-h100-8x8", "--batch=12"], "--batch: global batch 12 is not divisible"),
    (["--stages=dense_short,stage4"], "--stages: unknown"),
    (["--stage_config=configs/nope.py"], "--stage_config: configs/nope.py is not a config file"),
    (["--processes=0"], "--processes: 0 is not a positive number"),
    (["--csv=None"], "--csv is required"),  # (None: leave --csv out)
])
def test_bad_flags_are_one_line_errors(args, error):
    base = ["--root=/r", "--experiment=e", "--wan_ckpt=random", "--csv=", "--dry_run"]
    r = _launch_script(*[a for a in base if a.split("=")[0] not in {x.split("=")[0] for x in args}],
                       *[a for a in args if not a.endswith("=None")])
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("xm_launch: error: ") and error in last, r.stderr
    assert "Traceback" not in r.stderr


def test_local_launcher_chain(capsys):
    cmds = local.stage_commands(root="/r", experiment="e", wan_ckpt="/w", csv="/c.csv", python="py")
    assert [s for s, _ in cmds] == list(xm_launch.STAGES)
    assert cmds[2][1][:5] == ["py", "-m", "decmem_jax.train", "--config=configs/decmem.py", "--workdir=/r/e/decmem"]
    assert "--config.init_from=/r/e/dense_long" in cmds[2][1]
    assert local.main(["--root", "/r", "--experiment", "e", "--wan-ckpt", "random", "--csv", "", "--config",
                       "configs/train_tiny.py", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--config=configs/train_tiny.py:dense_long" in out and "--config.init_from=random" in out


def test_local_multiprocess_environment():
    env = local.process_env(1, 2, 12355, gpus_per_process=4)
    assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:12355" and env["JAX_NUM_PROCESSES"] == "2"
    assert env["JAX_PROCESS_ID"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert "CUDA_VISIBLE_DEVICES" not in local.process_env(0, 2, 12355, gpus_per_process=0)
