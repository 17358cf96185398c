"""Smoke test of benchmarks/dit_forward.py on the CPU: tiny config in float32, so the comparison is a real check that
the diffusers peer (with the KV-cache attention processor of benchmarks/wan_torch_cache.py) computes the same function
as WanDiT's bidirectional forward and forward_chunk."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def test_dit_forward_benchmark_small(tmp_path):
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
