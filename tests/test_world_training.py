"""The world-model recipe's new pieces on the CPU: VAE training (exact resume), export to a converted checkpoint
(latent statistics, SHA-256 checked on load, clear errors for the wrong kind of checkpoint and corrupt files), the
held-out loss of DiT training, and the world-tiny configs."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import train_tiny, world_tiny
from decmem_jax import weights
from decmem_jax.convert.orbax_io import ConvertError, flatten, restore_params
from decmem_jax.data import build_csv, generate_world
from decmem_jax.train import export as export_lib
from decmem_jax.train import loop
from decmem_jax.train import vae as vae_train
from decmem_jax.train.data import write_latent_clips
from decmem_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def clips_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world.generate(root, clips=3, frames=21, size=(32, 32), seed=3, split="training", progress=False)
    build_csv.build_csv(root, splits=("training",))
    return str(root / "train.csv")


def _vae_cfg(csv: str, steps: int):
    c = world_tiny.vae_config()
    c.model.overrides = {"base_dim": 8}
    c.data.update(csv=csv, clip_frames=5, size=(32, 32))
    # A constant schedule: a run stopped at step 4 and resumed to 6 sees the same learning rates as one run to 6.
    c.train.update(steps=steps, batch=2, warmup=1, schedule="constant", log_every=1, progress=False)
    c.checkpointing.update(every=2, async_save=False)
    return c


def _params(workdir):
    from flax import nnx

    from decmem_jax.models.vae import WanVAE, VAEConfig

    step_dir = weights.resolve_params_dir(workdir)
    cfg = VAEConfig.from_json(weights.stored_model_config(step_dir))
    model = restore_params(step_dir, nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


@pytest.mark.slow
def test_vae_training_learns_resumes_exactly_and_exports(clips_csv, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert vae_train.run(_vae_cfg(clips_csv, 6), straight) == 0
    assert vae_train.run(_vae_cfg(clips_csv, 4), split) == 0
    with pytest.raises(vae_train.VaeTrainError, match="--resume"):
        vae_train.run(_vae_cfg(clips_csv, 6), split)
    assert vae_train.run(_vae_cfg(clips_csv, 6), split, resume=True) == 0
    a, b = _params(straight), _params(split)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # bitwise: resume is exact
    logged = read_metrics(straight)
    assert {"loss", "l1", "lpips", "kl", "psnr"} <= set(logged[6])
    assert logged[6]["loss"] < logged[1]["loss"]

    out = tmp_path / "vae_export"
    export_lib.export(straight, out, stats_csv=clips_csv, progress=False)
    from decmem_jax.convert.dit import load_dit
    from decmem_jax.convert.vae import load_vae

    vae = load_vae(out)
    assert vae.cfg.param_dtype == "bfloat16" and vae.cfg.latents_std != (1.0,) * 16
    record = json.loads((out / "conversion.json").read_text())
    assert record["model"] == "vae" and len(record["params_sha256"]) == 64 and record["step"] == 6
    with pytest.raises(ConvertError, match="converted VAE checkpoint"):
        load_dit(out)
    with pytest.raises(ConvertError, match="--stats-csv"):
        export_lib.export(straight, tmp_path / "no_stats", progress=False)
    assert not (tmp_path / "no_stats").exists()
    # A corrupt weight file: one error naming the checkpoint, nothing loaded.
    data_file = next(p for p in sorted((out / "params").rglob("*")) if p.is_file() and p.stat().st_size > 4096)
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    data_file.write_bytes(bytes(raw))
    with pytest.raises(ConvertError, match=str(out)):
        load_vae(out)


def test_vae_config_errors_name_the_field(tmp_path, clips_csv):
    c = _vae_cfg(clips_csv, 2)
    c.data.clip_frames = 6
    with pytest.raises(vae_train.ConfigError, match="data.clip_frames=6"):
        vae_train.run(c, tmp_path / "run")
    c = _vae_cfg(str(tmp_path / "missing.csv"), 2)
    with pytest.raises(vae_train.ConfigError, match="missing.csv"):
        vae_train.run(c, tmp_path / "run")


@pytest.mark.slow
def test_dit_export_round_trip_and_held_out_loss(tmp_path):
    csv = write_latent_clips(tmp_path / "latents", clips=2, latents=8, hw=(8, 8), seed=0)
    cfg = train_tiny.get_config("dense_short")
    cfg.data.source, cfg.data.csv, cfg.data.eval_csv = "latents", csv, csv
    cfg.train.update(steps=2, progress=False, eval_every=1)
    cfg.checkpointing.update(every=2, async_save=False)
    assert loop.run(cfg, tmp_path / "run") == 0
    logged = read_metrics(tmp_path / "run")
    assert "eval_loss" in logged[1] and "eval_loss" in logged[2]
    out = export_lib.export(tmp_path / "run", tmp_path / "dit", progress=False)
    from decmem_jax.convert.dit import load_dit

    model = load_dit(out)
    stored = _flat(weights.load_model(tmp_path / "run"))
    exported = _flat(model)
    assert stored.keys() == exported.keys()
    for k in stored:  # bf16 storage: the exported weights are the trained ones rounded to bfloat16
        np.testing.assert_array_equal(exported[k], stored[k].astype(jax.numpy.bfloat16))
    assert model.cfg.conditioning.param_dtype == "bfloat16" and model.cfg.remat == "none"


def _flat(model):
    from flax import nnx

    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


@pytest.mark.parametrize("stage", ["vae", "dense_short", "dense_long", "decmem"])
def test_world_tiny_configs_build(stage):
    c = world_tiny.get_config(stage)
    if stage == "vae":
        cfg = vae_train.vae_config(c)
        assert cfg.base_dim == 32 and cfg.z_dim == 16 and cfg.spatial_factor == 8 and cfg.temporal_factor == 4
        return
    from decmem_jax.run_config import dit_config

    cfg = dit_config(c)
    assert (cfg.dim, cfg.num_layers, cfg.text_len) == (256, 8, 8)
    assert (cfg.memory is not None) == (stage == "decmem")
    assert c.rollout.shift == c.train.sigma_shift  # the sampler's schedule is the one trained on
    from decmem_jax.run_config import runtime_overrides

    infer = dit_config(c, inference=True)  # what a rollout loads its checkpoint with
    assert (infer.remat, infer.linear_layout) == ("none", "xla") and cfg.linear_layout == "auto"
    assert runtime_overrides(infer)["linear_layout"] == "xla"
    with pytest.raises(ValueError, match="unknown stage"):
        world_tiny.get_config("nope")


def test_shipped_weights_are_the_world_tiny_architecture():
    """The files in weights/world_tiny hold the models configs/world_tiny.py describes."""
    from decmem_jax.convert.dit import read_config as read_dit_config
    from decmem_jax.convert.vae import read_vae_config
    from decmem_jax.rollout.load import architecture_differences
    from decmem_jax.run_config import dit_config

    root = Path(__file__).resolve().parents[1] / world_tiny.WEIGHTS
    for stage, name in (("decmem", "decmem"), ("dense_long", "dense")):
        stored = read_dit_config(root / name)
        assert architecture_differences(stored, dit_config(world_tiny.get_config(stage))) == []
        assert (stored.memory is not None) == (stage == "decmem")
    assert read_vae_config(root / "vae").base_dim == 32


def test_context_noise_corrupts_only_the_history_copy_per_chunk():
    import jax.numpy as jnp

    from decmem_jax.train.objective import Objective, sample_noise

    z0 = jax.random.normal(jax.random.key(0), (3, 8, 4, 4, 16))
    plain = sample_noise(jax.random.key(1), z0, Objective(chunk=4))
    noised = sample_noise(jax.random.key(1), z0, Objective(chunk=4, context_noise=0.2))
    assert plain["clean_timesteps"] is None and np.array_equal(plain["clean"], z0)
    for k in ("noisy", "target", "timesteps", "drop"):  # the noisy copy's draws do not depend on the option
        np.testing.assert_array_equal(plain[k], noised[k])
    level = np.asarray(noised["clean_timesteps"]) / 1000.0
    assert level.shape == (3, 8) and (level >= 0).all() and (level <= 0.2).all() and level.std() > 0
    assert (level[:, :4] == level[:, :1]).all() and (level[:, 4:] == level[:, 4:5]).all()  # constant per chunk
    eps = (np.asarray(noised["clean"]) - (1 - level[..., None, None, None]) * np.asarray(z0)) / np.maximum(
        level[..., None, None, None], 1e-6)
    assert abs(float(eps.std()) - 1.0) < 0.1  # the history is z0 mixed with unit Gaussian noise at that level
    with pytest.raises(ValueError, match="context_noise"):
        Objective(context_noise=1.0)


def test_teacher_forcing_clean_timesteps_zero_is_the_default():
    import jax.numpy as jnp
    from flax import nnx

    from decmem_jax.models.config import get_config
    from decmem_jax.models.dit import WanDiT

    model = WanDiT(get_config("tiny", dtype="float32"), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    clean, noisy = (jnp.asarray(rng.standard_normal((1, 4, 4, 4, 16)), jnp.float32) for _ in range(2))
    t = jnp.full((1, 4), 500.0)
    ctx = jnp.zeros((1, 4, 64))
    a = model.teacher_forcing(clean, noisy, t, ctx, chunk_size=2)
    b = model.teacher_forcing(clean, noisy, t, ctx, chunk_size=2, clean_timesteps=jnp.zeros((1, 4)))
    c = model.teacher_forcing(clean, noisy, t, ctx, chunk_size=2, clean_timesteps=jnp.full((1, 4), 100.0))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a[:, 2:] - c[:, 2:]).max()) > 1e-4  # the second chunk sees the history at another time
    np.testing.assert_allclose(a[:, :2], c[:, :2], atol=1e-6)  # the first chunk has no history
