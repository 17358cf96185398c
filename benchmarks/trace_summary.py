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


def _device_events(trace_dir: str | pathlib.Path) -> list[dict]:
    """The complete ("X") events of the device streams of the newest perfetto trace under trace_dir (host threads
    when there is no device stream, e.g. on CPU)."""
    files = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, n in names.items() if re.search(r"/device:(GPU|TPU)", n)}
    return [e for e in events if e.get("ph") == "X" and "dur" in e and (not device_pids or e["pid"] in device_pids)]


def kernel_times(trace_dir: str | pathlib.Path) -> dict[str, tuple[float, int]]:
    """{kernel or op name: (total ms, count)} over the device streams of the newest perfetto trace under trace_dir
    (host threads when there is no device stream, e.g. on CPU)."""
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in _device_events(trace_dir):
        t = totals[e["name"]]
        t[0] += e["dur"] / 1000.0
        t[1] += 1
    return {k: (v[0], v[1]) for k, v in totals.items()}


def device_idle(trace_dir: str | pathlib.Path, long_us: float = 20.0) -> dict[str, float]:
    """How busy the device was between its first and last kernel: span, busy (the union of the kernels' intervals,
    so concurrent streams count once), idle = span - busy, the number of idle gaps and the part of the idle time in
    gaps longer than `long_us` (where the device waited for the host: launches, synchronisation), all in ms."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in _device_events(trace_dir))
    if not spans:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "gaps": 0, "long_gaps": 0, "long_idle_ms": 0.0}
    busy, gaps, end = 0.0, [], None
    for start, stop in spans:
        if end is None or start > end:
            if end is not None:
                gaps.append(start - end)
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    span = end - spans[0][0]
    long = [g for g in gaps if g > long_us]
    return {"span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_ms": (span - busy) / 1e3, "gaps": len(gaps),
            "long_gaps": len(long), "long_idle_ms": sum(long) / 1e3}


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
    idle = device_idle(trace_dir)
    lines = [f"device time {total:.1f} ms over {sum(n for _, n in times.values())} kernels",
             f"  span {idle['span_ms']:.1f} ms from first to last kernel: busy {idle['busy_ms']:.1f}, idle "
             f"{idle['idle_ms']:.1f} ms in {idle['gaps']} gaps ({idle['long_gaps']} over 20 us: "
             f"{idle['long_idle_ms']:.1f} ms)"]
    lines += [f"  {cat:<40s} {ms:9.2f} ms {100 * ms / total:5.1f}%" for cat, ms in cats.most_common()]
    lines.append(f"  top {top} kernels:")
    for name, (ms, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"    {ms:9.2f} ms {n:5d}x  {name[:110]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- kernels -> HLO instructions -> source
def _stack_tables(text: str):
    """The FileNames / FunctionNames / FileLocations / StackFrames tables of an HLO text dump -> a function from a
    stack_frame_id to its frames in this repository ("file.py:line(function)", innermost first)."""
    def section(name, pattern):
        m = re.search(r"^" + name + r"\n(.*?)\n\n", text, re.M | re.S)
        return re.findall(pattern, m.group(1), re.M) if m else []

    files = {int(i): f for i, f in section("FileNames", r'^(\d+) "(.*)"$')}
    funcs = {int(i): f for i, f in section("FunctionNames", r'^(\d+) "(.*)"$')}
    locs = {int(i): (int(f), int(g), int(n)) for i, f, g, n in section(
        "FileLocations", r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)")}
    frames = {int(i): (int(loc), int(parent)) for i, loc, parent in section(
        "StackFrames", r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)")}

    def ours(frame_id: int, depth: int = 4) -> str:
        out, seen = [], set()
        while frame_id in frames and frame_id not in seen and len(out) < depth:
            seen.add(frame_id)
            loc, frame_id = frames[frame_id]
            f, g, line = locs[loc]
            if re.search(r"decmem_jax|pallas_kernels|benchmarks", files[f]):
                out.append(f"{files[f].rsplit('/', 1)[-1]}:{line}({funcs[g]})")
        return " < ".join(out)

    return ours


def annotate(trace_dir, dump_dir, top: int = 40) -> str:
    """The top kernels of a trace, each with the optimised-HLO instruction it runs (output shape, op_name, the
    repository's source lines of its root, the ops fused into it), read from an XLA dump of the same program
    (`XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"`). Kernels of XLA fusions are named after their
    instruction (`input_transpose_fusion_5` is `%input_transpose_fusion.5`); library kernels (cuBLAS, cuDNN, Pallas)
    have no instruction of that name and are listed bare. The three largest modules of the dump are searched."""
    dumps = sorted(pathlib.Path(dump_dir).glob("*after_optimizations.txt"), key=lambda p: -p.stat().st_size)[:3]
    if not dumps:
        raise FileNotFoundError(f"no *after_optimizations.txt under {dump_dir}")
    modules = [(text, _stack_tables(text)) for text in (p.read_text() for p in dumps)]
    times = kernel_times(trace_dir)
    lines = [f"device time {sum(t for t, _ in times.values()):.1f} ms; HLO modules searched: "
             + ", ".join(p.name for p in dumps)]
    for name, (ms, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {ms:9.2f} ms {n:5d}x  {name[:100]}")
        alt = re.sub(r"_(\d+)$", r".\1", name)
        for text, ours in modules:
            m = re.search(r"^\s*(?:ROOT )?%?(?:" + re.escape(name) + "|" + re.escape(alt) + r") = ([^\n]*)$", text,
                          re.M)
            if not m:
                continue
            inst = m.group(1)
            kind = re.search(r"kind=(\w+)", inst)
            op = re.search(r'op_name="([^"]*)"', inst)
            frame = re.search(r"stack_frame_id=(\d+)", inst)
            fused = ""
            calls = re.search(r"calls=%([\w.\-]+)", inst)
            body = calls and re.search(r"^%?" + re.escape(calls.group(1)) + r" .*?\{\n(.*?)\n\}", text, re.M | re.S)
            if body:
                ops = collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", body.group(1)))
                fused = " ".join(f"{k}x{v}" if v > 1 else k for k, v in ops.most_common(12))
            lines.append(f"             {re.split(r' [a-z-]+[(]', inst)[0][:140]}  {kind.group(1) if kind else ''}")
            for label, value in (("op", op and op.group(1)[-150:]), ("src", frame and ours(int(frame.group(1)))),
                                 ("fuses", fused)):
                if value:
                    lines.append(f"             {label}: {value}")
            break
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Where a traced program's device time goes, by kernel; with --hlo, each "
                                            "kernel's HLO instruction and source lines from an XLA dump of it.")
    p.add_argument("trace_dir", help="a jax.profiler.trace(..., create_perfetto_trace=True) directory (e.g. the one "
                                     "that --profile of train_step.py / rollout.py writes)")
    p.add_argument("--hlo", default=None, metavar="DUMP_DIR",
                   help='the XLA dump of the same run: XLA_FLAGS="--xla_dump_to=DUMP_DIR --xla_dump_hlo_as_text"')
    p.add_argument("--top", type=int, default=40, help="kernels listed (default 40)")
    a = p.parse_args()
    print(annotate(a.trace_dir, a.hlo, a.top) if a.hlo else summarise(a.trace_dir, a.top))
