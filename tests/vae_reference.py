"""Live PyTorch reference for VAE parity tests: diffusers' AutoencoderKLWan at tiny sizes, every parameter random."""

from __future__ import annotations

import numpy as np
import torch

from decmem_jax.models.vae import VAEConfig


def diffusers_vae(cfg: VAEConfig, seed: int = 0):
    """A diffusers AutoencoderKLWan matching `cfg` with every parameter randomised: RMS_norm gammas around 1 (1 +/-
    0.2), biases 0.1 * N(0, 1), weights N(0, 1) / sqrt(fan_in) so activations keep unit scale through the stack."""
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(
        base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        attn_scales=[], temperal_downsample=list(cfg.temporal_downsample), dropout=0.0,
        latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std), in_channels=cfg.in_channels,
        out_channels=cfg.out_channels).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:  # conv weights [out, in, *kernel]
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(np.prod(p.shape[1:])))
    return model


def torch_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def _to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))  # [B,T,H,W,C] -> [B,C,T,H,W]


def _from_torch(x: torch.Tensor) -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 4, 1)


def encode_mean(model, video: np.ndarray) -> np.ndarray:
    """Raw posterior mean (channels-last) from diffusers' chunked encode (1 frame, then 4 at a time)."""
    with torch.no_grad():
        model.clear_cache()  # _encode clears it too; explicit so a failed earlier call cannot leak state
        return _from_torch(model.encode(_to_torch(video)).latent_dist.mean)


def decode(model, z_raw: np.ndarray) -> np.ndarray:
    """Video (channels-last, clamped to [-1, 1]) from diffusers' chunked decode (one latent frame at a time)."""
    with torch.no_grad():
        model.clear_cache()
        return _from_torch(model.decode(_to_torch(z_raw)).sample)
