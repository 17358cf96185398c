"""Checkpoint / resume of `python -m decmem_jax.train` as real processes (tiny dense_long stage, CPU, latents read by
the grain pipeline from a generated latent cache, so the data-iterator state is part of what must resume):

- SIGKILL at a random step, then --resume: the loss curve equals an uninterrupted run bitwise (floats compared
  exactly; steps re-run after the kill are logged again and must repeat their first values exactly too);
- SIGTERM: a checkpoint of the current step is written and the process exits 0;
- a step directory left by a kill during a save (Orbax tmp dir, or a step folder missing items) is ignored, not
  loaded: the run resumes from the last complete step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from decmem_jax.train import checkpoint as ckpt_lib
from decmem_jax.train.data import write_latent_clips
from decmem_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 24, 4


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    # 5 clips of 12 latents, batch 2, windows of 8: several epochs with random windows in 24 steps.
    return write_latent_clips(tmp_path_factory.mktemp("latents"), clips=5, latents=12, hw=(8, 8), seed=1)


def _cmd(workdir, csv, *extra):
    return [sys.executable, "-m", "decmem_jax.train", "--config=configs/train_tiny.py:dense_long",
            f"--workdir={workdir}", "--config.data.source=latents", f"--config.data.csv={csv}",
            f"--config.train.steps={STEPS}", f"--config.checkpointing.every={EVERY}", "--config.train.progress=False",
            *extra]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu")


def _run(workdir, csv, *extra):
    proc = subprocess.run(_cmd(workdir, csv, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _start(workdir, csv, *extra):
    return subprocess.Popen(_cmd(workdir, csv, *extra), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, workdir, step, timeout=300):
    """Polls metrics.jsonl until it has `step` (or the process ends)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if max(read_metrics(workdir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _losses(workdir) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], []).append(rec["loss"])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, csv):
    workdir = tmp_path_factory.mktemp("reference")
    _run(workdir, csv)
    return workdir


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(reference, csv, tmp_path):
    kill_at = random.Random().randrange(EVERY + 2, STEPS - 2)  # past the first checkpoint, before the end
    proc = _start(tmp_path, csv)
    _wait_for_step(proc, tmp_path, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(read_metrics(tmp_path))
    resumed = _run(tmp_path, csv, "--resume")
    assert "resumed" in resumed.stderr

    ref = {s: v[-1] for s, v in _losses(reference).items()}
    got = _losses(tmp_path)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1)), f"killed after step {killed_at}"
    for s, values in got.items():
        assert all(v == ref[s] for v in values), f"step {s}: {values} vs uninterrupted {ref[s]} " \
                                                 f"(killed after step {killed_at})"
    assert any(len(v) > 1 for v in got.values()) or killed_at % EVERY == 0  # some steps were really re-run


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(csv, tmp_path):
    proc = _start(tmp_path, csv, "--config.train.steps=100000", "--config.checkpointing.every=100000")
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    saved = ckpt_lib.complete_steps(Path(tmp_path) / ckpt_lib.CKPT_DIR)
    assert len(saved) == 1 and saved[0] >= 3
    assert saved[0] == max(read_metrics(tmp_path))  # the step it stopped at, not an older one


@pytest.mark.slow
def test_interrupted_save_is_ignored(reference, csv, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    ckpts = workdir / ckpt_lib.CKPT_DIR
    last = max(ckpt_lib.complete_steps(ckpts))
    assert last == STEPS
    # What a kill during a save leaves: Orbax's temporary directory, and (on a filesystem without atomic rename) a
    # step folder whose items were never all written.
    tmp = ckpts / f"{STEPS + 4}.orbax-checkpoint-tmp-1234"
    shutil.copytree(ckpts / str(last), tmp)
    partial = ckpts / str(STEPS + 8)
    shutil.copytree(ckpts / str(last), partial)
    (partial / "_CHECKPOINT_METADATA").unlink()
    shutil.rmtree(partial / "opt_state")
    assert ckpt_lib.complete_steps(ckpts) == [STEPS - EVERY, STEPS]

    proc = _run(workdir, csv, "--resume", f"--config.train.steps={STEPS + 2}")
    assert f"resumed {ckpts} at step {STEPS}" in proc.stderr
    assert not tmp.exists() and not partial.exists()
    assert any(p.name.startswith(f"{STEPS + 8}-") for p in (workdir / ckpt_lib.INCOMPLETE_DIR).iterdir())
    assert max(ckpt_lib.complete_steps(ckpts)) == STEPS + 2
    assert max(read_metrics(workdir)) == STEPS + 2
