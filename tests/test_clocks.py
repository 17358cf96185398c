"""benchmarks/clocks.py: the GPU clock/power log beside the timed calls (parsing, a fake nvidia-smi, no GPU)."""

import os
import stat
import time

import pytest

from benchmarks import clocks
from benchmarks.common import timed

# Lines as nvidia-smi prints FIELDS with --format=csv,noheader,nounits (an H100 during a training step and idle)
H100_LINES = ["1590, 701.63, 62, 0x0000000000000004", "1980, 429.03, 53, 0x0000000000000000",
              "1470, 680.77, 64, 0x0000000000000004", "[N/A], 12.0, 40, 0x0", "1830, 6"]


def test_samples_parse_and_summarise():
    samples = clocks.parse_samples(H100_LINES)
    assert len(samples) == 3  # the [N/A] line and the cut-off last line are skipped
    s = clocks.summarise(samples)
    assert s["samples"] == 3 and s["sm_mhz"] == round((1590 + 1980 + 1470) / 3)
    assert (s["sm_mhz_min"], s["sm_mhz_max"], s["temp_c_max"]) == (1470, 1980, 64)
    assert s["power_w"] == pytest.approx((701.63 + 429.03 + 680.77) / 3, abs=0.05)
    assert s["power_capped"] == pytest.approx(2 / 3, abs=1e-3) and s["thermal"] == 0
    line = clocks.describe(s)
    assert "1680 MHz mean (1470-1980)" in line and "power-capped in 67% of 3 samples" in line
    assert "unavailable" in clocks.summarise([]) and clocks.describe(None) == "GPU clocks: not recorded"


def test_no_gpu_says_so():
    log = clocks.ClockLog().start()
    assert log.stop() == {"unavailable": "the cpu backend has no NVIDIA GPU"}
    assert clocks.describe(log.summary()) == "GPU clocks: unavailable (the cpu backend has no NVIDIA GPU)"


def test_fake_nvidia_smi_is_sampled_and_stopped(tmp_path, monkeypatch):
    """On a 'GPU' (backend patched) the log runs nvidia-smi on the first visible device in loop mode, and stop()
    ends the child and summarises what it printed."""
    args_file = tmp_path / "args"
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f'#!/bin/sh\necho "$@" > {args_file}\nwhile true; do\n'
                    '  echo "1710, 690.5, 66, 0x0000000000000004"\n  echo "1980, 420.0, 52, 0x0000000000000000"\n'
                    "  sleep 0.05\ndone\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    monkeypatch.setattr(clocks.jax, "default_backend", lambda: "gpu")
    with clocks.ClockLog(interval_ms=50) as log:
        proc = log.proc
        time.sleep(0.5)
    assert proc.poll() is not None and log.proc is None  # the child is gone
    s = log.summary()
    n, k = s["samples"], round(s["power_capped"] * s["samples"])
    assert n >= 4 and 1 <= k <= n
    assert s["sm_mhz"] == round((1710 * k + 1980 * (n - k)) / n)
    argv = args_file.read_text().split()
    assert argv[:2] == ["-i", "3"] and f"--query-gpu={clocks.FIELDS}" in argv and "--loop-ms=50" in argv


def test_timed_logs_only_the_timed_samples():
    events = []

    class Recorder:
        def start(self):
            events.append(("start", calls[0]))

        def stop(self):
            events.append(("stop", calls[0]))

    calls = [0]

    def call():
        calls[0] += 1
        return calls[0]

    out, stats = timed(call, lambda x: x, warmup=2, repeats=3, during=Recorder())
    assert out == 5 and len(stats["runs_ms"]) == 3
    assert events == [("start", 2), ("stop", 5)]  # after the two warmup calls, around the three timed ones
