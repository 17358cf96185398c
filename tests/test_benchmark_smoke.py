"""Smoke tests of the benchmark scripts on the CPU (tiny configs in float32).

benchmarks/dit_forward.py: the comparison is a real check that the diffusers peer (with the KV-cache attention
processor of benchmarks/wan_torch_cache.py) computes the same function as WanDiT's bidirectional forward and
forward_chunk. benchmarks/rollout.py: DecMem and dense chunk steps against prefilled caches run end to end;
benchmarks/rollout_e2e.py: the rollout library path with the VAE, pipelined and not."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest


def test_dit_forward_benchmark_small(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from benchmarks import dit_forward

    out = tmp_path / "dit_forward.json"
    dit_forward.main(["--small", "--attention", "xla", "--repeats", "1", "--json", str(out)])
    record = json.loads(out.read_text())
    assert set(record["cases"]) == {"bidir", "chunk"}
    assert record["config"]["dtype"] == "float32"
    for name, case in record["cases"].items():
        jax_res, torch_res = case["jax"]["xla"], case["torch"]
        assert jax_res["status"] == "ok" and torch_res["status"] == "ok", (name, jax_res, torch_res)
        assert not jax_res["nan"] and not torch_res["nan"], name
        assert jax_res["rel_err"] < 1e-4, (name, jax_res["rel_err"])
        assert len(jax_res["runs_ms"]) == 1 and jax_res["median_ms"] > 0
        assert case["flops"]["total"] > 0
    chunk = record["cases"]["chunk"]
    assert chunk["kv_tokens"] == chunk["tokens"] + chunk["shapes"]["cached_frames"] * chunk["tokens_per_frame"]


def test_rollout_benchmark_small(tmp_path):
    """benchmarks/rollout.py --small as a subprocess (its CLI, a fresh JAX backend): both variants at both history
    lengths finish, the commit advances the cache, outputs are finite and the DecMem/dense ratio is filled in."""
    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "rollout.json"
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "rollout.py"), "--small", "--json", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = {(r["variant"], r["history"]): r for r in record["rows"]}
    assert set(rows) == {(v, h) for v in ("decmem", "dense") for h in (4, 8)}
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row)
        assert not row["nan"], key
        assert row["capacity"] == row["history"] + row["chunk"] and row["steps"] == 2
        assert len(row["runs_s"]) == 2 and row["s_per_chunk"] > 0
        assert row["fps"] == pytest.approx(row["chunk"] * 4 / row["s_per_chunk"], rel=1e-2)
        assert row["gpu_clocks"] == {"unavailable": "the cpu backend has no NVIDIA GPU"}  # said, not invented
    assert rows[("decmem", 8)]["sgm_backend"] == "reference" and rows[("dense", 8)]["sgm_backend"] is None
    assert rows[("dense", 8)]["keys_per_query"] > rows[("dense", 4)]["keys_per_query"]
    assert rows[("decmem", 8)]["decmem_over_dense"] > 0 and rows[("dense", 8)]["decmem_over_dense"] is None
    assert record["setup"]["dtype"] == "float32" and record["jax"]["platform"] == "cpu"


def test_rollout_benchmark_xla_option_sets(tmp_path):
    """--xla-options: the step compiled once per compile-option set and the sets timed interleaved in one case, each
    set's chunk compared with the first's; an unknown option name fails the case with XLA's message naming it."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}

    def run(spec, out):
        cmd = [sys.executable, str(root / "benchmarks" / "rollout.py"), "--small", "--variants", "decmem",
               "--history", "4", "--xla-options", spec, "--json", str(out)]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text())["rows"][0], proc.stdout

    row, stdout = run(";xla_allow_excess_precision=false", tmp_path / "ab.json")
    assert row["status"] == "ok", row
    sets = row["xla_options"]
    assert [o["options"] for o in sets] == [{}, {"xla_allow_excess_precision": False}]
    assert [o["label"] for o in sets] == ["defaults", "xla_allow_excess_precision=false"]
    assert sets[0]["ratio"] == 1.0 and sets[0]["x0_max_diff_rel"] == 0.0
    assert all(len(o["runs_s"]) == 2 and o["s_per_chunk"] > 0 and o["compile_s"] > 0 for o in sets)
    assert sets[1]["x0_max_diff_rel"] < 1e-4  # fp32 here: the option changes rounding at most
    assert row["s_per_chunk"] == sets[0]["s_per_chunk"] and "XLA options" in stdout
    bad, _ = run("xla_no_such_option=1", tmp_path / "bad.json")
    assert bad["status"] == "ERROR" and "xla_no_such_option" in bad["error"], bad


def test_xla_option_sets_syntax():
    """`--xla-options` parsing: typed values, an empty set for XLA's defaults, one error naming each malformed entry."""
    from benchmarks.common import parse_xla_option_sets

    assert parse_xla_option_sets(None) == [{}]
    assert parse_xla_option_sets(";a=true, b=3 ,c=0.5;d=auto") == [{}, {"a": True, "b": 3, "c": 0.5}, {"d": "auto"}]
    for bad, words in (("a", "'a' is not name=value"), ("a=", "not name=value"), ("a=1,a=2", "given twice"),
                       ("a=1;a=1", "appears twice")):
        with pytest.raises(ValueError, match=words):
            parse_xla_option_sets(bad)


def test_rollout_e2e_benchmark_small(tmp_path, monkeypatch):
    """benchmarks/rollout_e2e.py --small: the rollout library path with the VAE decode, pipelined and in the
    unpipelined order, both timed, and the same frames either way (only the order of the work differs). Without
    PyAV, as on the GPU machine (--no-mp4 must not need it), and its model config as a GPU run builds it."""
    import jax

    import decmem_jax
    from benchmarks import rollout, rollout_e2e

    args = rollout_e2e.parse_args([])
    with monkeypatch.context() as m:  # the branch a one-GPU run takes (cuDNN attention, no mesh)
        m.setattr(jax, "default_backend", lambda: "gpu")
        assert rollout.model_config("decmem", args).attention == "cudnn"
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError ...
    monkeypatch.delitem(sys.modules, "decmem_jax.video", raising=False)  # ... and so does importing video again
    monkeypatch.delattr(decmem_jax, "video", raising=False)
    out = tmp_path / "e2e.json"
    record = rollout_e2e.main(["--small", "--chunks", "2", "--rounds", "1", "--no-mp4", "--json", str(out)])
    assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(record["summary"]))
    assert [r["order"] for r in record["rows"]] == ["pipelined", "sequential"]
    assert all(r["status"] == "ok" and len(r["segment_s"]) == 2 for r in record["rows"])
    assert record["summary"]["max_frame_diff"] == 0 and record["summary"]["sequential"]["s_per_chunk"] > 0


def test_trace_summary_annotates_kernels_with_hlo_and_source(tmp_path):
    """`trace_summary.annotate` (`python -m benchmarks.trace_summary TRACE --hlo DUMP`) maps a traced program's
    kernels to their optimised-HLO instructions and to this repository's source lines, on the CPU backend."""
    from benchmarks.trace_summary import annotate

    prog = tmp_path / "prog.py"
    prog.write_text(
        "import sys, jax, jax.numpy as jnp\n"
        "from decmem_jax.models.memory import select_blocks\n"
        "f = jax.jit(lambda q, k: select_blocks(q, k, jnp.ones((1, 1, 64, 256), bool), 8))\n"
        "q, k = jnp.ones((2, 4, 64, 64)), jnp.ones((2, 4, 256, 64))\n"
        "jax.block_until_ready(f(q, k))\n"
        "with jax.profiler.trace(sys.argv[1], create_perfetto_trace=True):\n"
        "    for _ in range(3): jax.block_until_ready(f(q, k))\n")
    env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={tmp_path / 'dump'} --xla_dump_hlo_as_text",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, str(prog), str(tmp_path / "trace")], check=True, env=env, timeout=300)
    text = annotate(tmp_path / "trace", tmp_path / "dump", top=20)
    assert "select_blocks" in text and "memory.py:" in text, text  # a kernel traced back to our source
    assert "fuses:" in text and "op: jit(<lambda>)" in text, text


def test_trace_summary_device_idle_counts_overlaps_once(tmp_path):
    """`trace_summary.device_idle` on a hand-made trace: two overlapping kernels on two streams count once as busy,
    the gaps between kernels are idle, and the ones over 20 us are counted apart (the host's share)."""
    import gzip

    from benchmarks.trace_summary import device_idle, summarise

    meta = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}}]
    kernels = [(0, 10), (5, 20), (22, 30), (80, 100)]  # [start, end) in us: busy 20 + 8 + 20, gaps 2 and 50
    events = meta + [{"ph": "X", "pid": 7, "tid": i % 2, "name": f"k{i}", "ts": a, "dur": b - a}
                     for i, (a, b) in enumerate(kernels)]
    events.append({"ph": "X", "pid": 1, "tid": 0, "name": "host", "ts": 30, "dur": 50})  # not a device event
    (tmp_path / "t").mkdir()
    with gzip.open(tmp_path / "t" / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    idle = device_idle(tmp_path)
    assert idle["span_ms"] == pytest.approx(0.100) and idle["busy_ms"] == pytest.approx(0.048)
    assert idle["idle_ms"] == pytest.approx(0.052) and idle["gaps"] == 2
    assert idle["long_gaps"] == 1 and idle["long_idle_ms"] == pytest.approx(0.050)
    assert "idle 0.1 ms in 2 gaps (1 over 20 us" in summarise(tmp_path)


def test_rollout_child_process_gets_every_option():
    """benchmarks/rollout.py runs each case in a child process (--isolate): the child must be asked for what the
    parent was, option by option (a forgotten --gelu once made a timed A/B compare a case with itself)."""
    from benchmarks import rollout

    argv = ["--steps", "3", "--guidance", "2.5", "--sgm-backend", "reference", "--attention", "xla", "--gelu", "triton",
            "--layer-unroll", "2", "--linear-layout", "row_major", "--memory", "top_k=3,window=6",
            "--repeats", "4", "--warmup", "2", "--seed", "9", "--small", "--profile", "/tmp/p", "--dump", "/tmp/d",
            "--xla-options", ";xla_gpu_enable_cublaslt=true", "--mesh", "data:2"]
    parent = rollout.parse_args(argv + ["--variants", "decmem,dense", "--history", "4,8", "--isolate"])
    child = rollout.parse_args(rollout.child_args(parent) + ["--variants", "dense", "--history", "8", "--no-isolate"])
    skip = {"variants", "history", "isolate", "json"}
    differ = {k for k in vars(parent) if k not in skip and getattr(parent, k) != getattr(child, k)}
    assert not differ, differ


def test_rollout_memory_overrides_build_another_geometry(tmp_path, capsys):
    """--memory sets MemoryConfig fields of the decmem case (a what-if block geometry), recorded in the row; a field
    it does not set is one parse error naming it."""
    from benchmarks import rollout

    record = rollout.main(["--small", "--variants", "decmem", "--history", "4",
                           "--memory", "blocks_per_frame=1,top_k=2",
                           "--repeats", "1", "--no-isolate", "--json", str(tmp_path / "r.json")])
    [row] = record["rows"]
    assert row["status"] == "ok" and row["memory"] == {"blocks_per_frame": 1, "block_slots": 64, "top_k": 2,
                                                       "window": 4}
    with pytest.raises(SystemExit):
        rollout.parse_args(["--small", "--memory", "top_k=2,backend=reference,nope=1"])
    assert "--memory: backend, nope not among the MemoryConfig fields" in capsys.readouterr().err


def test_rollout_rejects_a_layer_unroll_below_one(capsys):
    """--layer-unroll 0 fails at parsing with the option named, instead of being read as "not given"."""
    from benchmarks import rollout

    with pytest.raises(SystemExit):
        rollout.parse_args(["--small", "--layer-unroll", "0"])
    assert "--layer-unroll must be >= 1" in capsys.readouterr().err


def test_guarded_quiet_keeps_the_traceback_for_the_json_not_the_console(capsys):
    """A peer backend that is expected to fail (FlexAttention's are tried in turn) is recorded with its traceback
    in the result, not printed; other failures still print theirs."""
    from benchmarks.common import guarded

    res = guarded(lambda: 1 / 0, quiet=True)
    assert res["status"] == "ERROR" and res["error"].startswith("ZeroDivisionError")
    assert "Traceback" in res["traceback"] and "1 / 0" in res["traceback"]
    assert capsys.readouterr().err == ""
    res = guarded(lambda: 1 / 0)
    assert "traceback" not in res and "ZeroDivisionError" in capsys.readouterr().err


def test_captured_stderr_keeps_the_tail_off_the_console_even_on_failure(capsys):
    """torch inductor's autotune tables (Python-level stderr writes) go to the result's compile_log, last `keep`
    characters, appended across blocks, also when the block raises."""
    from benchmarks.sgm_peers import captured_stderr

    rec = {}
    with captured_stderr(rec, keep=6):
        sys.stderr.write("AUTOTUNE table\n")
    with pytest.raises(RuntimeError), captured_stderr(rec, keep=6):
        sys.stderr.write("second\n")
        raise RuntimeError("backend failed")
    assert rec["compile_log"] == "table\necond\n"
    assert capsys.readouterr().err == ""
