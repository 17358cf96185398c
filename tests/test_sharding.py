"""Sharding: one train step of the tiny stage-3 model on 8 simulated CPU devices with meshes (data, fsdp, tensor,
context) = (8,1,1,1), (2,4,1,1), (2,2,2,1) and (1,2,2,2) (latent frames split over `context`) gives the loss, gradient
norm and updated parameters (AdamW, lr 1e-4) of one device (<= 1e-5); parameters and AdamW moments are really
sharded; a checkpoint saved from one mesh restores onto another. Plus the rule tables' loud failures (unknown logical
axis, parameter without a rule, mesh axis claimed twice, indivisible dimension).

The multi-device part runs in a subprocess (`python tests/test_sharding.py OUT.npz`): XLA_FLAGS must be set before
jax is imported, and pytest's process has imported it already.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MESHES = [(1, 1, 1, 1), (8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2)]  # the last: frames on context
BATCH = 8
TOL = 1e-5


def tiny_config():
    """The tiny stage-3 (memory + conditioning) config whose train step the sharding tests compare across meshes
    (also tests/test_multiprocess.py)."""
    sys.path.insert(0, str(ROOT))
    from configs import train_tiny

    cfg = train_tiny.get_config("decmem")
    # warmup 0: the first step moves every weight by about lr (Adam's first update is ~lr * sign(grad)). lr 1e-4
    # keeps float32 summation-order noise in near-zero gradients under TOL, while a wrong gradient still moves
    # weights by ~1e-4 >> TOL.
    cfg.train.batch, cfg.train.warmup, cfg.train.lr = BATCH, 0, 1e-4
    return cfg


def tiny_batches(cfg):
    """Global batches of BATCH synthetic examples for `cfg` (8x8 latents); the same in every run of one process."""
    from decmem_jax.train import data as data_lib

    return data_lib.SyntheticBatches(BATCH, cfg.data.clip_latents, (8, 8), seed=3)


def _worker(out: str) -> None:
    """One step of the tiny stage-3 (memory + conditioning) model per mesh; writes loss, params and specs."""
    import jax

    from decmem_jax.convert.orbax_io import flatten
    from decmem_jax.parallel import mesh as mesh_lib
    from decmem_jax.train import checkpoint as ckpt_lib
    from decmem_jax.train import data as data_lib
    from decmem_jax.train import loop

    assert jax.device_count() == 8, jax.devices()
    cfg = tiny_config()
    batch = next(tiny_batches(cfg))
    arrays, setups = {}, {}
    for sizes in MESHES:
        name = "x".join(map(str, sizes))
        mesh = mesh_lib.make_mesh(dict(zip(mesh_lib.AXES, sizes)), jax.devices()[:math.prod(sizes)])
        setup = setups[name] = loop.build(cfg, mesh)
        setup.compile(loop.global_shapes(batch, BATCH))
        state = setup.fresh_state()
        state, metrics = setup.step(state, data_lib.to_global(batch, setup.batch_shardings), setup.context)
        arrays[f"{name}/loss"] = np.asarray(metrics["loss"])
        arrays[f"{name}/grad_norm"] = np.asarray(metrics["grad_norm"])
        if name == "2x2x2x1":  # saved sharded, restored below onto another mesh
            ckpt = ckpt_lib.Checkpointer(Path(out).parent / "ckpt", every=1, keep=1, model_config=setup.dit_cfg)
            ckpt.save(1, state, b"{}")
            ckpt.close()
        for path, value in flatten(jax.device_get(state.params)).items():
            arrays[f"{name}/param/{'/'.join(path)}"] = np.asarray(value)
        arrays[f"{name}/latents_shard_shape"] = np.asarray(
            data_lib.to_global(batch, setup.batch_shardings)["latents"].addressable_shards[0].data.shape)
        q = state.params["blocks"]["self_attn"]["q"]["kernel"]
        arrays[f"{name}/q_spec"] = np.asarray(str(q.sharding.spec))
        arrays[f"{name}/q_shard_shape"] = np.asarray(q.addressable_shards[0].data.shape)
        adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
        mu = adam.mu["blocks"]["self_attn"]["q"]["kernel"]
        arrays[f"{name}/q_mu_shard_shape"] = np.asarray(mu.addressable_shards[0].data.shape)
    restored, _ = ckpt_lib.Checkpointer(Path(out).parent / "ckpt", every=1, keep=1).restore(
        1, setups["8x1x1x1"].target())
    flat = flatten(jax.device_get(restored.params))
    arrays["restored_max_diff"] = np.asarray(max(
        float(np.abs(v - arrays[f"2x2x2x1/param/{'/'.join(k)}"]).max()) for k, v in flat.items()))
    np.savez(out, **arrays)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "steps.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.slow
@pytest.mark.parametrize("sizes", MESHES[1:], ids=lambda s: "x".join(map(str, s)))
def test_step_matches_single_device(results, sizes):
    ref, name = "1x1x1x1", "x".join(map(str, sizes))
    assert abs(float(results[f"{name}/loss"]) - float(results[f"{ref}/loss"])) <= TOL
    assert abs(float(results[f"{name}/grad_norm"]) / float(results[f"{ref}/grad_norm"]) - 1) <= TOL
    assert np.isfinite(results[f"{ref}/loss"]) and float(results[f"{ref}/grad_norm"]) > 0
    params = [k.split("/param/", 1)[1] for k in results if k.startswith(f"{ref}/param/")]
    assert any("gate" in p for p in params) and any(p.startswith("conditioning/") for p in params)
    worst = max(float(np.abs(results[f"{name}/param/{p}"] - results[f"{ref}/param/{p}"]).max()) for p in params)
    assert worst <= TOL, f"{name}: max |param difference| {worst:.3g} after one step"


@pytest.mark.slow
def test_parameters_are_sharded(results):
    # q kernel [layers, embed, heads] -> (None, fsdp, tensor): its shards shrink with the mesh.
    assert tuple(results["1x1x1x1/q_shard_shape"]) == (2, 256, 256)
    assert tuple(results["8x1x1x1/q_shard_shape"]) == (2, 256, 256)  # pure data parallelism: replicated
    assert tuple(results["2x4x1x1/q_shard_shape"]) == (2, 64, 256)
    assert tuple(results["2x2x2x1/q_shard_shape"]) == (2, 128, 128)
    assert "fsdp" in str(results["2x2x2x1/q_spec"]) and "tensor" in str(results["2x2x2x1/q_spec"])
    for name in ("2x4x1x1", "2x2x2x1"):  # AdamW moments are sharded like their parameters
        assert tuple(results[f"{name}/q_mu_shard_shape"]) == tuple(results[f"{name}/q_shard_shape"])
    assert tuple(results["1x2x2x2/latents_shard_shape"]) == (4, 4, 8, 8, 16)  # batch on fsdp, frames on context


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(results):
    # Saved from the (2,2,2,1) mesh, restored into the (8,1,1,1) shardings: the same values.
    assert float(results["restored_max_diff"]) == 0.0


# ----- rule tables (one device) -----

def _mesh():
    import jax

    from decmem_jax.parallel import mesh as mesh_lib

    return mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "context": 1}, jax.devices()[:1])


def test_unknown_logical_axis_raises():
    from decmem_jax.parallel import sharding as shd

    with pytest.raises(shd.ShardingError, match="logical axis 'bogus'"):
        shd.logical_to_spec(("batch", "bogus"), _mesh())


def test_parameter_without_rule_raises():
    import jax
    import jax.numpy as jnp

    from decmem_jax.parallel import sharding as shd

    params = {"blocks": {"ffn": {"fc1": {"kernel": jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)}}},
              "mystery": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)}}
    with pytest.raises(shd.ShardingError, match="'mystery/kernel' matches no row of PARAM_RULES"):
        shd.param_shardings(params, _mesh())


def test_mesh_axis_twice_and_indivisible_raise():
    import jax

    from decmem_jax.parallel import sharding as shd
    from decmem_jax.parallel.mesh import make_mesh, mesh_shape

    mesh = _mesh()
    with pytest.raises(shd.ShardingError, match="claimed by both"):
        shd.logical_to_spec(("embed", "embed"), mesh, rules={**shd.LOGICAL_RULES})
    with pytest.raises(ValueError, match="at most one -1"):
        mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown axis"):
        mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="use 4 devices"):
        make_mesh({"data": 4}, jax.devices()[:1])
    fake = type("M", (), {"shape": {"data": 1, "fsdp": 3, "tensor": 1, "context": 1}})()
    with pytest.raises(shd.ShardingError, match="not divisible"):
        shd.logical_to_spec(("layers", "embed"), fake, (2, 256), what="q")


def test_distributed_args_from_environment():
    from decmem_jax.parallel.mesh import distributed_args

    assert distributed_args({}) is None
    assert distributed_args({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4",
                             "JAX_PROCESS_ID": "2"}) == dict(coordinator_address="h0:1234", num_processes=4,
                                                             process_id=2)
    spec = '{"cluster": {"workerpool0": ["a:2222"], "workerpool1": ["b:2222", "c:2222"]}, ' \
           '"task": {"type": "workerpool1", "index": 1}}'
    assert distributed_args({"CLUSTER_SPEC": spec}) == dict(coordinator_address="a:8476", num_processes=3,
                                                            process_id=2)
    assert distributed_args({"SLURM_NTASKS": "2"}) == {}
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        distributed_args({"JAX_COORDINATOR_ADDRESS": "h0:1"})


if __name__ == "__main__":
    _worker(sys.argv[1])
