"""Multi-process start-up on CPU: two local processes, each with 2 virtual CPU devices and the environment the local
launchers give process i of 2 (`launch.specs.process_env`: a localhost coordinator, JAX_NUM_PROCESSES /
JAX_PROCESS_ID, gloo collectives), go through the training CLI's start-up (`mesh.init_distributed`, then
`mesh.make_mesh` over all global devices) and run 3 steps of the real train step of the tiny stage-3 model
(tests/test_sharding.py's config and batches) on one 4-device mesh data=2 x fsdp=2 that spans both processes; each
process feeds only its own rows of the global batch. Checked: both processes joined one run of 2 processes / 4
devices, the mesh holds devices of both, the global batch they assembled is the intended one, and their losses,
gradient norms and parameters after 3 steps agree with each other and with one process on 4 devices (<= 1e-5).

The workers are this file run as a script (`python tests/test_multiprocess.py OUT_DIR BATCHES.npz`): XLA_FLAGS and
the distributed environment must be set before jax is imported.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from launch.specs import process_env  # noqa: E402
from tests.test_sharding import TOL, tiny_batches, tiny_config  # noqa: E402

STEPS = 3
MESH = {"data": 2, "fsdp": 2, "tensor": 1, "context": 1}
DEVICES_PER_PROCESS = 2
BATCH = 4  # one example per device: the step's CPU time grows with the batch, its compile time does not
# A hang (a process that never reaches the coordinator, a collective whose peer died) fails the test instead of
# blocking CI. The three workers mostly compile the step (~3 min of CPU time in all); with the 2 cores shared with a
# CI run the test took 3.8 min (load average 9) and 6.2 min (load average 11, test_sharding running too).
TIMEOUT_S = 600


def _worker(out_dir: str, batches_file: str) -> None:
    """Start-up as in `decmem_jax.train` (loop.run), then STEPS train steps; writes result_<process>.npz."""
    import jax

    from decmem_jax.convert.orbax_io import flatten
    from decmem_jax.parallel import mesh as mesh_lib
    from decmem_jax.parallel import sharding as shd
    from decmem_jax.train import data as data_lib
    from decmem_jax.train import loop

    start = time.perf_counter()
    joined = mesh_lib.init_distributed()  # before anything touches the devices, as loop.run does
    mesh = mesh_lib.make_mesh(MESH)
    cfg = tiny_config()
    cfg.train.batch = BATCH
    with np.load(batches_file) as f:
        batches = [{k[len(f"{i}/"):]: f[k] for k in f.files if k.startswith(f"{i}/")} for i in range(STEPS)]
    setup = loop.build(cfg, mesh)
    setup.compile(loop.global_shapes(batches[0], cfg.train.batch))
    # This process's rows of the global batch: the contiguous block its devices hold (the data pipeline of a real
    # multi-host run reads just those).
    spans = {(idx[0].start or 0, idx[0].stop or cfg.train.batch) for idx in setup.batch_shardings[
        "latents"].addressable_devices_indices_map(batches[0]["latents"].shape).values()}
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    out = dict(joined=np.asarray(joined), process_count=np.asarray(jax.process_count()),
               device_count=np.asarray(jax.device_count()), local_device_count=np.asarray(jax.local_device_count()),
               mesh_processes=np.vectorize(lambda d: d.process_index)(mesh.devices), rows=np.asarray([lo, hi]))
    # Whole values of sharded arrays on every process: one jitted all-gather per tree (process_allgather would
    # compile one per leaf).
    gather = jax.jit(lambda tree: tree, out_shardings=shd.replicated(mesh))
    state = setup.fresh_state()
    print(f"process {jax.process_index()}: started and built in {time.perf_counter() - start:.0f} s", flush=True)
    for i, batch in enumerate(batches):
        global_batch = data_lib.to_global({k: v[lo:hi] for k, v in batch.items()}, setup.batch_shardings)
        gathered = {k: shd.local_value(v) for k, v in gather(global_batch).items()}
        out[f"batch_max_diff/{i}"] = np.asarray(max(float(np.abs(gathered[k] - batch[k]).max()) for k in batch))
        state, metrics = setup.step(state, global_batch, setup.context)
        out[f"loss/{i}"] = shd.local_value(metrics["loss"])
        out[f"grad_norm/{i}"] = shd.local_value(metrics["grad_norm"])
    for path, value in flatten(jax.tree.map(shd.local_value, gather(state.params))).items():
        out[f"param/{'/'.join(path)}"] = value
    np.savez(Path(out_dir) / f"result_{jax.process_index()}.npz", **out)
    print(f"process {jax.process_index()}: done in {time.perf_counter() - start:.0f} s", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(log: Path, batches_file: Path, devices: int, extra_env: dict) -> subprocess.Popen:
    """A worker writing into log's folder; its output goes to `log` (a file: a full pipe would stall it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROC"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra_env)
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, __file__, str(log.parent), str(batches_file)], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def _wait_all(procs: dict[Path, subprocess.Popen], timeout: float) -> None:
    """Waits for every process. The first failure or the timeout kills the rest (a process whose peer died waits in
    a collective until jax's own timeouts, minutes later) and fails the test with every process's output tail."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs.values()):
        if any(p.poll() not in (None, 0) for p in procs.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    killed = [log for log, p in procs.items() if p.poll() is None]
    for log in killed:
        procs[log].kill()
        procs[log].wait()
    codes = {log: p.returncode for log, p in procs.items()}
    assert all(c == 0 for c in codes.values()), "\n".join(
        f"--- {log.parent.name}/{log.name}: "
        f"{'killed by the test' if log in killed else 'exit'} {c}"
        f"{f' (timeout {timeout:.0f} s)' if log in killed and time.monotonic() > deadline else ''} ---\n"
        f"{log.read_text(errors='replace')[-3000:]}" for log, c in codes.items())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    cfg = tiny_config()
    gen = tiny_batches(cfg)  # made here, once: the batches depend on the process index of whoever draws them
    np.savez(tmp / "batches.npz", **{f"{i}/{k}": v[:BATCH] for i in range(STEPS) for k, v in next(gen).items()})
    (tmp / "multi").mkdir()
    (tmp / "single").mkdir()
    port = _free_port()
    procs = {log: _start(log, tmp / "batches.npz", DEVICES_PER_PROCESS, process_env(i, 2, port))
             for i, log in enumerate([tmp / "multi" / "process_0.log", tmp / "multi" / "process_1.log"])}
    # The reference on the same number of devices runs next to them (2 busy cores: sequential would double the time).
    procs[tmp / "single" / "process.log"] = _start(tmp / "single" / "process.log", tmp / "batches.npz",
                                                   2 * DEVICES_PER_PROCESS, {})
    _wait_all(procs, TIMEOUT_S)
    load = lambda path: dict(np.load(path))  # noqa: E731
    return [load(tmp / "multi" / f"result_{i}.npz") for i in range(2)], load(tmp / "single" / "result_0.npz")


@pytest.mark.slow
def test_both_processes_joined_one_run(results):
    multi, single = results
    for i, r in enumerate(multi):
        assert bool(r["joined"]) and int(r["process_count"]) == 2
        assert int(r["device_count"]) == 2 * DEVICES_PER_PROCESS and int(r["local_device_count"]) == DEVICES_PER_PROCESS
        assert sorted(set(r["mesh_processes"].ravel().tolist())) == [0, 1]  # the mesh spans both processes
        assert all(float(r[f"batch_max_diff/{s}"]) == 0.0 for s in range(STEPS))
    assert tuple(multi[0]["rows"]) != tuple(multi[1]["rows"])  # each fed its own half of the batch
    assert not bool(single["joined"]) and int(single["process_count"]) == 1 and int(single["device_count"]) == 4


@pytest.mark.slow
def test_steps_match_one_process(results):
    multi, single = results
    for name, r in [("process 0", multi[0]), ("process 1", multi[1])]:
        for s in range(STEPS):
            for key in (f"loss/{s}", f"grad_norm/{s}"):
                assert abs(float(r[key]) / float(single[key]) - 1) <= TOL, f"{name} {key}: {r[key]} vs {single[key]}"
        params = [k for k in single if k.startswith("param/")]
        assert params and sorted(params) == sorted(k for k in r if k.startswith("param/"))
        worst = max(float(np.abs(r[k] - single[k]).max()) for k in params)
        assert worst <= TOL, f"{name}: max |param difference| {worst:.3g} after {STEPS} steps"
    assert np.isfinite(float(single[f"loss/{STEPS - 1}"])) and float(single["grad_norm/0"]) > 0


# ----- a misconfigured environment fails at once, with a one-line DecMemError -----

@pytest.mark.parametrize("env, match", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"JAX_PROCESS_ID=2 is not one of .* 0\.\.1"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be integers"),
    ({"JAX_PROCESS_ID": "0"}, r"\['JAX_NUM_PROCESSES'\] are not"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "is not HOST:PORT"),
])
def test_bad_environment_raises(env, match):
    from decmem_jax.errors import DecMemError
    from decmem_jax.parallel.mesh import DistributedError, distributed_args

    assert issubclass(DistributedError, DecMemError)
    with pytest.raises(DistributedError, match=match):
        distributed_args({"JAX_COORDINATOR_ADDRESS": "localhost:1234", **env})


def test_init_after_jax_started_raises():
    import jax

    from decmem_jax.parallel.mesh import DistributedError, init_distributed

    jax.devices()  # this process's backend is up: jax refuses before contacting any coordinator
    with pytest.raises(DistributedError, match="must be the first thing that touches jax"):
        init_distributed(process_env(1, 2, _free_port()))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
