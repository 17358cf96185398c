"""PyTorch peer of the DiT benchmark: diffusers' `WanTransformer3DModel` carrying the JAX model's weights, plus a
self-attention processor that runs one chunk against a KV cache.

diffusers has no KV cache for Wan, so `KVCacheAttnProcessor` replaces the `attn1` processor of every block. It does
what Self-Forcing's `CausalWanSelfAttention` does at inference: q/k/v of the chunk (RMSNorm over all heads, then the
head split), 3D RoPE whose temporal positions start at the committed frame count, the chunk's rotated keys and its
values written into a preallocated per-layer cache right after the committed prefix, and plain (unmasked) softmax
attention of the chunk's queries over the valid prefix. This is the same function as
`WanDiT.forward_chunk` (`decmem_jax/models/dit.py`), which the fp32 smoke test checks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from decmem_jax.convert import keymap
from decmem_jax.models.config import DiTConfig


def build_diffusers(cfg: DiTConfig, device: torch.device, dtype: torch.dtype):
    """A diffusers WanTransformer3DModel of `cfg` on `device` (weights still the constructor's random init).

    Parameters are cast the way `from_pretrained(torch_dtype=dtype)` casts them: modules named in
    `_keep_in_fp32_modules` (time embedder, modulation tables, LayerNorms) stay float32, everything else is `dtype`.
    Buffers are left alone, so the RoPE tables stay float32 (as after `from_pretrained`); a plain
    `model.to(torch.bfloat16)` would round them to bf16.
    """
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim,
            freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=cfg.rope_max_len)
    model.eval().requires_grad_(False)
    keep = tuple(model._keep_in_fp32_modules or ())
    for name, p in model.named_parameters():
        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        p.data = p.data.to(target)
    return model


def numpy_to_torch(arr: np.ndarray) -> torch.Tensor:
    """numpy -> torch on the CPU (a writable copy); ml_dtypes bfloat16 (np.asarray of a JAX bf16 array) included."""
    arr = np.array(arr, order="C", copy=True)
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def jax_to_torch(x, device: torch.device) -> torch.Tensor:
    """A torch copy (own memory) of a JAX array: DLPack on the same device when possible, else through the host."""
    try:
        t = torch.from_dlpack(x)
        if t.device == device:
            return t.clone()
    except Exception:  # noqa: BLE001 - any DLPack trouble falls back to the host copy
        pass
    return numpy_to_torch(np.asarray(x)).to(device)


def load_jax_params(model, flat: dict, cfg: DiTConfig) -> None:
    """Strict-loads flat JAX params {path: array} into the diffusers model through the shared key map."""
    state = {key: numpy_to_torch(arr) for key, arr in keymap.iter_export(flat, cfg, "diffusers")}
    model.load_state_dict(state, strict=True)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent channel pairs of x [B, S, H, D]; cos/sin [1, S, 1, D] are diffusers' repeat-interleaved
    tables (each angle twice), so the even channels carry one value per pair. Math in the tables' dtype."""
    pairs = x.unflatten(-1, (-1, 2))
    xe, xo = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 0::2]
    return torch.stack((xe * c - xo * s, xe * s + xo * c), dim=-1).flatten(-2).to(x.dtype)


class TorchKVCache:
    """Per-layer rotated keys and values [B, capacity * T, H, D] plus the committed frame count, shared by the
    processors of all layers; `rotary` holds the chunk's (cos, sin), set by `prepare_chunk`."""

    def __init__(self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor], tokens_per_frame: int,
                 length: int):
        self.k, self.v = k_layers, v_layers
        self.tokens_per_frame = tokens_per_frame
        self.length = length
        self.rotary = None

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1] // self.tokens_per_frame

    def prepare_chunk(self, model, chunk_frames: int, grid_hw: tuple[int, int]) -> None:
        """RoPE tables for frames length .. length + chunk_frames - 1, from the model's own rope module (it only
        reads the input's shape, so a meta tensor of the full frame count serves)."""
        if self.length + chunk_frames > self.capacity:
            raise ValueError(f"chunk of {chunk_frames} frames does not fit after {self.length} committed frames "
                             f"(capacity {self.capacity})")
        ph, pw = model.config.patch_size[1:]
        shape = (1, model.config.in_channels, self.length + chunk_frames, grid_hw[0] * ph, grid_hw[1] * pw)
        cos, sin = model.rope(torch.empty(shape, device="meta"))
        start = self.length * self.tokens_per_frame
        self.rotary = (cos[:, start:], sin[:, start:])


class KVCacheAttnProcessor:
    """`attn1` processor of one block: attends the chunk's queries to [committed prefix; chunk] of its layer's cache."""

    def __init__(self, cache: TorchKVCache, layer: int):
        self.cache, self.layer = cache, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        # `rotary_emb` from the model starts at frame 0; the chunk's absolute positions come from the cache.
        cache = self.cache
        cos, sin = cache.rotary
        heads = attn.heads
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (heads, -1))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        ck, cv = cache.k[self.layer], cache.v[self.layer]
        start = cache.length * cache.tokens_per_frame
        end = start + k.shape[1]
        ck[:, start:end] = k  # re-running the same chunk (next denoising step) overwrites the same slots
        cv[:, start:end] = v
        out = F.scaled_dot_product_attention(q.transpose(1, 2), ck[:, :end].transpose(1, 2),
                                             cv[:, :end].transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def install_cache(model, cache: TorchKVCache) -> list:
    """Puts a KV-cache processor on every block's attn1; returns the previous processors (for `restore`)."""
    old = []
    for i, block in enumerate(model.blocks):
        old.append(block.attn1.processor)
        block.attn1.set_processor(KVCacheAttnProcessor(cache, i))
    return old


def restore(model, processors: list) -> None:
    for block, proc in zip(model.blocks, processors):
        block.attn1.set_processor(proc)


def sdpa_info(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, sq: int, skv: int) -> dict:
    """Which SDPA backends are enabled, and (best effort, private API) which one torch picks for these shapes."""
    info = {}
    if device.type == "cuda":
        b = torch.backends.cuda
        info["enabled"] = {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
                           "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}
    try:
        q = torch.empty(1, heads, sq, head_dim, device=device, dtype=dtype)
        k = torch.empty(1, heads, skv, head_dim, device=device, dtype=dtype)
        choice = int(torch._fused_sdp_choice(q, k, k))
        names = {m.value: n for n, m in torch.nn.attention.SDPBackend.__members__.items()}
        info["chosen"] = names.get(choice, str(choice))
    except Exception as e:  # noqa: BLE001 - private API, informative only
        info["chosen"] = f"unknown ({type(e).__name__})"
    return info
