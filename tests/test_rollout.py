"""The scan-based rollout (decmem_jax.rollout.engine) against an unrolled loop, and a long tiny rollout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decmem_jax.models.conditioning import ConditioningConfig
from decmem_jax.models.config import MemoryConfig, get_config
from decmem_jax.models.dit import WanDiT
from decmem_jax.rollout import engine

C, GRID = 2, (8, 8)  # chunk (latents), latent H x W


def tiny_model(seed=0, **memory):
    base = get_config("tiny", dtype="float32")
    mem = dict(blocks_per_frame=3, block_slots=64, top_k=3, window=4, backend="reference")
    cfg = base.replace(memory=MemoryConfig(**{**mem, **memory}), conditioning=ConditioningConfig.from_dit(base, hidden=32))
    model = WanDiT(cfg, rngs=nnx.Rngs(seed))
    rng = jax.random.key(seed + 1)
    for lin in (model.blocks.gate, model.conditioning.action_mlp.linear_2):  # as if trained (zero at init)
        rng, sub = jax.random.split(rng)
        lin.kernel.set_value(0.05 * jax.random.normal(sub, lin.kernel.get_value().shape))
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
    return model


def test_scan_rollout_equals_unrolled_chunk_steps():
    model = tiny_model()
    settings = engine.SamplerSettings(steps=3, solver="unipc", guidance=3.0)
    rng = np.random.default_rng(0)
    context = jnp.asarray(rng.standard_normal((1, 5, 64)), jnp.float32)
    ctx_latents = jnp.asarray(rng.standard_normal((1, 3, *GRID, 16)), jnp.float32)  # 3: a partial last chunk
    actions = jnp.asarray(rng.integers(0, 3, (1, 1 + 4 * (3 + 3 * C - 1), 8)), jnp.int32)
    cond = model.embed_conditioning(actions)  # [1, 3 + 3C, dim]
    cache = engine.prefill(model, model.init_cache(1, 3 + 3 * C, GRID), ctx_latents, context, cond[:, :3], chunk=C)
    assert int(cache.length) == 3
    noises = jnp.stack([engine.chunk_noise(0, i, (1, C, *GRID, 16)) for i in range(3)])
    conds = cond[:, 3:].reshape(1, 3, C, -1).transpose(1, 0, 2, 3)

    step = nnx.jit(lambda m, k, n, x, c: engine.chunk_step(m, k, n, x, c, settings))
    loop_cache, outs = jax.tree.map(jnp.copy, cache), []
    for i in range(3):
        x0, loop_cache = step(model, loop_cache, noises[i], context, conds[i])
        outs.append(x0)
    segment = engine.make_segment_fn(settings, with_selection=True)
    latents, scan_cache, (sel, cnt) = segment(model, jax.tree.map(jnp.copy, cache), noises, context, conds)
    ref = np.stack([np.asarray(o) for o in outs])
    assert float(np.abs(np.asarray(latents) - ref).max()) <= 1e-5 * float(np.abs(ref).max())
    assert int(scan_cache.length) == int(loop_cache.length) == 3 + 3 * C
    np.testing.assert_allclose(np.asarray(scan_cache.pool), np.asarray(loop_cache.pool), atol=1e-5)
    # Diagnostics: per chunk, layer, head and query block, top-k (3) retrieved among committed + own blocks.
    assert sel.shape[:3] == (3, 2, 1) and int(cnt.max()) == 3 and int(cnt.min()) == 3
    frames_seen = 3 + (np.arange(3) + 1) * C  # committed + own frames when each chunk was committed
    assert (np.asarray(sel).max(axis=(1, 2, 3, 4, 5)) < frames_seen * 3).all()
    assert np.isfinite(np.asarray(latents)).all() and float(np.abs(ref).max()) > 0.1


def test_unrolled_layer_scan_gives_the_same_chunk():
    """DiTConfig.layer_unroll (straight-line layers, for the weight slices' sake) changes the program, not the
    arithmetic: one chunk step with CFG against the memory equals the looped layers' to fp32 rounding."""
    from decmem_jax.models.config import DiTConfig

    model = tiny_model()
    unrolled = WanDiT(model.cfg.replace(layer_unroll=model.cfg.num_layers), rngs=nnx.Rngs(0))
    nnx.update(unrolled, nnx.state(model))
    x, t, c = jnp.zeros((1, 1, *GRID, 16)), jnp.zeros((1,)), jnp.zeros((1, 5, 64))
    for m, unroll in ((model, 1), (unrolled, model.cfg.num_layers)):  # the option reaches the layer scan
        graphdef, state = nnx.split(m)
        jaxpr = jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a, chunk_size=1))(state, x, t, c).jaxpr
        assert [e.params["unroll"] for e in jaxpr.eqns if e.primitive.name == "scan"] == [unroll]
    settings = engine.SamplerSettings(steps=2, solver="unipc", guidance=3.0)
    rng = np.random.default_rng(3)
    context = jnp.asarray(rng.standard_normal((1, 5, 64)), jnp.float32)
    ctx_latents = jnp.asarray(rng.standard_normal((1, 2, *GRID, 16)), jnp.float32)
    cond = model.embed_conditioning(jnp.asarray(rng.integers(0, 3, (1, 1 + 4 * (2 + C - 1), 8)), jnp.int32))
    cache = engine.prefill(model, model.init_cache(1, 2 + C, GRID), ctx_latents, context, cond[:, :2], chunk=C)
    noise = engine.chunk_noise(0, 0, (1, C, *GRID, 16))
    step = nnx.jit(lambda m, k: engine.chunk_step(m, k, noise, context, cond[:, 2:], settings))
    (x0, c0), (x1, c1) = step(model, jax.tree.map(jnp.copy, cache)), step(unrolled, jax.tree.map(jnp.copy, cache))
    ref = float(np.abs(np.asarray(x0)).max())
    assert ref > 0.1 and float(np.abs(np.asarray(x1) - np.asarray(x0)).max()) <= 1e-5 * ref
    np.testing.assert_allclose(np.asarray(c1.pool), np.asarray(c0.pool), atol=1e-5)
    for bad in (0, 3, True, "2"):  # tiny has 2 layers
        with pytest.raises(ValueError, match="DiTConfig.layer_unroll"):
            DiTConfig(num_layers=2, layer_unroll=bad)


# ---------------------------------------------------------------------------------------------------------------
# The CLI (configs/tiny.py, random weights) on a clip from the world generator.
# ---------------------------------------------------------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from decmem_jax.data.generate_world import generate

    out = tmp_path_factory.mktemp("world")
    generate(out, clips=1, frames=17 + 3008, size=(64, 64), seed=3, split="test")
    mp4 = next(out.rglob("*.mp4"))
    return mp4, mp4.with_suffix(".npz")


def tiny_config(**rollout):
    sys.path.insert(0, str(ROOT))
    from configs.tiny import get_config

    c = get_config()
    c.rollout.update(**rollout)
    return c


def test_cli_run_writes_the_requested_frames_and_a_sidecar(clip, tmp_path):
    from decmem_jax import video
    from decmem_jax.rollout.__main__ import run

    out = tmp_path / "world.mp4"
    record = run(tiny_config(segment_chunks=2), context=str(clip[0]), actions=str(clip[1]), num_frames=40,
                 out=str(out), seed=1, diagnostics=str(tmp_path / "sel.npz"))
    info = video.probe(out)
    assert (info.num_frames, info.height, info.width, info.fps) == (40, 64, 64, 10.0)
    frames = video.read_video(out)
    assert frames.std() > 1.0  # not a blank video
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["frames"] == 40 and side["chunks"] == 3 and side["seed"] == 1 and side["weights"] == "random weights"
    sel = np.load(tmp_path / "sel.npz")
    assert sel["ids"].shape == (3, 2, 2, 8, 8) and sel["counts"].max() == 8
    assert record["model"]["memory"]["blocks_per_frame"] == 2


@pytest.mark.parametrize("case", ["no_checkpoint", "short_actions", "mid_chunk_actions", "wrong_size", "not_a_video",
                                  "vae_as_dit", "dit_as_vae", "no_out_dir", "short_truth", "other_architecture"])
def test_cli_bad_inputs_give_one_clear_error(clip, tmp_path, case):
    from decmem_jax.rollout.__main__ import RolloutError, run
    from decmem_jax.video import VideoError

    c, context, actions, frames = tiny_config(), str(clip[0]), str(clip[1]), 40
    truth = None
    expected = {"no_checkpoint": "checkpoint is empty", "short_actions": "frames of actions",
                "mid_chunk_actions": "48 frames of actions, but 49 are needed.*whole chunks of 16 frames",
                "wrong_size": "frames are 64x64, the config expects 96x64", "not_a_video": "not_video.mp4",
                "vae_as_dit": "this is a converted VAE checkpoint", "dit_as_vae": "this is a converted DiT checkpoint",
                "no_out_dir": "does not exist", "short_truth": "--ground_truth",
                "other_architecture": "does not match the run config's model"}[case]
    out = tmp_path / "x.mp4"
    shipped = ROOT / "weights" / "world_tiny"
    if case in ("vae_as_dit", "dit_as_vae"):  # the shipped weights, swapped
        c = _world_tiny_config()
        if case == "vae_as_dit":
            c.checkpoint = str(shipped / "vae")
        else:
            c.vae_checkpoint = str(shipped / "decmem")
    elif case == "other_architecture":  # shipped weights under a config of another width
        c = _world_tiny_config()
        c.model.preset = "tiny"
    elif case == "no_out_dir":
        out = tmp_path / "missing" / "x.mp4"
    elif case == "short_truth":
        truth, frames = str(tmp_path / "short.mp4"), 40
        from decmem_jax.video import write_video

        write_video(truth, np.zeros((30, 64, 64, 3), np.uint8), fps=10)
    if case == "no_checkpoint":
        c.random_weights = False
    elif case == "short_actions":
        frames = 10_000
    elif case == "mid_chunk_actions":  # 17 + 30 frames are covered, but the 2nd chunk of 16 frames needs one more
        frames, actions = 30, str(tmp_path / "mid_chunk.npz")
        with np.load(clip[1]) as z:
            np.savez(actions, actions=z["actions"][:48], poses=z["poses"][:48])
    elif case == "wrong_size":
        c.rollout.height = 96
    elif case == "not_a_video":
        context = str(tmp_path / "not_video.mp4")
        Path(context).write_bytes(b"this is not a video")
    with pytest.raises((RolloutError, VideoError, ValueError), match=expected):
        run(c, context=context, actions=actions, num_frames=frames, out=str(out), ground_truth=truth)
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))  # nothing half-written


def _world_tiny_config():
    from configs import world_tiny

    c = world_tiny.get_config("decmem")
    c.checkpoint, c.vae_checkpoint = str(ROOT / c.checkpoint), str(ROOT / c.vae_checkpoint)
    c.rollout.context_frames = 17
    return c


def _cli(clip, out, frames):
    cmd = [sys.executable, "-m", "decmem_jax.rollout", f"--config={ROOT / 'configs/tiny.py'}", f"--context={clip[0]}",
           f"--actions={clip[1]}", f"--num_frames={frames}", f"--out={out}", "--config.rollout.steps=1",
           "--config.rollout.segment_chunks=16"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOM WEIGHTS" in proc.stderr
    return json.loads(Path(out).with_suffix(".json").read_text())


def _cache_bytes_per_latent(model: dict) -> int:
    """Keys, values and pooled keys of one latent frame in the block-major cache (float32 in configs/tiny.py)."""
    m = model["memory"]
    heads, head_dim = model["num_heads"], model["dim"] // model["num_heads"]
    slots = m["blocks_per_frame"] * m["block_slots"]
    return model["num_layers"] * 4 * heads * head_dim * (2 * slots + m["blocks_per_frame"])


@pytest.mark.slow
def test_cli_rolls_out_3000_frames_with_memory_growing_like_the_cache(clip, tmp_path):
    """1,000 and 3,000 frames from the module entry point: finite (the CLI refuses non-finite frames), the requested
    length, and host memory that grows by no more than the cache itself (+10%): the frames stream to disk, the cache
    is allocated once and read in place."""
    from decmem_jax import video

    short = _cli(clip, tmp_path / "short.mp4", 1000)
    long = _cli(clip, tmp_path / "long.mp4", 3000)
    assert video.probe(tmp_path / "long.mp4").num_frames == 3000 and long["chunks"] == 188
    latents = (long["chunks"] - short["chunks"]) * long["rollout"]["chunk"]
    cache_mb = latents * _cache_bytes_per_latent(long["model"]) / 2**20
    growth = long["host_peak_rss_mb"] - short["host_peak_rss_mb"]
    # + 48 MB: two processes' peaks differ by +-25 MB from run to run (allocator, compilation) and both creep by
    # ~70 MB over the segments; keeping the 2,000 extra frames as float32 would add 98 MB and still fail here.
    assert growth <= 1.1 * cache_mb + 48, f"peak RSS grew by {growth:.0f} MB from 1,000 to 3,000 frames; the " \
                                          f"cache by {cache_mb:.0f} MB"


def test_generate_yields_the_frames_the_cli_writes(clip, tmp_path, monkeypatch):
    """`rollout.generate`, called as a library, gives exactly the frames and SGM selections the CLI writes (context
    included), and the memory benchmark's way of calling it (padded segments of another length, the conditioning
    embedded at once, a warm decoder passed in) the same rollout to float rounding."""
    import jax.numpy as jnp

    from decmem_jax import video
    from decmem_jax.models.conditioning import fixed_text_context
    from decmem_jax.rollout import settings as settings_lib
    from decmem_jax.rollout.__main__ import load_inputs, run
    from decmem_jax.rollout.generate import encode, generate, warm_decoder
    from decmem_jax.rollout.load import build_models

    written = []

    class Recording(video.VideoWriter):
        def write(self, frames):
            written.append(np.array(frames))
            return super().write(frames)

    monkeypatch.setattr(video, "VideoWriter", Recording)
    c = tiny_config(segment_chunks=2, steps=2, include_context=True)
    run(c, context=str(clip[0]), actions=str(clip[1]), num_frames=40, out=str(tmp_path / "w.mp4"), seed=3,
        diagnostics=str(tmp_path / "sel.npz"))
    cli = np.concatenate(written)
    assert cli.shape == (17 + 40, 64, 64, 3)

    frames, acts, poses = load_inputs(c, str(clip[0]), str(clip[1]), 40)
    dit, vae, _ = build_models(c)  # random weights: the same seeds as the CLI's
    text = jnp.asarray(fixed_text_context(dit.cfg.text_len, dit.cfg.text_dim, None))
    common = dict(actions=acts[None], poses=poses[None], text=text, seeds=[3], num_frames=40, chunk=4,
                  settings=settings_lib.sampler_settings(c))
    segments = list(generate(dit, vae, frames=frames[None], segment_chunks=2, with_selection=True,
                             include_context=True, **common))
    assert [s.chunks for s in segments] == [range(0), range(0, 2), range(2, 3)]
    np.testing.assert_array_equal(np.concatenate([s.frames[0] for s in segments]), cli)
    sel = np.load(tmp_path / "sel.npz")
    np.testing.assert_array_equal(np.concatenate([s.selection[0] for s in segments[1:]])[:, :, 0], sel["ids"])

    latents = encode(vae, frames[None])
    padded = generate(dit, vae, latents=latents, segment_chunks=4, pad_segments=True, embed_all=True,
                      decoder=warm_decoder(vae, latents)[0], **common)
    assert next(padded).frames is None  # the context: prefilled, not decoded again
    again = np.concatenate([s.frames[0] for s in padded])
    diff = np.abs(again.astype(int) - cli[17:].astype(int))
    assert again.shape == (40, 64, 64, 3) and diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_generate_pipelines_segments_and_keeps_their_frames(clip, monkeypatch):
    """`generate` dispatches segment s + 1 before it fetches segment s's frames (so the device is not idle while the
    caller writes them), and hands out the same frames, in order and truncated to num_frames, as one segment over
    all the chunks (where nothing is pipelined; the decode split differently: float rounding)."""
    import jax.numpy as jnp

    from decmem_jax.models.conditioning import fixed_text_context
    from decmem_jax.rollout import generate as generate_lib
    from decmem_jax.rollout import settings as settings_lib
    from decmem_jax.rollout.__main__ import load_inputs
    from decmem_jax.rollout.load import build_models

    c = tiny_config(steps=1)
    frames, acts, poses = load_inputs(c, str(clip[0]), str(clip[1]), 40)
    dit, vae, _ = build_models(c)
    common = dict(frames=frames[None], actions=acts[None], poses=poses[None], seeds=[5], num_frames=40, chunk=4,
                  text=jnp.asarray(fixed_text_context(dit.cfg.text_len, dit.cfg.text_dim, None)),
                  settings=settings_lib.sampler_settings(c))
    events = []
    step, to_host = generate_lib.Rollout.step, generate_lib.to_host

    def logged_step(self, conds, n):
        events.append(f"step {self.chunks}")
        return step(self, conds, n)

    def logged_to_host(x):
        events.append("fetch")
        return to_host(x)

    monkeypatch.setattr(generate_lib.Rollout, "step", logged_step)
    monkeypatch.setattr(generate_lib, "to_host", logged_to_host)
    segments = generate_lib.generate(dit, vae, segment_chunks=1, **common)
    next(segments)  # the memory bank
    assert events == []
    got = []
    for segment in segments:
        got.append(segment)
        events.append(f"yield {segment.chunks[0]}")
    assert events == ["step 0", "step 1", "fetch", "yield 0", "step 2", "fetch", "yield 1", "fetch", "yield 2"]
    assert [s.chunks for s in got] == [range(0, 1), range(1, 2), range(2, 3)]
    assert [s.frames.shape[1] for s in got] == [16, 16, 8] and all(s.seconds > 0 for s in got)

    whole = list(generate_lib.generate(dit, vae, segment_chunks=3, **common))[1]
    assert whole.chunks == range(0, 3)
    diff = np.abs(np.concatenate([s.frames[0] for s in got]).astype(int) - whole.frames[0].astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())

    # non-finite frames in the second segment: the first is handed out, then one error names the second's chunks
    fetched = []

    def poisoned(x):
        fetched.append(1)
        x = to_host(x)
        return np.full_like(x, np.nan) if len(fetched) == 2 else x

    monkeypatch.setattr(generate_lib, "to_host", poisoned)
    segments = generate_lib.generate(dit, vae, segment_chunks=1, **common)
    next(segments)
    assert next(segments).chunks == range(0, 1)
    with pytest.raises(generate_lib.RolloutError, match=r"non-finite frames generated in chunks 1\.\.1"):
        next(segments)
