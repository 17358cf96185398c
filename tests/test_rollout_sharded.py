"""Sharded rollout (decmem_jax.parallel.rollout) on 4 simulated CPU devices: the tiny DecMem model (2 heads, CFG on,
fp32, reference SGM) prefilled and rolled out by the `lax.scan` segment function on meshes tensor:2, data:2 and
data:2 x tensor:2 gives the one-device latents and cache (<= 1e-5 relative); the cache's per-device bytes halve with
the head split; no collective of the compiled segment function is as large as a layer's history; and bad meshes fail
with one error naming rollout.mesh, before any input or model is loaded.

The multi-device part runs in ONE subprocess (`python tests/test_rollout_sharded.py OUT.npz`): XLA_FLAGS must be set
before jax is imported, and pytest's process has imported it already.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MESHES = {"tensor2": "tensor:2", "data2": "data:2", "data2_tensor2": "data:2,tensor:2"}
C, GRID, CONTEXT, CHUNKS = 2, (8, 8), 2, 3  # chunk latents, latent grid, context latents, generated chunks
TOL = 1e-5


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute")


def _collectives(hlo: str) -> list[int]:
    """Element counts of the results of every cross-device collective in an HLO module's text (an all-reduce or a
    permute could move the history as well as an all-gather)."""
    sizes = []
    ops = "|".join(re.escape(op) for op in COLLECTIVES)
    for line in hlo.splitlines():
        if re.search(rf"\b({ops})(-start)?\(", line):
            shape = re.search(r"=\s*\(?\w+\[([\d,]*)\]", line)
            dims = [int(d) for d in shape.group(1).split(",") if d] if shape else []
            sizes.append(int(np.prod(dims)) if dims else 1)
    return sizes


def _worker(out: str) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, str(ROOT))
    from decmem_jax.parallel.rollout import RolloutMesh
    from decmem_jax.rollout import engine
    from tests.test_rollout import tiny_model

    assert jax.device_count() == 4, jax.devices()
    settings = engine.SamplerSettings(steps=1, solver="euler", guidance=3.0)  # one CFG forward + the commit
    rng = np.random.default_rng(0)
    context = np.asarray(rng.standard_normal((1, 5, 64)), np.float32)
    ctx_latents = np.asarray(rng.standard_normal((1, CONTEXT, *GRID, 16)), np.float32)
    actions = np.asarray(rng.integers(0, 3, (1, 1 + 4 * (CONTEXT + CHUNKS * C - 1), 8)), np.int32)
    arrays = {}

    base = tiny_model()

    def run(name, placement):
        model = nnx.clone(base)  # building the model is slow on CPU; the same weights for every mesh
        cond = model.embed_conditioning(jnp.asarray(actions))  # [1, CONTEXT + CHUNKS*C, dim]
        conds = cond[:, CONTEXT:].reshape(1, CHUNKS, C, -1).transpose(1, 0, 2, 3)
        noises = jnp.stack([engine.chunk_noise(0, i, (1, C, *GRID, 16)) for i in range(CHUNKS)])
        cache = model.init_cache(1, CONTEXT + CHUNKS * C, GRID)
        arrays[f"{name}/cache_bytes"] = np.asarray([sum(x.nbytes for x in jax.tree.leaves(cache))])
        inputs = (jnp.asarray(context), jnp.asarray(ctx_latents), cond[:, :CONTEXT], noises, conds)
        if placement is not None:
            placement.shard_model(model)
            cache = placement.place_cache(cache)
            inputs = placement.replicate(inputs)
            arrays[f"{name}/cache_bytes"] = np.asarray(sorted(placement.cache_bytes_per_device(cache).values()))
            arrays[f"{name}/q_kernel_shard"] = np.asarray(
                model.blocks.self_attn.q.kernel.get_value().addressable_shards[0].data.shape)
        text, latents, prefix, noises, conds = inputs
        cache = engine.prefill(model, cache, latents, text, prefix, chunk=C, shard=placement)
        # The segment function compiled once, its HLO kept: the compiled stage runs the rollout itself.
        segment = engine.make_segment_fn(settings, shard=placement).lower(model, cache, noises, text, conds).compile()
        arrays[f"{name}/collectives"] = np.asarray(_collectives(segment.as_text()) or [0])
        new, cache = segment(model, cache, noises, text, conds)
        arrays[f"{name}/latents"] = np.asarray(new)
        for field in ("k", "v", "pool"):
            arrays[f"{name}/cache_{field}"] = np.asarray(getattr(cache, field))
        arrays[f"{name}/length"] = np.asarray(cache.length)
        arrays[f"{name}/cache_k_shard"] = np.asarray(cache.k.addressable_shards[0].data.shape)
        arrays[f"{name}/cache_k_spec"] = np.asarray(str(cache.k.sharding.spec if placement else ""))

    run("one", None)
    arrays["layer_history_elems"] = np.asarray(int(np.prod(arrays["one/cache_k"].shape[1:])))
    for name, spec in MESHES.items():
        run(name, RolloutMesh.from_spec(spec, base.cfg, guidance=settings.guidance))
    np.savez(out, **arrays)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("rollout_sharded") / "rollouts.npz"
    # No LLVM optimisation: compiling dominates (about half the time without it); every mesh compiles alike.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_rollout_matches_one_device(results, name):
    ref = results["one/latents"]
    assert ref.shape == (CHUNKS, 1, C, *GRID, 16) and np.isfinite(ref).all() and float(np.abs(ref).max()) > 0.1
    err = float(np.abs(results[f"{name}/latents"] - ref).max()) / float(np.abs(ref).max())
    assert err <= TOL, f"{MESHES[name]}: max relative latent error {err:.3g}"
    assert int(results[f"{name}/length"]) == CONTEXT + CHUNKS * C
    for field in ("k", "v", "pool"):
        a, b = results[f"{name}/cache_{field}"], results[f"one/cache_{field}"]
        assert float(np.abs(a - b).max()) <= TOL * float(np.abs(b).max()), field


def test_cache_is_split_by_heads(results):
    # k [layers, batch, slots, heads, head_dim]: heads on `tensor`, replicated on `data` (both CFG branches read it).
    full = int(results["one/cache_bytes"][0])
    half = (full - 4) // 2 + 4  # k, v and pooled keys halve; `length` (int32 scalar) is replicated
    assert list(results["data2/cache_bytes"]) == [full] * 2
    assert list(results["tensor2/cache_bytes"]) == [half] * 2
    assert list(results["data2_tensor2/cache_bytes"]) == [half] * 4
    assert results["tensor2/cache_k_shard"][3] == results["one/cache_k_shard"][3] // 2
    assert "tensor" in str(results["data2_tensor2/cache_k_spec"])
    assert results["tensor2/q_kernel_shard"][-1] == 256 // 2  # q kernel [layers, embed, heads*head_dim]


@pytest.mark.parametrize("name", list(MESHES))
def test_no_collective_moves_the_history(results, name):
    # One layer's history (keys of every head, [1, slots, heads, head_dim]) is never gathered onto a device: every
    # collective of the compiled segment (all-gathers of the SGM scores, all-reduces of the o/fc2 projections) is
    # far smaller. The one-device program has none at all.
    limit = int(results["layer_history_elems"])
    assert int(results["one/collectives"].max()) == 0
    assert int(results[f"{name}/collectives"].max()) < limit, (name, results[f"{name}/collectives"], limit)


BAD_MESHES = {  # rollout.mesh -> what the one error says (every message names rollout.mesh)
    "fsdp:2": "axis 'fsdp' is not used by the rollout",
    "heads:2": "axis 'heads' is unknown",
    "tensor": "must be AXIS:SIZE",
    "tensor:3": "attention heads (2) are not divisible by tensor=3",
    "data:2 guidance=1": "CFG is off",
    "data:2": "devices do not divide the 1 available",  # the pytest process has one device
}


@pytest.mark.parametrize("case", list(BAD_MESHES))
def test_bad_mesh_is_one_clear_error_before_any_work(tmp_path, case):
    import jax

    from decmem_jax.errors import DecMemError
    from decmem_jax.rollout.__main__ import run
    from tests.test_rollout import tiny_config

    if case == "data:2" and jax.device_count() > 1:
        pytest.skip("needs a single-device process (CPU); the other cases run everywhere")
    spec, _, guidance = case.partition(" guidance=")
    c = tiny_config(mesh=spec, guidance=float(guidance or 3.0))
    # The inputs do not exist: the mesh is checked first, before any input or model is loaded.
    with pytest.raises(DecMemError, match="rollout.mesh") as err:
        run(c, context=str(tmp_path / "missing.mp4"), actions=str(tmp_path / "missing.npz"), num_frames=16,
            out=str(tmp_path / "world.mp4"))
    assert BAD_MESHES[case] in str(err.value)


def test_mesh_given_as_a_mapping_gets_the_same_checks():
    from decmem_jax.models.config import get_config
    from decmem_jax.parallel.rollout import MeshSpecError, RolloutMesh

    cfg = get_config("tiny")
    assert RolloutMesh.from_spec({}, cfg, guidance=3.0) is None
    for spec, says in (({"fsdp": 2}, "axis 'fsdp' is not used by the rollout"), ({"tensor": 0}, "must be AXIS:SIZE"),
                       ({"tensor": 1.5}, "must be AXIS:SIZE")):
        with pytest.raises(MeshSpecError, match="rollout.mesh") as err:
            RolloutMesh.from_spec(spec, cfg, guidance=3.0)
        assert says in str(err.value)


if __name__ == "__main__":
    _worker(sys.argv[1])
