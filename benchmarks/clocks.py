"""What the GPU's clock and power did while a benchmark timed it: nvidia-smi sampled beside the timed calls.

Why: an H100 runs this project's rollout chunk and training step at its ~700 W power cap, where the SM clock
averages 1.7-1.8 GHz instead of its 1.98 GHz maximum and sinks as the card warms (docs/benchmarks.md, session 17).
The first timed training step after a compile is ~3% faster for that reason, and machines of one kind differ by
about 2%. So every timed row records the mean clock, the power and how often the power cap was the active limit,
and rows from two machines can be read side by side.

    log = ClockLog()
    log.start(); ...timed calls...; log.stop()
    row["gpu_clocks"] = log.summary()   # {"sm_mhz": ..., "power_w": ..., "power_capped": ...} or {"unavailable": why}

Where there is no NVIDIA GPU or no nvidia-smi (CPU runs, TPUs) the summary says so; nothing is invented.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess

import jax

FIELDS = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
# Bits of nvidia-smi's clocks_throttle_reasons.active (NVML's clocks event reasons)
POWER_BITS = 0x4 | 0x80  # software power cap, hardware power brake
THERMAL_BITS = 0x20 | 0x40  # software and hardware thermal slowdown


def parse_samples(lines) -> list[dict]:
    """nvidia-smi `--format=csv,noheader,nounits` lines of FIELDS -> samples; lines that do not parse (a field the
    driver reports as [N/A], a partial last line) are skipped."""
    out = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            out.append({"sm_mhz": float(parts[0]), "power_w": float(parts[1]), "temp_c": float(parts[2]),
                        "reasons": int(parts[3], 16)})
        except ValueError:
            continue
    return out


def summarise(samples: list[dict]) -> dict:
    """Mean/min/max SM clock, mean power, max temperature and the fraction of samples limited by power or heat."""
    if not samples:
        return {"unavailable": "nvidia-smi gave no samples while the calls ran"}
    clk = [s["sm_mhz"] for s in samples]
    return {"samples": len(samples), "sm_mhz": round(statistics.fmean(clk)), "sm_mhz_min": min(clk),
            "sm_mhz_max": max(clk), "power_w": round(statistics.fmean(s["power_w"] for s in samples), 1),
            "temp_c_max": max(s["temp_c"] for s in samples),
            "power_capped": round(sum(bool(s["reasons"] & POWER_BITS) for s in samples) / len(samples), 3),
            "thermal": round(sum(bool(s["reasons"] & THERMAL_BITS) for s in samples) / len(samples), 3)}


def describe(summary: dict | None) -> str:
    """One line for the console."""
    if not summary:
        return "GPU clocks: not recorded"
    if "unavailable" in summary:
        return f"GPU clocks: unavailable ({summary['unavailable']})"
    return (f"GPU clocks while timed: SM {summary['sm_mhz']} MHz mean ({summary['sm_mhz_min']:.0f}-"
            f"{summary['sm_mhz_max']:.0f}), {summary['power_w']:.0f} W, power-capped in "
            f"{100 * summary['power_capped']:.0f}% of {summary['samples']} samples, "
            f"up to {summary['temp_c_max']:.0f} C")


class ClockLog:
    """nvidia-smi in a child process, sampling the first visible GPU every `interval_ms` between start and stop."""

    def __init__(self, interval_ms: int = 250):
        self.interval_ms = interval_ms
        self.proc = None
        self.why_not = None
        self.result = None

    def start(self) -> "ClockLog":
        if jax.default_backend() != "gpu":
            self.why_not = f"the {jax.default_backend()} backend has no NVIDIA GPU"
            return self
        smi = shutil.which("nvidia-smi")
        if smi is None:
            self.why_not = "nvidia-smi is not on PATH"
            return self
        # nvidia-smi numbers GPUs physically; CUDA_VISIBLE_DEVICES' first entry is the one JAX calls device 0
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        self.proc = subprocess.Popen([smi, "-i", first, f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits",
                                      f"--loop-ms={self.interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        return self

    def stop(self) -> dict:
        if self.proc is None:
            self.result = {"unavailable": self.why_not or "the log was never started"}
            return self.result
        self.proc.terminate()
        try:
            out, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        samples = parse_samples(out.splitlines())
        self.result = summarise(samples)
        if not samples and err.strip():
            self.result = {"unavailable": f"nvidia-smi: {err.strip().splitlines()[-1]}"}
        self.proc = None
        return self.result

    def summary(self) -> dict | None:
        return self.result

    def __enter__(self) -> "ClockLog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
