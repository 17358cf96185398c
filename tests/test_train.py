"""Three-stage training on the CPU with the tiny configs (configs/train_tiny.py: dim 256, 2 layers, 8 latents of 8x8
in 2 chunks of 4, batch 2) on a generated latent cache of 2 clips, so every batch is the same two clips (overfitting
a fixed batch):

- stage 1 (dense_short) starts from a converted-checkpoint directory of a random tiny Wan DiT, stage 2 (dense_long)
  from stage 1's workdir, stage 3 (decmem) from stage 2's; 50 steps each; in each, the loss on the training clips
  (averaged over 16 fixed noise draws) drops to at most LOSS_RATIO[stage] of its value at the stage's start;
- new parameters keep their zero init, so a later stage's model at step 0 computes exactly the earlier one's outputs:
  stage 1 with new conditioning == the converted dense DiT, stage 3 with new memory gate == trained stage 2 (the ALM
  window of 8 latents covers the whole 8-latent clip, so ALM-only attention is the dense block-causal attention);
- the trained checkpoint loads for inference (`weights.load_model`, `orbax_io.restore_params`);
- a non-finite loss stops the run with a clear error and keeps the last good checkpoint;
- benchmarks/train_step.py --small runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import train_tiny
from decmem_jax import weights
from decmem_jax.convert.orbax_io import flatten, restore_params, write_checkpoint
from decmem_jax.models.config import get_config
from decmem_jax.models.dit import WanDiT
from decmem_jax.parallel import mesh as mesh_lib
from decmem_jax.train import checkpoint as ckpt_lib
from decmem_jax.train import loop
from decmem_jax.train import state as state_lib
from decmem_jax.train.data import Batches, write_latent_clips
from decmem_jax.train.metrics import read_metrics
from decmem_jax.train.objective import loss_fn, sample_noise

STEPS = 50
# Loss on the training clips after 50 steps <= ratio x the loss at the stage's start. Later stages start from the
# previous stage's (already fitted) weights, so they have less left to gain.
LOSS_RATIO = {"dense_short": 0.6, "dense_long": 0.9, "decmem": 0.95}  # measured: 0.43, 0.83, 0.89
EVAL_DRAWS = 16
SAME_TOL = 1e-5  # relative max difference of "identical" outputs (float32, different attention code paths)


def _cfg(stage: str, csv: str, init_from: str, **train):
    cfg = train_tiny.get_config(stage)
    cfg.init_from = init_from
    cfg.data.source, cfg.data.csv = "latents", csv
    cfg.train.steps, cfg.train.progress = STEPS, False
    cfg.checkpointing.every = 25
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    return write_latent_clips(tmp_path_factory.mktemp("latents"), clips=2, latents=8, hw=(8, 8), seed=0)


@pytest.fixture(scope="module")
def wan_ckpt(tmp_path_factory):
    """What `python -m decmem_jax.convert dit` writes, for a random tiny dense DiT."""
    cfg = get_config("tiny", dtype="float32")
    model = WanDiT(cfg, rngs=nnx.Rngs(7))
    flat = {tuple(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}
    dst = tmp_path_factory.mktemp("wan") / "wan_tiny"
    return write_checkpoint(dst, flat, model="dit", config_json=cfg.to_json(), record={"source": "random tiny"})


@pytest.fixture(scope="module")
def stages(tmp_path_factory, csv, wan_ckpt):
    root = tmp_path_factory.mktemp("runs")
    init = str(wan_ckpt)
    workdirs = {}
    for stage in ("dense_short", "dense_long", "decmem"):
        workdirs[stage] = root / stage
        assert loop.run(_cfg(stage, csv, init), workdirs[stage]) == 0
        init = str(workdirs[stage])
    workdirs["init_from"] = {"dense_short": wan_ckpt, "dense_long": workdirs["dense_short"],
                             "decmem": workdirs["dense_long"]}
    return workdirs


_EVAL_FNS = {}


def _eval_loss(setup, params, batch) -> float:
    """The objective on a fixed batch, averaged over EVAL_DRAWS fixed noise draws (sigma, eps, CFG drop): a
    low-variance measure of how well `params` fit the training clips."""
    obj = state_lib.objective(setup.cfg)
    key = (setup.graphdef, obj)
    if key not in _EVAL_FNS:  # one compilation per model structure (the two dense stages share it)
        _EVAL_FNS[key] = jax.jit(lambda p, b, c, keys: jnp.mean(jax.lax.map(
            lambda k: loss_fn(state_lib.merge(setup.graphdef, p), b, c, k, obj)[0], keys)))
    keys = jax.random.split(jax.random.key(123), EVAL_DRAWS)
    return float(_EVAL_FNS[key](params, {k: jnp.asarray(v) for k, v in batch.items()}, setup.context, keys))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dense_short", "dense_long", "decmem"])
def test_each_stage_trains(stages, csv, stage):
    workdir = stages[stage]
    metrics = read_metrics(workdir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert all(np.isfinite(metrics[s]["loss"]) and np.isfinite(metrics[s]["grad_norm"]) for s in metrics)
    assert ckpt_lib.complete_steps(workdir / ckpt_lib.CKPT_DIR) == [25, 50]
    assert (workdir / "config.yaml").read_text().startswith(f"stage: {stage}")
    flops = json.loads((workdir / "flops.json").read_text())
    assert flops["train_step"] > 0 and "3 * forward" in flops["formula"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

    # The loss on the (fixed) training clips, at the stage's start (init_from + new zero-init parameters) and end.
    cfg = _cfg(stage, csv, str(stages["init_from"][stage]))
    setup, start = _setup_at_step0(cfg)
    end = nnx.to_pure_dict(nnx.state(weights.load_model(workdir), nnx.Param))
    batch, _ = next(Batches(cfg))
    before, after = _eval_loss(setup, start, batch), _eval_loss(setup, end, batch)
    print(f"{stage}: loss on the training clips {before:.4f} -> {after:.4f} ({after / before:.3f} x)")
    assert after <= LOSS_RATIO[stage] * before, f"{stage}: loss {before:.4f} -> {after:.4f}, need <= " \
                                                f"{LOSS_RATIO[stage]} x"


def _inputs(cfg, csv):
    """A batch of the data and fixed noise for comparing two models on identical inputs."""
    batch, _ = next(Batches(cfg))
    n = sample_noise(jax.random.key(5), jnp.asarray(batch["latents"]), state_lib.objective(cfg))
    ctx = jnp.zeros((batch["latents"].shape[0], 512, 64), jnp.float32)
    return dict(clean=jnp.asarray(batch["latents"]), noisy=n["noisy"], timesteps=n["timesteps"], context=ctx,
                actions=jnp.asarray(batch["actions"]), poses=jnp.asarray(batch["poses"]))


def _setup_at_step0(cfg):
    """The stage's setup and the parameters it starts from: fresh init, then init_from's parameters."""
    mesh = mesh_lib.make_mesh(dict(cfg.mesh), jax.devices()[:1])
    setup = loop.build(cfg, mesh)
    return setup, ckpt_lib.load_init_params(cfg.init_from, setup.fresh_state(), setup.shardings).params


def _model_at_step0(cfg):
    setup, params = _setup_at_step0(cfg)
    return state_lib.merge(setup.graphdef, params), params


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _tf(model, x, conditioned=True):
    kw = dict(actions=x["actions"], poses=x["poses"]) if conditioned else {}
    return nnx.jit(lambda m, c, n, t, ctx, kw: m.teacher_forcing(c, n, t, ctx, chunk_size=4, **kw))(
        model, x["clean"], x["noisy"], x["timesteps"], x["context"], kw)


@pytest.mark.slow
def test_stage3_from_stage2_is_identical_at_step0(stages, csv):
    cfg = _cfg("decmem", csv, str(stages["dense_long"]))
    stage3, params = _model_at_step0(cfg)
    gates = [v for p, v in flatten(params).items() if "gate" in p]
    assert gates and all(float(jnp.abs(g).max()) == 0.0 for g in gates)
    stage2 = weights.load_model(stages["dense_long"])  # trained: conditioning is no longer zero
    assert stage2.cfg.memory is None and stage3.cfg.memory is not None
    x = _inputs(cfg, csv)
    ref = _tf(stage2, x)
    assert _rel(_tf(stage3, x), ref) <= SAME_TOL


@pytest.mark.slow
def test_stage1_from_converted_wan_is_identical_at_step0(wan_ckpt, csv):
    from decmem_jax.convert.dit import load_dit

    cfg = _cfg("dense_short", csv, str(wan_ckpt))
    stage1, params = _model_at_step0(cfg)
    assert float(jnp.abs(params["conditioning"]["action_mlp"]["linear_2"]["kernel"]).max()) == 0.0
    x = _inputs(cfg, csv)
    assert _rel(_tf(stage1, x), _tf(load_dit(wan_ckpt), x, conditioned=False)) <= SAME_TOL


@pytest.mark.slow
def test_trained_checkpoint_loads_for_inference(stages):
    workdir = stages["decmem"]
    model = weights.load_model(workdir)  # latest step of the workdir
    assert model.cfg.memory is not None and model.cfg.conditioning is not None
    step_dir = workdir / ckpt_lib.CKPT_DIR / "50"
    direct = restore_params(step_dir, nnx.eval_shape(lambda: WanDiT(model.cfg, rngs=nnx.Rngs(0))))
    a, b = nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(nnx.state(direct, nnx.Param))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    trained = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert any(float(jnp.abs(v).max()) > 0 for p, v in trained.items() if "gate" in p)  # stage 3 trained the gate


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(csv, tmp_path):
    # An absurd learning rate: step 1 is finite (initial weights), step 2's loss is not.
    cfg = _cfg("dense_long", csv, "random", lr=1e30, warmup=0)
    cfg.checkpointing.every = 1
    with pytest.raises(loop.NonFiniteError, match=r"non-finite loss .* at step 2; .*last good checkpoint: step 1"):
        loop.run(cfg, tmp_path)
    assert ckpt_lib.complete_steps(tmp_path / ckpt_lib.CKPT_DIR) == [1]
    assert sorted(read_metrics(tmp_path)) == [1]


@pytest.mark.slow
def test_grad_accum_averages_microbatches(csv):
    """train.grad_accum=2: the step's loss and gradient norm are those of the mean over the two microbatches (rows
    0::2 and 1::2, keys fold_in(step key, i)) computed by hand."""
    cfg = _cfg("dense_long", csv, "random", grad_accum=2)
    setup = loop.build(cfg, mesh_lib.make_mesh(dict(cfg.mesh), jax.devices()[:1]))
    batch, _ = next(Batches(cfg))
    setup.compile(loop.global_shapes(batch, 2))
    state = setup.fresh_state()
    params, rng = jax.device_get(state.params), jax.device_get(state.rng)  # the step donates the state
    _, metrics = setup.step(state, {k: jnp.asarray(v) for k, v in batch.items()}, setup.context)
    key = jax.random.split(jax.random.wrap_key_data(rng))[1]
    obj = state_lib.objective(cfg)

    @jax.jit
    @jax.value_and_grad
    def micro(p, mb, i):
        return loss_fn(state_lib.merge(setup.graphdef, p), mb, setup.context, jax.random.fold_in(key, i), obj)[0]

    losses, grads = zip(*(micro(params, {k: jnp.asarray(v[i::2]) for k, v in batch.items()}, i) for i in range(2)))
    mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    np.testing.assert_allclose(float(metrics["loss"]), float(sum(losses) / 2), rtol=1e-6)
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(mean_grads))))
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)


def test_flop_formula_matches_xla_cost_analysis(monkeypatch):
    """The dense teacher-forcing FLOP count (metrics.forward_flops) against XLA's count of the compiled forward of a
    one-layer model (XLA counts a scanned layer once; it also counts elementwise work, hence the small excess).

    The formula counts the useful (block-causal) query-key pairs, which the per-chunk loop computes; a sequence this
    short would run as one masked call that also computes the masked pairs, so the loop is forced here."""
    from decmem_jax.models import attention
    from decmem_jax.train.metrics import forward_flops

    monkeypatch.setattr(attention, "MASK_LIMIT", 0)

    cfg = get_config("tiny", dtype="float32", attention="xla", num_layers=1)
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    x, t, ctx = jnp.zeros((1, 8, 8, 8, 16)), jnp.zeros((1, 8)), jnp.zeros((1, 512, cfg.text_dim))
    fn = nnx.jit(lambda m, x, t, c: m.teacher_forcing(x, x, t, c, chunk_size=4))
    cost = fn.lower(model, x, t, ctx).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = forward_flops(cfg, frames=8, hw=(8, 8), chunk=4)["forward_per_sample"]
    assert 1.0 <= xla / ours <= 1.05, (xla, ours)


def test_config_errors_are_one_line(csv, tmp_path):
    cfg = _cfg("dense_long", csv, "")
    with pytest.raises(loop.TrainError, match="init_from is empty"):
        loop.run(cfg, tmp_path)
    cfg = _cfg("dense_long", "", "random")
    with pytest.raises(state_lib.ConfigError, match="data.csv is empty"):
        loop.run(cfg, tmp_path / "b")


@pytest.mark.slow
def test_train_step_benchmark_small(tmp_path):
    from benchmarks import train_step

    out = tmp_path / "train_step.json"
    record = train_step.main(["--small", "--repeats", "1", "--warmup", "1", "--json", str(out)])
    assert json.loads(Path(out).read_text())["cases"] == json.loads(json.dumps(record["cases"]))
    [case] = record["cases"]
    assert case["status"] == "ok" and np.isfinite(case["loss"]) and case["flops"]["train_step"] > 0
    assert case["gpu_clocks"] == {"unavailable": "the cpu backend has no NVIDIA GPU"}  # benchmarks/clocks.py
    assert "3 * forward" in record["flop_formula"]


def test_train_step_benchmark_isolated_case_runs_in_a_child(tmp_path):
    """--isolate: each case in its own process (its own peak memory); the parent takes config and devices from it."""
    from benchmarks import train_step

    out = tmp_path / "train_step.json"
    record = train_step.main(["--small", "--isolate", "--remat", "offload_ffn", "--sgm-dkv", "packed_shared",
                              "--xla-options", ";xla_allow_excess_precision=false",
                              "--model", "linear_layout=row_major",
                              "--repeats", "1", "--warmup", "1", "--json", str(out)])
    case, other = record["cases"]
    assert case["status"] == "ok" and case["isolated"] and "peak_gb" in case  # None on a CPU (no allocator stats)
    assert case["host_peak_gb"] > 0  # the child's own host memory (where offload_* policies keep residuals)
    assert case["remat"] == "offload_ffn" and case["frames"] == 8  # the parent's options reach the child
    assert case["sgm_dkv"] == "packed_shared" and case["linear_layout"] == "row_major"  # and the model override
    # one case per XLA option set, each child compiling with its own set only (fp32 here: the same loss)
    assert [case["xla_options"], other["xla_options"]] == ["defaults", "xla_allow_excess_precision=false"]
    assert other["status"] == "ok" and other["loss"] == pytest.approx(case["loss"], rel=1e-5)
    with pytest.raises(SystemExit):
        train_step.parse_args(["--xla-options", "not_a_pair"])
    with pytest.raises(SystemExit):
        train_step.parse_args(["--sgm-dkv", "default,nope"])
    with pytest.raises(SystemExit):
        train_step.parse_args(["--remat", "save_sgm,nope"])
    assert record["dtype"] == "float32" and record["config"]["num_layers"] >= 1 and record["jax"]["platform"] == "cpu"
