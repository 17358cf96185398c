"""Helpers shared by the benchmark scripts: timing, OOM-tolerant cases, device/version info, the JSON record."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import statistics
import sys
import time
import traceback

import jax


def sample_ms(call, sync, inner: int = 1):
    """One timed sample: `inner` calls back to back, one sync at the end; returns (last output, ms per call). Calls
    are dispatched asynchronously, so for inner > 1 and a call of about a millisecond this measures the device's
    time rather than the host's round trip per call (dispatch, sync), which a model calling the op inside a jit
    never pays."""
    t0 = time.perf_counter()
    for _ in range(inner):
        out = call()
    out = sync(out)
    return out, (time.perf_counter() - t0) * 1e3 / inner


def timed(call, sync, warmup: int, repeats: int, inner: int = 1, during=None):
    """Runs `call` warmup times (the first is timed separately: it includes compilation), then `repeats` timed
    samples of `inner` calls each (`sample_ms`). `during` (e.g. a `clocks.ClockLog`) is started just before the
    timed samples and stopped after them."""
    t0 = time.perf_counter()
    out = sync(call())
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(max(warmup - 1, 0)):
        out = sync(call())
    runs = []
    if during is not None:
        during.start()
    try:
        for _ in range(repeats):
            out, ms = sample_ms(call, sync, inner)
            runs.append(ms)
    finally:
        if during is not None:
            during.stop()
    return out, {"first_call_ms": first_ms, "runs_ms": runs, "median_ms": statistics.median(runs),
                 "min_ms": min(runs)}


def is_oom(e: BaseException) -> bool:
    msg = str(e)
    return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower() or type(e).__name__ == "OutOfMemoryError"


def guarded(fn, *, quiet: bool = False):
    """fn() -> result dict; OOM and other failures become {"status": ...} instead of ending the benchmark. The
    traceback of a failure is printed, or with quiet=True (an expected failure, e.g. a peer's backend that is tried
    and then replaced by the next one) kept in the result's "traceback" for the JSON, off the console."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        if is_oom(e):
            return {"status": "OOM", "error": str(e).splitlines()[0][:300]}
        res = {"status": "ERROR", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        if quiet:
            return {**res, "traceback": traceback.format_exc()}
        traceback.print_exc()
        return res
    finally:
        gc.collect()


def jax_peak_gb():
    """Peak bytes in use on JAX's first device since start (GPU allocator statistics; None where unavailable)."""
    try:
        return round(jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**30, 2)
    except Exception:  # noqa: BLE001
        return None


def jax_block(x):
    return jax.block_until_ready(x)


def jax_info():
    dev = jax.devices()[0]
    info = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
            "jaxlib": getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__,
            "flax": __import__("flax").__version__,
            "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}
    # the SGM kernel's A/B switches (pallas_kernels/sgm/mosaic_gpu.py), so that a record says which variant it timed
    info.update({k: v for k, v in os.environ.items() if k.startswith("SGM_MGPU_")})
    try:
        from jax._src.lib import cuda_versions
        if cuda_versions is not None:
            info["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception:  # noqa: BLE001
        pass
    return info


def write_record(path, record: dict) -> None:
    """Writes the benchmark's JSON record atomically (temp file + rename) and says where."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")


def run_child(script, argv, *, cwd) -> tuple[dict | None, int]:
    """Runs `python script *argv --json TMP` in a child process (a fresh GPU allocator, so the JSON's peak memory is
    that case's own) and returns (its JSON record or None, its exit code)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "case.json"
        proc = subprocess.run([sys.executable, str(script), *argv, "--json", str(out)], cwd=str(cwd))
        return (json.loads(out.read_text()) if out.exists() else None), proc.returncode


def child_failure(returncode: int) -> dict:
    """The status record of a child that wrote no result (a SIGKILL is the OOM killer's)."""
    return {"status": "OOM" if returncode in (-9, 137) else "ERROR",
            "error": f"child exited with code {returncode} without a result (see its output above)"}


def parse_scalar(value: str):
    """A command-line value: true/false -> bool, an integer -> int, another number -> float, else the string."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_fields(text: str, flag: str) -> dict:
    """'a=1,b=x,c=false' -> {'a': 1, 'b': 'x', 'c': False} (`parse_scalar`): a benchmark's config overrides."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {flag} {item!r}: expected key=value")
        out[key.strip()] = parse_scalar(value)
    return out


def parse_xla_option_sets(spec: str | None) -> list[dict]:
    """`--xla-options` of the benchmarks: compile-option sets (XLA DebugOptions fields, e.g.
    `xla_allow_excess_precision`) separated by ';', each a comma list of name=value, compared in one run; an empty set
    is XLA's defaults: ";xla_gpu_triton_gemm_any=true" = [defaults, Triton GEMMs allowed]. Values true/false become
    bools, integers ints, other numbers floats, anything else stays a string (XLA rejects a wrongly typed value).
    None = [{}], XLA's defaults only. Raises ValueError naming the malformed entry."""
    if spec is None:
        return [{}]
    sets = []
    for part in spec.split(";"):
        options = {}
        for item in filter(None, (s.strip() for s in part.split(","))):
            name, sep, value = (s.strip() for s in item.partition("="))
            if not sep or not name or not value:
                raise ValueError(f"--xla-options: {item!r} is not name=value")
            if name in options:
                raise ValueError(f"--xla-options: {name!r} given twice in one set ({part.strip()!r})")
            options[name] = parse_scalar(value)
        sets.append(options)
    if len({json.dumps(s, sort_keys=True) for s in sets}) != len(sets):
        raise ValueError(f"--xla-options: the same option set appears twice in {spec!r}")
    return sets


def check_xla_options(sets: list[dict]) -> None:
    """Compiles a trivial program with each option set on the default backend, so that an unknown option name or a
    badly typed value fails in seconds with XLA's message (which names the option), before any model is built."""
    import jax.numpy as jnp

    lowered = jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32))
    for options in sets:
        try:
            lowered.compile(compiler_options=options or None)
        except Exception as e:  # noqa: BLE001  (XLA raises JaxRuntimeError INVALID_ARGUMENT)
            raise ValueError(f"--xla-options {options}: {e}") from None


def xla_options_label(options: dict) -> str:
    return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()) or "defaults"
