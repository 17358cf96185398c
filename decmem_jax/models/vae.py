"""Wan2.1 causal video VAE (`WanVAE_` / diffusers `AutoencoderKLWan`) in Flax NNX, whole-sequence formulation.

Pixels [B, T, H, W, 3] in [-1, 1] with T = 1 + 4k map to latents [B, 1 + k, H/8, W/8, 16] and back
(`docs/method.md` §3). The reference runs chunked with a per-conv frame cache (1 frame, then 4 at a
time); here every causal conv runs over the whole sequence with zero frames in front and the first frame bypasses
temporal resampling, which is the same function and one XLA program. Only the posterior mean is used, as in
Wan. Blocks live in `vae_blocks.py`; the checkpoint key table in `convert/vae_keymap.py`. Given a `StreamStep`, the
same modules run one step of streaming encode/decode (`vae_stream.py`, the production path for long videos).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from decmem_jax.models.config import DTYPES, JsonConfig
from decmem_jax.models.vae_blocks import (CausalConv3d, L2ChannelNorm, MidBlock, ResidualBlock, Resample, StreamStep,
                                          causal_conv, scope)

# Published per-channel statistics of the Wan2.1 latent space (identical in Wan, diffusers, Self-Forcing, CausVid).
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class VAEConfig(JsonConfig):
    """Wan2.1 VAE architecture plus dtype policy; field names follow diffusers' `AutoencoderKLWan` config."""

    # --- architecture (must match the checkpoint) ---
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # decoder upsamples in reverse order
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD
    eps: float = 1e-12  # L2ChannelNorm divides by max(||x||, eps) (F.normalize's clamp)

    # --- runtime policy ---
    dtype: str = "float32"  # compute dtype of the convolutions/attention; norms and softmax always in float32
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"VAEConfig.temporal_downsample has {len(self.temporal_downsample)} entries; expected "
                             f"len(dim_mult) - 1 = {len(self.dim_mult) - 1}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"VAEConfig.latents_mean/latents_std need z_dim={self.z_dim} entries each, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"VAEConfig.{name}={getattr(self, name)!r}; expected one of {sorted(DTYPES)}")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> jnp.dtype:
        return DTYPES[self.param_dtype]



VAE_PRESETS: dict[str, VAEConfig] = {
    "wan2.1-vae": VAEConfig(),
    # Real dim_mult / num_res_blocks / temporal_downsample (so every index and resample rule is exercised), 8 wide.
    "tiny": VAEConfig(base_dim=8),
    # The VAE shipped in weights/world_tiny (2.7M parameters), trained from scratch on 64x64 world clips with the
    # same latent layout (16 channels, x4 in time with the 1 + 4k rule, x8 in space). Its latent statistics are
    # measured after training and stored in the checkpoint's config (these placeholders are replaced then).
    "world-tiny": VAEConfig(base_dim=32, dim_mult=(1, 1, 2, 2), num_res_blocks=1,
                            latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16),
}


def get_vae_config(name: str, **overrides: Any) -> VAEConfig:
    """Returns the named preset with `overrides` applied, e.g. `get_vae_config("tiny", dtype="bfloat16")`."""
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; available: {sorted(VAE_PRESETS)}")
    return VAE_PRESETS[name].replace(**overrides)


def _kw(cfg: VAEConfig, rngs: nnx.Rngs) -> dict:
    return dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)


class Encoder3d(nnx.Module):
    """conv_in -> down_blocks (flat list: residual blocks and resamples, as diffusers numbers them) -> mid_block ->
    norm_out -> SiLU -> conv_out to 2*z_dim channels (mean | logvar)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw, eps = _kw(cfg, rngs), cfg.eps
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1, **kw)
        blocks = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(din, dout, eps=eps, **kw))
                din = dout
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(dout, mode, **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], eps=eps, **kw)
        self.norm_out = L2ChannelNorm(dims[-1], eps=eps, param_dtype=cfg.weight_dtype)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1, **kw)

    def __call__(self, x: jax.Array, cache: StreamStep | None = None) -> jax.Array:
        x = causal_conv(self.conv_in, x, cache, "conv_in")
        for i, block in enumerate(self.down_blocks):
            x = block(x, scope(cache, f"down_blocks.{i}"))
        x = self.mid_block(x, scope(cache, "mid_block"))
        return causal_conv(self.conv_out, jax.nn.silu(self.norm_out(x)), cache, "conv_out")


class UpBlock(nnx.Module):
    """num_res_blocks + 1 residual blocks, then an optional upsampler (kept in a list, as diffusers' `upsamplers`)."""

    def __init__(self, din: int, dout: int, mode: str | None, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = _kw(cfg, rngs)
        resnets = []
        for _ in range(cfg.num_res_blocks + 1):
            resnets.append(ResidualBlock(din, dout, eps=cfg.eps, **kw))
            din = dout
        self.resnets = nnx.List(resnets)
        self.upsamplers = nnx.List([Resample(dout, mode, **kw)] if mode else [])

    def __call__(self, x: jax.Array, cache: StreamStep | None = None) -> jax.Array:
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, scope(cache, f"resnets.{j}"))
        for j, up in enumerate(self.upsamplers):
            x = up(x, scope(cache, f"upsamplers.{j}"))
        return x


class Decoder3d(nnx.Module):
    """conv_in -> mid_block -> up_blocks -> norm_out -> SiLU -> conv_out. Blocks after an upsample take half the
    nominal width as input (the upsampler's 3x3 conv halves the channels)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = _kw(cfg, rngs)
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1, **kw)
        self.mid_block = MidBlock(dims[0], eps=cfg.eps, **kw)
        blocks = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                din //= 2
            mode = None
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(din, dout, mode, cfg, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = L2ChannelNorm(dims[-1], eps=cfg.eps, param_dtype=cfg.weight_dtype)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1, **kw)

    def __call__(self, x: jax.Array, cache: StreamStep | None = None) -> jax.Array:
        x = self.mid_block(causal_conv(self.conv_in, x, cache, "conv_in"), scope(cache, "mid_block"))
        for i, block in enumerate(self.up_blocks):
            x = block(x, scope(cache, f"up_blocks.{i}"))
        return causal_conv(self.conv_out, jax.nn.silu(self.norm_out(x)), cache, "conv_out")


class WanVAE(nnx.Module):
    """The Wan2.1 VAE: `encode`/`decode` work on normalised latents, `encode_raw`/`decode_raw` on the raw posterior
    mean (diffusers' `latent_dist.mean` / `decode(z).sample`). Each takes an optional `cache` (a `StreamStep`): then
    it is one step of streaming encode/decode (`vae_stream.py`), on frame 0 or latent 0 alone (`cache.first`) or on
    the next 4m frames or n latents."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = _kw(cfg, rngs)
        self.cfg = cfg
        self.encoder = Encoder3d(cfg, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, **kw)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1, **kw)
        self.decoder = Decoder3d(cfg, rngs=rngs)

    # --- input checks (shapes are static, so these run at trace time) ---
    def _check_video(self, video: jax.Array) -> None:
        cfg, tf, sf = self.cfg, self.cfg.temporal_factor, self.cfg.spatial_factor
        if video.ndim != 5:
            raise ValueError(f"video must be [B, T, H, W, C]; got shape {tuple(video.shape)}")
        _, t, h, w, c = video.shape
        if c != cfg.in_channels:
            raise ValueError(f"video has {c} channels; the VAE expects {cfg.in_channels} (channels-last RGB)")
        if t % tf != 1:
            raise ValueError(f"video has T={t} frames; the VAE needs T = 1 + {tf}k (e.g. {1 + tf * (t // tf)})")
        if h % sf or w % sf:
            raise ValueError(f"video is {h}x{w}; height and width must be divisible by {sf}")

    def _check_latents(self, z: jax.Array) -> None:
        if z.ndim != 5:
            raise ValueError(f"latents must be [B, F, h, w, C]; got shape {tuple(z.shape)}")
        if z.shape[-1] != self.cfg.z_dim:
            raise ValueError(f"latents have {z.shape[-1]} channels; the VAE expects z_dim={self.cfg.z_dim}")
        if z.shape[1] < 1:
            raise ValueError("latents need at least one frame")

    def _stats(self) -> tuple[jax.Array, jax.Array]:
        return jnp.asarray(self.cfg.latents_mean, jnp.float32), jnp.asarray(self.cfg.latents_std, jnp.float32)

    # --- public API ---
    def encode_raw(self, video: jax.Array, cache: StreamStep | None = None) -> jax.Array:
        """[B, 1+4k, H, W, 3] in [-1, 1] -> posterior mean [B, 1+k, H/8, W/8, z_dim] (float32, not normalised)."""
        if cache is None:  # a streaming step's 4m frames are checked by its driver
            self._check_video(video)
        h = self.quant_conv(self.encoder(video.astype(self.cfg.compute_dtype), scope(cache, "encoder")))
        return h[..., : self.cfg.z_dim].astype(jnp.float32)  # channels z_dim: are the log-variance, unused

    def encode(self, video: jax.Array, cache: StreamStep | None = None) -> jax.Array:
        """Normalised latents z = (mu - mean) / std with the published constants (what the DiT consumes)."""
        mean, std = self._stats()
        return (self.encode_raw(video, cache) - mean) * (1.0 / std)  # Wan and diffusers multiply by 1/std

    def decode_raw(self, z_raw: jax.Array, cache: StreamStep | None = None) -> jax.Array:
        """Raw latents [B, F, h, w, z_dim] -> video [B, 1+4(F-1), 8h, 8w, 3], float32, clamped to [-1, 1]."""
        self._check_latents(z_raw)
        x = self.decoder(self.post_quant_conv(z_raw.astype(self.cfg.compute_dtype)), scope(cache, "decoder"))
        return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)

    def decode(self, latents: jax.Array, cache: StreamStep | None = None) -> jax.Array:
        """Normalised latents (as produced by `encode` / the DiT) -> video in [-1, 1]."""
        self._check_latents(latents)
        mean, std = self._stats()
        return self.decode_raw(latents.astype(jnp.float32) * std + mean, cache)
