"""Summarise a `jax.profiler.trace(..., create_perfetto_trace=True)` capture: device time per kernel name.

Used by `dit_forward.py --profile DIR` to show where a forward spends its time (attention, GEMMs, fusions) without
extra tools on the device machine.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re


def kernel_times(trace_dir: str | pathlib.Path) -> dict[str, tuple[float, int]]:
    """{kernel or op name: (total ms, count)} over the device streams of the newest perfetto trace under trace_dir
    (host threads when there is no device stream, e.g. on CPU)."""
    files = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, n in names.items() if re.search(r"/device:(GPU|TPU)", n)}
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if device_pids and e["pid"] not in device_pids:
            continue
        t = totals[e["name"]]
        t[0] += e["dur"] / 1000.0
        t[1] += 1
    return {k: (v[0], v[1]) for k, v in totals.items()}


CATEGORIES = (  # first match wins
    ("SGM kernels (Pallas Mosaic GPU)", r"sgm|mosaic"),
    ("attention (cuDNN)", r"cudnn|fmha|flash|sdpa|attention"),
    ("GEMM", r"gemm|cutlass|sm90_xmma|cublas|matmul|dot|nvjet"),
    ("copy / slice", r"copy|dynamic.update|dynamic.slice|memcpy|memset|transpose"),
    ("fusion (elementwise / norms / RoPE)", r"fusion|loop_|input_|reduce"),
)


def summarise(trace_dir, top: int = 20) -> str:
    times = kernel_times(trace_dir)
    total = sum(t for t, _ in times.values()) or 1.0
    cats = collections.Counter()
    for name, (ms, _) in times.items():
        cat = next((c for c, pat in CATEGORIES if re.search(pat, name, re.I)), "other")
        cats[cat] += ms
    lines = [f"device time {total:.1f} ms over {sum(n for _, n in times.values())} kernels"]
    lines += [f"  {cat:<40s} {ms:9.2f} ms {100 * ms / total:5.1f}%" for cat, ms in cats.most_common()]
    lines.append(f"  top {top} kernels:")
    for name, (ms, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"    {ms:9.2f} ms {n:5d}x  {name[:110]}")
    return "\n".join(lines)
