"""Smoke test of benchmarks/vae.py on the CPU: tiny VAE in float32, so the comparison is a real check that the
diffusers AutoencoderKLWan peer (weights via iter_export_vae) computes the same encode/decode as WanVAE, and that the
streaming case decodes every frame."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def test_vae_benchmark_small(tmp_path):
    from benchmarks import vae

    out = tmp_path / "vae.json"
    vae.main(["--small", "--repeats", "1", "--json", str(out)])
    record = json.loads(out.read_text())
    assert set(record["cases"]) == {"encode", "decode", "encode_chunked", "decode_chunked", "stream"}
    assert record["config"]["dtype"] == "float32"
    for name in ("encode", "decode", "encode_chunked", "decode_chunked"):
        case = record["cases"][name]
        jax_res, torch_res = case["jax"], case["torch"]
        assert jax_res["status"] == "ok" and torch_res["status"] == "ok", (name, jax_res, torch_res)
        assert not jax_res["nan"] and not torch_res["nan"], name
        assert jax_res["rel_err"] < 1e-4, (name, jax_res["rel_err"])
        assert len(jax_res["runs_ms"]) == 1 and jax_res["median_ms"] > 0
    stream = record["cases"]["stream"]
    jax_res, torch_res = stream["jax"], stream["torch"]
    assert jax_res["status"] == "ok" and torch_res["status"] == "ok", (jax_res, torch_res)
    for key, latents in (("first", stream["first_latents"]), ("all", stream["latents"])):
        assert jax_res[key]["latents"] == latents
        assert jax_res[key]["frames"] == torch_res[key]["frames"] == 1 + 4 * (latents - 1), key
        assert jax_res[key]["ms"] > 0
    assert stream["frames"] == 1 + 4 * (stream["latents"] - 1)
    assert not jax_res["nan"] and jax_res["rel_err"] < 1e-4, jax_res.get("rel_err")
