"""Training the Wan2.1 VAE architecture from scratch (a small preset) on world clips:

    python -m decmem_jax.train.vae --config=configs/world_tiny.py:vae --workdir runs/world_tiny/vae [--resume]

The same conventions as `python -m decmem_jax.train`: an ml_collections config file with `--config.x=` overrides,
Orbax checkpoints in `<workdir>/checkpoints/` (async, keep-N, exact `--resume` after a kill), TensorBoard scalars and
`metrics.jsonl`, a progress bar, SIGTERM saves and exits 0, a non-finite loss stops without saving.

Objective per batch of clips x [B, T = 1 + 4k, H, W, 3] in [-1, 1]: the encoder's posterior N(mu, exp(logvar)) is
sampled once (z = mu + exp(logvar / 2) eps) and decoded (unclamped), then

    loss = l1 * mean|x_hat - x| + lpips * LPIPS(x_hat, x) + kl * mean(KL(N(mu, var) || N(0, 1)))

with LPIPS (AlexNet, `decmem_jax.eval.metrics`) on every frame. The latent layout is the DiT's (16 channels, x4 in
time with the 1 + 4k rule, x8 in space). Data: every clip of `data.csv` (a `build_csv` index) is decoded once into
host memory (small clips: 64x64) and batch i draws random windows from a generator seeded by (seed, i), so the
iterator state is just the batch position. `decmem_jax.train.export` turns the run into a converted VAE checkpoint
with the latent statistics measured on the training clips.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from decmem_jax import video as video_io
from decmem_jax.data.clips import load_clips, read_clip_paths
from decmem_jax.errors import DecMemError
from decmem_jax.format import PIXELS_PER_LATENT, is_frame_count
from decmem_jax.models.vae import VAEConfig, WanVAE, get_vae_config
from decmem_jax.run_config import ConfigError
from decmem_jax.train import checkpoint as ckpt_lib
from decmem_jax.train import metrics as metrics_lib
from decmem_jax.train.state import TrainState, make_optimizer
from decmem_jax.weights import MODEL_CONFIG_FILE

log = logging.getLogger(__name__)


class VaeTrainError(DecMemError, RuntimeError):
    """A VAE run that cannot start or continue; one line naming what to change."""


# ----- data -----

class ClipWindows:
    """Random windows of `frames` frames from in-memory clips: batch i is a pure function of (seed, i)."""

    def __init__(self, clips: list[np.ndarray], frames: int, batch: int, seed: int):
        self.clips = [c for c in clips if len(c) >= frames]
        if not self.clips:
            raise ConfigError(f"data: no clip has the {frames} frames of data.clip_frames")
        self.frames, self.batch, self.seed = frames, batch, seed
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        out = np.empty((self.batch, self.frames, *self.clips[0].shape[1:]), np.uint8)
        for b in range(self.batch):
            clip = self.clips[int(rng.integers(len(self.clips)))]
            start = int(rng.integers(0, len(clip) - self.frames + 1))
            out[b] = clip[start:start + self.frames]
        return out

    def get_state(self) -> bytes:
        return json.dumps({"position": self.position}).encode()

    def set_state(self, state: bytes) -> None:
        self.position = int(json.loads(state.decode())["position"])


# ----- model and objective -----

def vae_config(cfg) -> VAEConfig:
    """The VAEConfig of a run config: preset + overrides, fp32 master weights, the run's compute dtype."""
    try:
        dtype = cfg.model.dtype if cfg.model.dtype != "auto" else (
            "float32" if jax.default_backend() == "cpu" else "bfloat16")
        return get_vae_config(cfg.model.preset, **dict(cfg.model.overrides)).replace(dtype=dtype,
                                                                                     param_dtype="float32")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model config ({cfg.model.preset}): {e}") from None


def posterior(vae: WanVAE, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mu, logvar) float32 [B, 1 + k, h, w, z] of pixels [B, 1 + 4k, H, W, 3] in [-1, 1]."""
    vae._check_video(video)
    h = vae.quant_conv(vae.encoder(video.astype(vae.cfg.compute_dtype))).astype(jnp.float32)
    z = vae.cfg.z_dim
    return h[..., :z], jnp.clip(h[..., z:], -30.0, 20.0)


def reconstruct(vae: WanVAE, z_raw: jax.Array) -> jax.Array:
    """Decoded pixels without the output clamp (a clamp would stop the gradient of overshooting pixels)."""
    return vae.decoder(vae.post_quant_conv(z_raw.astype(vae.cfg.compute_dtype))).astype(jnp.float32)


def lpips_network():
    """(apply(variables, a, b) -> [N] for frames in [-1, 1], variables): LPIPS-AlexNet of `decmem_jax.eval.metrics`."""
    from decmem_jax.eval.metrics import LPIPS

    m = LPIPS("alexnet")
    return (lambda variables, a, b: m.module.apply(variables, a, b).reshape(a.shape[0])), m.variables


def vae_loss(vae: WanVAE, video: jax.Array, key: jax.Array, weights: dict, lpips_fn, lpips_vars):
    mu, logvar = posterior(vae, video)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, jnp.float32)
    x_hat = reconstruct(vae, z)
    x = video.astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(x_hat - x))
    frames = lambda v: v.reshape(-1, *v.shape[2:])  # noqa: E731
    lp = jnp.mean(lpips_fn(lpips_vars, frames(x_hat), frames(x)))
    kl = jnp.mean(0.5 * (jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar))
    loss = weights["l1"] * l1 + weights["lpips"] * lp + weights["kl"] * kl
    mse = jnp.mean(jnp.square(jnp.clip(x_hat, -1, 1) - x))
    return loss, {"l1": l1, "lpips": lp, "kl": kl, "psnr": 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))}


def make_step(graphdef, tx, schedule, weights: dict, lpips_fn):
    def loss(params, video, key, lpips_vars):
        return vae_loss(nnx.merge(graphdef, nnx.State(params)), video, key, weights, lpips_fn, lpips_vars)

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def step(state: TrainState, frames_u8: jax.Array, lpips_vars):
        rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
        video = frames_u8.astype(jnp.float32) / 127.5 - 1.0
        (value, aux), grads = grad_fn(state.params, video, key, lpips_vars)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, rng=jax.random.key_data(rng))
        return new, {"loss": value, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step), **aux}

    return jax.jit(step, donate_argnums=(0,))


# ----- the run -----

def _fresh_state(cfg, vcfg: VAEConfig, tx):
    seed = int(cfg.train.seed)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: WanVAE(vcfg, rngs=nnx.Rngs(seed))), nnx.Param)

    def init():
        params = nnx.to_pure_dict(nnx.split(WanVAE(vcfg, rngs=nnx.Rngs(seed)), nnx.Param)[1])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.key(seed + 1)))

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # the restore target needs a placement
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), jax.eval_shape(init))
    return graphdef, abstract, init


def check_config(cfg) -> None:
    d = cfg.data
    if not is_frame_count(d.clip_frames):
        raise ConfigError(f"data.clip_frames={d.clip_frames} must be 1 + 4k (the VAE's frame rule)")
    if any(s % PIXELS_PER_LATENT for s in d.size):
        raise ConfigError(f"data.size={tuple(d.size)} must be divisible by {PIXELS_PER_LATENT}")
    for name in ("l1", "lpips", "kl"):
        if cfg.loss[name] < 0:
            raise ConfigError(f"loss.{name}={cfg.loss[name]} must be >= 0")
    if cfg.train.steps < 1 or cfg.train.batch < 1:
        raise ConfigError(f"train.steps={cfg.train.steps} and train.batch={cfg.train.batch} must be >= 1")


def run(cfg, workdir: str | os.PathLike, *, resume: bool = False) -> int:
    """Trains the VAE of `cfg` in `workdir`; returns 0 when done or preempted (checkpoint written)."""
    from decmem_jax.train.loop import NonFiniteError, _Preemption, _write_atomic, readable_config

    check_config(cfg)
    workdir = Path(workdir).absolute()
    t = cfg.train
    vcfg = vae_config(cfg)
    tx, schedule = make_optimizer(t)
    graphdef, abstract, init = _fresh_state(cfg, vcfg, tx)
    ckpt = ckpt_lib.Checkpointer(workdir, every=cfg.checkpointing.every, keep=cfg.checkpointing.keep,
                                 async_save=cfg.checkpointing.async_save, model_config=vcfg)
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        ckpt.close()
        raise VaeTrainError(f"{workdir}: holds checkpoints up to step {latest}; pass --resume to continue it, or "
                            "use a new --workdir")
    clips = load_clips(read_clip_paths(cfg.data.csv), tuple(cfg.data.size), limit=int(cfg.data.max_clips) or None,
                       progress=bool(t.progress))
    data = ClipWindows(clips, int(cfg.data.clip_frames), int(t.batch), int(cfg.data.seed))
    if latest is not None:
        state, data_state = ckpt.restore(latest, abstract)
        data.set_state(data_state)
        log.info("resumed %s at step %d", ckpt.directory, latest)
    else:
        state = jax.jit(init)()
    workdir.mkdir(parents=True, exist_ok=True)
    _write_atomic(workdir / "config.yaml", readable_config(cfg))
    _write_atomic(workdir / MODEL_CONFIG_FILE, vcfg.to_json() + "\n")
    lpips_fn, lpips_vars = lpips_network()
    step_fn = make_step(graphdef, tx, schedule, dict(cfg.loss), lpips_fn)
    writer = metrics_lib.MetricWriter(workdir)
    preempt = _Preemption()
    step = int(state.step)
    bar = tqdm(total=int(t.steps), initial=step, desc="train vae", unit="step", disable=not t.progress)
    last = None
    try:
        while step < int(t.steps):
            batch_state = None
            frames = next(data)
            batch_state = data.get_state()
            state, metrics = step_fn(state, frames, lpips_vars)
            step += 1
            save = preempt.reached(step) or ckpt.should_save(step) or step == int(t.steps)
            if save or step % int(t.log_every) == 0:
                m = {k: float(v) for k, v in metrics.items()}
                if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                    ckpt.wait()
                    raise NonFiniteError(f"train vae: non-finite loss {m['loss']} at step {step}; stopped without "
                                         f"saving it, last good checkpoint: step {ckpt.latest_step()}")
                now = time.perf_counter()
                if last is not None:
                    m["step_time_s"] = (now - last[1]) / (step - last[0])
                last = (step, now)
                writer.scalars(step, m)
                bar.set_postfix(loss=f"{m['loss']:.4f}", psnr=f"{m['psnr']:.2f}", refresh=False)
            if save:
                ckpt.save(step, state, batch_state, stage="vae")
                if preempt.reached(step):
                    log.warning("SIGTERM: saved step %d in %s; exiting", step, ckpt.directory)
                    break
            bar.update(1)
    finally:
        bar.close()
        preempt.restore()
        ckpt.close()
        writer.close()
    return 0


# ----- latent statistics -----

def encode_clips(vae: WanVAE, clips: list[np.ndarray], frames: int) -> list[np.ndarray]:
    """Posterior means (raw, not normalised) of the first `frames` (1 + 4k) frames of each clip."""
    enc = nnx.jit(lambda m, x: m.encode_raw(x))
    return [np.asarray(enc(vae, jnp.asarray(video_io.to_model_range(c[:frames]))[None])[0]) for c in clips]


def latent_stats(vae: WanVAE, clips: list[np.ndarray], frames: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the raw latents of `clips` (for VAEConfig.latents_mean/std)."""
    z = np.concatenate([x.reshape(-1, x.shape[-1]) for x in encode_clips(vae, clips, frames)]).astype(np.float64)
    return tuple(float(v) for v in z.mean(0)), tuple(float(v) for v in np.maximum(z.std(0), 1e-6))


# ----- command line -----

def main(argv, config, workdir: str, resume: bool) -> int:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import sys

    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes at INFO
    try:
        return run(config, workdir, resume=resume)
    except DecMemError as e:  # the project's errors; anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from absl import app, flags

    from decmem_jax.cli import define_config_flag, parse_flags

    _CONFIG = define_config_flag("config", None, "run config file, e.g. configs/world_tiny.py:vae")
    _WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, TensorBoard, config dump")
    _RESUME = flags.DEFINE_bool("resume", False, "continue from the latest complete checkpoint in --workdir")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(lambda argv: main(argv, _CONFIG.value, _WORKDIR.value, _RESUME.value), flags_parser=parse_flags)
