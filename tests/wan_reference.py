"""Live PyTorch references for parity tests: diffusers' WanTransformer3DModel at tiny sizes, every parameter random."""

from __future__ import annotations

import numpy as np
import torch
from flax import nnx

from decmem_jax.convert import keymap
from decmem_jax.models.config import DiTConfig


def diffusers_wan(cfg: DiTConfig, seed: int = 0):
    """A diffusers WanTransformer3DModel matching `cfg`, with every parameter randomised (norm scales, modulation
    tables and biases included, so nothing a zero/one init would hide stays hidden)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, rope_max_seq_len=cfg.rope_max_len).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")) or "scale_shift_table" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))  # around the reference's own scale
            elif p.ndim == 1:  # biases and LayerNorm shifts
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:  # weights [out, in, ...]: unit-variance outputs for unit-variance inputs
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(np.prod(p.shape[1:])))
    return model


def torch_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def load_params(model, flat: dict[tuple[str, ...], np.ndarray]) -> None:
    """Writes flat params {path: array} into an NNX model in place."""
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(np.asarray(flat[tuple(str(p) for p in path)]))
    nnx.update(model, state)


def run_diffusers(model, latents: np.ndarray, timesteps: np.ndarray, context: np.ndarray,
                  text_len: int) -> np.ndarray:
    """Runs the reference on channels-last latents [B, F, H, W, C]; the context is zero-padded to text_len rows."""
    ctx = np.zeros((context.shape[0], text_len, context.shape[2]), np.float32)
    ctx[:, : context.shape[1]] = context
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 4, 1, 2, 3))),
                    torch.from_numpy(timesteps), torch.from_numpy(ctx), return_dict=False)[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)
