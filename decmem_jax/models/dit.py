"""Wan2.1 diffusion transformer (`WanModel`) in Flax NNX, with block-causal, teacher-forcing and KV-cache modes, and
the DecMem additions (`DiTConfig.memory`: SGM + ALM + gate in place of self-attention; `DiTConfig.conditioning`:
action/pose embeddings added to the patch tokens).

Reads in the order of the forward pass (`docs/method.md` §2):
patchify (+ conditioning) -> time embedding (per frame) -> text MLP -> N x [modulated self-attention with RoPE,
cross-attention, modulated FFN] under `nnx.scan` -> modulated head -> unpatchify. Latents are channels-last:
[B, F, H, W, C].

Self-attention is the only part that differs between modes. Each mode is a "mixer", a function with one signature
for all of them, chosen by `WanDiT` (the `_*_mixer` methods) and applied inside every block:

    mixer(q, k, v, memory, layer_in, use_memory) -> (o, layer_out)

q, k, v [B, S, N, K] after RoPE; memory: None for a dense model, else (gate [B, S, N, K], score) with score the
pre-RoPE (q, k) that SGM pools (MemoryConfig.score_on="content") or None; layer_in: this layer's slice of the
KV cache (None outside cached inference); use_memory: this layer's DecMem switch (a Python bool, or a traced one when
only some layers are DecMem layers; False in dense models). layer_out is what the layer hands back: new cache
entries, retrieval-loss terms or SGM selections, or None.

Shape letters: B batch, F latent frames, T tokens per frame, S tokens, D model width, N heads, K head dim,
L text rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import numpy as np

from decmem_jax.models import attention as attn_lib
from decmem_jax.models import memory as mem
from decmem_jax.models.cache import BlockKVCache, KVCache
from decmem_jax.models.conditioning import Conditioning
from decmem_jax.models.config import DiTConfig
from decmem_jax.models.layers import LayerNorm, RMSNorm, gelu_tanh, linear, matmul_precision, sinusoidal_embedding
from decmem_jax.models.rope import apply_rope, rope_cos_sin

_SAVE_SGM = jax.checkpoint_policies.save_only_these_names("sgm_out", "sgm_lse")
_SAVE_QKV = jax.checkpoint_policies.save_only_these_names("attn_q", "attn_k", "attn_v")
# cuDNN's fused attention forward as jax 0.11 names its primitives: its output and softmax statistics are what its
# backward needs, so saving them keeps the forward call out of the rematerialised backward.
_CUDNN_FORWARD = frozenset({"dot_product_attention_fwd", "dot_product_attention_fwd_wrapper"})


def _save_sgm_attention(prim, *avals, **params):
    return _SAVE_SGM(prim, *avals, **params) or prim.name in _CUDNN_FORWARD


def _save_sgm_attention_qkv(prim, *avals, **params):
    return _save_sgm_attention(prim, *avals, **params) or _SAVE_QKV(prim, *avals, **params)


def _offloading(on_device, names):
    """A policy that keeps what `on_device` saves and moves the values named `names` to pinned host memory (copied
    out during the forward pass, back in for the backward): residuals that do not fit next to the rest are kept
    instead of recomputed, for the cost of the host link's traffic, which XLA overlaps with compute."""
    host = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=names, offload_src="device",
        offload_dst="pinned_host")

    def policy(prim, *avals, **params):
        # explicit branches: the policies' Recompute value is truthy, so `or` would not compose them
        return True if on_device(prim, *avals, **params) else host(prim, *avals, **params)

    return policy


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the block
    # save only the SGM kernel's output and LSE (named in pallas_kernels/sgm/api.py): the backward pass then runs the
    # SGM backward kernels without re-running the forward kernel (stage 3 at 60 latents, H200: -7% step time, +1.4 GB
    # peak memory)
    "save_sgm": _SAVE_SGM,
    # save_sgm + the cuDNN attention forwards' outputs (ALM window, cross-attention)
    "save_attention": _save_sgm_attention,
    # save_attention + self-attention q, k, v after RoPE
    "save_qkv": _save_sgm_attention_qkv,
    # save_attention on the device, self-attention q, k, v after RoPE on the host (about save_qkv's speed in
    # save_attention's device memory, if the host link keeps up)
    "offload_qkv": _offloading(_save_sgm_attention, ("attn_q", "attn_k", "attn_v")),
    # save_qkv on the device, the feed-forward's hidden pre-activation (ffn_dim wide) on the host: the backward then
    # recomputes neither its up-projection nor the GELU's input
    "offload_ffn": _offloading(_save_sgm_attention_qkv, ("ffn_hidden",)),
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = patch, as an einsum on non-overlapping patches; kernel [pt, ph, pw, C_in, D]."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        pt, ph, pw = cfg.patch_size
        fan_in = pt * ph * pw * cfg.in_channels
        init = jax.nn.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4)
        self.kernel = nnx.Param(init(rngs.params(), (pt, ph, pw, cfg.in_channels, cfg.dim), cfg.weight_dtype))
        self.bias = nnx.Param(jnp.zeros((cfg.dim,), cfg.weight_dtype))
        self.patch_size, self.dtype, self.fan_in = cfg.patch_size, cfg.compute_dtype, fan_in

    def __call__(self, x: jax.Array) -> jax.Array:
        b, f, h, w, c = x.shape
        pt, ph, pw = self.patch_size
        x = x.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c).astype(self.dtype)
        y = jnp.einsum("bftyhxwc,thwcd->bfyxd", x, self.kernel.get_value().astype(self.dtype),
                       precision=matmul_precision(self.dtype))
        return y + self.bias.get_value().astype(self.dtype)


class AttentionProjections(nnx.Module):
    """The q/k/v/o projections of an attention layer, with RMSNorm on q and k over all heads (before the head split),
    as in Wan. The attention itself is the block's mixer (self-attention) or `attention.attention` (cross)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs, row_major=cfg.row_major_linear)
        self.q, self.k, self.v, self.o = (linear(cfg.dim, cfg.dim, **kw) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, eps=cfg.eps, param_dtype=cfg.weight_dtype)
        self.norm_k = RMSNorm(cfg.dim, eps=cfg.eps, param_dtype=cfg.weight_dtype)
        self.num_heads = cfg.num_heads

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, -1)

    def query(self, x: jax.Array) -> jax.Array:
        q = self.q(x)
        return self._heads(self.norm_q(q, out_dtype=q.dtype))

    def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        k = self.k(x)
        return self._heads(self.norm_k(k, out_dtype=k.dtype)), self._heads(self.v(x))

    def out(self, o: jax.Array) -> jax.Array:
        return self.o(o.reshape(*o.shape[:-2], -1))


class FeedForward(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs, row_major=cfg.row_major_linear)
        self.fc1 = linear(cfg.dim, cfg.ffn_dim, **kw)
        self.fc2 = linear(cfg.ffn_dim, cfg.dim, **kw)
        self.gelu = cfg.gelu

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_tanh(checkpoint_name(self.fc1(x), "ffn_hidden"), self.gelu))


class MLP(nnx.Module):
    """linear_1 -> activation -> linear_2 (Wan's text and time embedding MLPs)."""

    def __init__(self, din: int, dout: int, activation, *, dtype, param_dtype, rngs: nnx.Rngs, row_major=False):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, row_major=row_major)
        self.linear_1, self.linear_2 = linear(din, dout, **kw), linear(dout, dout, **kw)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.activation(self.linear_1(x)))


class WanBlock(nnx.Module):
    """One transformer block. x is [B, F, T, D] in the residual dtype; e0 is [B, F, 6, D] float32."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (6, cfg.dim), cfg.weight_dtype) / cfg.dim**0.5)
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps, affine=False)
        self.self_attn = AttentionProjections(cfg, rngs=rngs)
        self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps, affine=True, param_dtype=cfg.weight_dtype)
        self.cross_attn = AttentionProjections(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps, affine=False)
        self.ffn = FeedForward(cfg, rngs=rngs)
        # DecMem gate G = Linear(h) on the hidden state that feeds q/k/v, zero-initialised: o = o_alm + G * o_sgm
        # starts as ALM-only attention (docs/method.md §8).
        gate = None
        if cfg.memory is not None:
            gate = linear(cfg.dim, cfg.dim, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs,
                          row_major=cfg.row_major_linear)
            gate.kernel.set_value(jnp.zeros_like(gate.kernel.get_value()))
            gate.bias.set_value(jnp.zeros_like(gate.bias.get_value()))
        self.gate = gate

    def __call__(self, x, e0, ctx, cos, sin, mixer, layer_in=None, use_memory=False, text_kv=None):
        """text_kv: this layer's cross-attention (keys, values) of the text context, precomputed (`WanDiT.text_kv`);
        None computes them from ctx."""
        cfg = self.cfg
        b, f, t, d = x.shape
        m = self.modulation.get_value().astype(jnp.float32)[None, None] + e0  # [B, F, 6, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, :, i, None, :] for i in range(6))

        # Self-attention on modulated LN(x), with 3D RoPE on q and k.
        h = (self.norm1(x) * (1 + scale1) + shift1).astype(cfg.compute_dtype).reshape(b, f * t, d)
        q_raw = self.self_attn.query(h)
        k_raw, v = self.self_attn.key_value(h)
        # The q/k norms round to the compute dtype here, as written. Without the barrier XLA drops that rounding
        # (excess precision) and keeps the norm's float32 result between the norm and RoPE: twice the bytes written
        # and read (rollout profile, docs/benchmarks.md: -0.7% per chunk with the barrier on an H100).
        q_raw, k_raw = jax.lax.optimization_barrier((q_raw, k_raw))
        q, k = apply_rope(q_raw, cos, sin), apply_rope(k_raw, cos, sin)
        q, k, v = checkpoint_name(q, "attn_q"), checkpoint_name(k, "attn_k"), checkpoint_name(v, "attn_v")
        g = None
        if self.gate is not None:  # memory: the gate, and the q/k that SGM scores (MemoryConfig.score_on)
            g = (self.self_attn._heads(self.gate(h)), (q_raw, k_raw) if cfg.memory.score_on == "content" else None)
        o, new_kv = mixer(q, k, v, g, layer_in, use_memory)
        x = (x + self.self_attn.out(o).reshape(b, f, t, d) * gate1).astype(cfg.residual)

        # Cross-attention to the (padded) text context: no modulation, no gate, no mask.
        h = self.norm3(x).astype(cfg.compute_dtype).reshape(b, f * t, d)
        ck, cv = self.cross_attn.key_value(ctx) if text_kv is None else text_kv
        o = attn_lib.attention(self.cross_attn.query(h), ck, cv, backend=cfg.attention)
        x = x + self.cross_attn.out(o).reshape(b, f, t, d).astype(cfg.residual)

        # Modulated feed-forward.
        h = (self.norm2(x) * (1 + scale2) + shift2).astype(cfg.compute_dtype)
        x = (x + self.ffn(h) * gate2).astype(cfg.residual)
        return x, new_kv


class Head(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        out = cfg.out_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (2, cfg.dim), cfg.weight_dtype) / cfg.dim**0.5)
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, affine=False)
        # The head runs in float32 (Wan's dtype policy), whatever the compute dtype.
        self.linear = linear(cfg.dim, out, dtype=jnp.float32, param_dtype=cfg.weight_dtype, rngs=rngs,
                             row_major=cfg.row_major_linear)

    def __call__(self, x: jax.Array, e: jax.Array) -> jax.Array:
        m = self.modulation.get_value().astype(jnp.float32)[None, None] + e[:, :, None, :]  # [B, F, 2, D]
        shift, scale = m[:, :, 0, None, :], m[:, :, 1, None, :]
        return self.linear(self.norm(x) * (1 + scale) + shift)


class WanDiT(nnx.Module):
    """Wan2.1 DiT (+ DecMem memory and conditioning when configured).

    Full-sequence `__call__` (bidirectional or block-causal), `teacher_forcing` ([clean ; noisy] training sequence),
    and chunk-by-chunk `forward_chunk`/`commit` against a cache from `init_cache`."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embedding = PatchEmbed(cfg, rngs=rngs)
        pin = dict(row_major=cfg.row_major_linear)
        self.text_embedding = MLP(cfg.text_dim, cfg.dim, gelu_tanh, dtype=cfg.compute_dtype,
                                  param_dtype=cfg.weight_dtype, rngs=rngs, **pin)
        # Time embedding and projection stay in float32 (Wan's dtype policy).
        self.time_embedding = MLP(cfg.freq_dim, cfg.dim, jax.nn.silu, dtype=jnp.float32,
                                  param_dtype=cfg.weight_dtype, rngs=rngs, **pin)
        self.time_projection = linear(cfg.dim, 6 * cfg.dim, dtype=jnp.float32, param_dtype=cfg.weight_dtype,
                                      rngs=rngs, **pin)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> WanBlock:
            return WanBlock(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)  # parameters stacked on a leading layer axis
        self.head = Head(cfg, rngs=rngs)
        self.conditioning = None if cfg.conditioning is None else Conditioning(cfg.conditioning, rngs=rngs, **pin)

    # ----- pieces -----
    def embed_time(self, timesteps: jax.Array, num_frames: int) -> tuple[jax.Array, jax.Array]:
        """timesteps [B] or [B, F] -> e [B, F, D], e0 [B, F, 6, D], all float32."""
        t = jnp.asarray(timesteps)
        if t.ndim == 1:
            t = jnp.broadcast_to(t[:, None], (t.shape[0], num_frames))
        if t.ndim != 2 or t.shape[1] != num_frames:
            raise ValueError(f"timesteps must be [B] or [B, F={num_frames}], got shape {t.shape}")
        emb = sinusoidal_embedding(t, self.cfg.freq_dim)
        e = self.time_embedding(emb)
        e0 = self.time_projection(jax.nn.silu(e))
        return e, e0.reshape(*e0.shape[:-1], 6, self.cfg.dim)

    def embed_text(self, context: jax.Array) -> jax.Array:
        """context [B, L <= text_len, text_dim], zero-padded to text_len rows before the MLP (as Wan does)."""
        cfg = self.cfg
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context must be [B, L, text_dim={cfg.text_dim}], got shape {context.shape}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} rows, more than text_len={cfg.text_len}")
        context = jnp.pad(context, ((0, 0), (0, cfg.text_len - context.shape[1]), (0, 0)))
        return self.text_embedding(context)

    def text_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The cross-attention keys and values of every layer for a text context [B, L, text_dim]: two arrays
        [num_layers, B, text_len, N, K]. The context of a rollout never changes, so `forward_chunk(text_kv=...)` takes
        them once per chunk instead of recomputing them (a text MLP and 2 projections per layer) in every forward."""
        ctx = self.embed_text(context)
        return nnx.vmap(lambda block: block.cross_attn.key_value(ctx), in_axes=0, out_axes=0)(self.blocks)

    def embed_conditioning(self, actions: jax.Array, poses: jax.Array | None = None, *, drop=None,
                           first_latent: bool = True) -> jax.Array:
        """Per-latent conditioning [B, F, dim] float32 from per-frame actions int [B, T, 8] (and poses [B, T, 5]);
        drop bool [B] / [B, F] gives the null (zero) condition. T = 1 + 4(F-1), or 4F with first_latent=False."""
        if self.conditioning is None:
            raise ValueError("this model has no conditioning module (DiTConfig.conditioning is None)")
        return self.conditioning(actions, poses, drop=drop, first_latent=first_latent)

    def _grid(self, latents: jax.Array) -> tuple[int, int, int]:
        cfg = self.cfg
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"latents must be [B, F, H, W, C={cfg.in_channels}] (channels last), "
                             f"got shape {latents.shape}")
        _, f, h, w, _ = latents.shape
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent shape F,H,W = {f},{h},{w} is not divisible by patch_size {cfg.patch_size}")
        return f // pt, h // ph, w // pw

    def _unpatchify(self, out: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        b, c = out.shape[0], self.cfg.out_channels
        out = out.reshape(b, f, h, w, pt, ph, pw, c)  # the 64-vector is (pt, ph, pw, c) with c fastest
        return out.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, f * pt, h * ph, w * pw, c)

    def _layout(self, tokens_per_frame: int) -> mem.BlockLayout:
        m = self.cfg.memory
        return mem.BlockLayout.create(tokens_per_frame, m.blocks_per_frame, m.block_slots)

    def _layer_flags(self):
        """Per-layer DecMem switch, scanned with the blocks; None when every layer is the same (no lax.cond)."""
        if self.cfg.memory is None:
            return None
        mask = self.cfg.memory_layer_mask()
        return None if all(mask) or not any(mask) else jnp.asarray(mask)

    def _run_blocks(self, x, e0, ctx, cos, sin, mixer, layer_in, text_kv=None):
        """The blocks under nnx.scan; layer_in (per-layer cache slices or None), the per-layer DecMem switches
        (`_layer_flags`) and the precomputed text keys/values (or None) are scanned with them."""
        flags = self._layer_flags()
        use = self.cfg.memory is not None and any(self.cfg.memory_layer_mask())  # when every layer is the same

        def step(block: WanBlock, x, scanned):
            layer_in, flag, kv = scanned
            return block(x, e0, ctx, cos, sin, mixer, layer_in, use if flag is None else flag, kv)

        if self.cfg.remat != "none":
            step = nnx.remat(step, policy=_REMAT_POLICIES[self.cfg.remat])
        scan = nnx.scan(step, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0), unroll=self.cfg.layer_unroll)
        return scan(self.blocks, x, (layer_in, flags, text_kv))

    def _forward(self, latents, timesteps, context, cond, mixer, *, layer_in=None, frame_offset=0, positions=None,
                 text_kv=None):
        """positions: optional static per-frame RoPE positions (teacher forcing); else frames start at frame_offset.
        text_kv: `text_kv(context)` computed beforehand (context is then not used)."""
        cfg = self.cfg
        grid = self._grid(latents)
        f, h, w = grid
        x = self.patch_embedding(latents).reshape(latents.shape[0], f, h * w, cfg.dim).astype(cfg.residual)
        if cond is not None:
            if self.conditioning is None:
                raise ValueError("cond was given but DiTConfig.conditioning is None")
            if cond.shape != (latents.shape[0], f, cfg.dim):
                raise ValueError(f"cond must be [B, F, dim] = {(latents.shape[0], f, cfg.dim)}, got {cond.shape}")
            x = (x + cond[:, :, None, :]).astype(cfg.residual)  # Eq. 2: added to every token of its latent frame
        e, e0 = self.embed_time(timesteps, f)
        if text_kv is None:
            ctx = self.embed_text(context)
        else:
            ctx = None
            if text_kv[0].shape[1] != latents.shape[0]:
                raise ValueError(f"text_kv has batch {text_kv[0].shape[1]}, the latents {latents.shape[0]}")
        rope = dict(theta=cfg.rope_theta, max_len=cfg.rope_max_len)
        if positions is None:
            cos, sin = rope_cos_sin(grid, cfg.rope_split, frame_offset=frame_offset, **rope)
        else:
            cos, sin = rope_cos_sin((int(max(positions)) + 1, h, w), cfg.rope_split, **rope)
            rows = (np.asarray(positions)[:, None] * h * w + np.arange(h * w)).reshape(-1)
            cos, sin = cos[rows], sin[rows]
        x, layer_out = self._run_blocks(x, e0, ctx, cos, sin, mixer, layer_in, text_kv)
        return self._unpatchify(self.head(x, e), grid), layer_out

    # ----- full-sequence modes -----
    def _sequence_mixer(self, tokens_per_frame: int, chunk_size: int | None, plan: mem.FramePlan | None,
                        retrieval_target=None):
        """The self-attention mode of a full-sequence forward: DecMem, bidirectional, or block-causal dense."""
        cfg = self.cfg
        if cfg.memory is not None:
            if plan is None:
                raise ValueError("a DecMem model (DiTConfig.memory set) is causal: pass chunk_size")
            return self._decmem_mixer(self._layout(tokens_per_frame), plan, retrieval_target)
        if retrieval_target is not None:
            raise ValueError("retrieval_target needs a DecMem model (DiTConfig.memory set)")
        if chunk_size is None:
            return self._bidirectional_mixer()
        return self._block_causal_mixer(tokens_per_frame, chunk_size * tokens_per_frame, plan)

    def _bidirectional_mixer(self):
        """Wan2.1's full attention over every token."""
        backend = self.cfg.attention

        def bidirectional(q, k, v, memory, layer_in, use_memory):
            return attn_lib.attention(q, k, v, backend=backend), None

        return bidirectional

    def _block_causal_mixer(self, tokens_per_frame: int, chunk_tokens: int, plan: mem.FramePlan):
        """Dense block-causal attention (a chunk sees itself and earlier chunks) or its teacher-forcing form."""
        backend = self.cfg.attention
        seq = plan.frames * tokens_per_frame

        def block_causal(q, k, v, memory, layer_in, use_memory):
            if attn_lib.fits_mask(seq, seq):  # small models: one masked call instead of a loop of tiny ones
                o = attn_lib.frame_masked_attention(q, k, v, plan.visible, tokens_per_frame=tokens_per_frame,
                                                    backend=backend)
            elif plan.teacher_forcing:
                o = attn_lib.teacher_forcing_attention(q, k, v, chunk_tokens=chunk_tokens, backend=backend)
            else:
                o = attn_lib.block_causal_attention(q, k, v, chunk_tokens=chunk_tokens, backend=backend)
            return o, None

        return block_causal

    def _decmem_mixer(self, layout: mem.BlockLayout, plan: mem.FramePlan, retrieval_target=None):
        """SGM + ALM + gate over the whole sequence (dense block-causal in layers with the switch off); with a
        retrieval target, layer_out is that layer's (retrieval loss, top-1) (zeros in dense layers)."""
        cfg = self.cfg

        def decmem(q, k, v, memory, layer_in, use_memory):
            gate, score = memory
            o = mem.decmem_attention(q, k, v, gate, layout, cfg.memory, plan=plan, use_memory=use_memory,
                                     score=score, attention_backend=cfg.attention)
            if retrieval_target is None:
                return o, None
            loss, top1 = mem.retrieval_loss(q, k, layout, cfg.memory, plan, retrieval_target, score=score)
            return o, (jnp.where(use_memory, loss, 0.0), jnp.where(use_memory, top1, 0.0))

        return decmem

    def __call__(self, latents: jax.Array, timesteps: jax.Array, context: jax.Array, *,
                 chunk_size: int | None = None, cond: jax.Array | None = None) -> jax.Array:
        """Flow velocity for latents [B, F, H, W, C] at timesteps [B] or per frame [B, F], text context
        [B, L, text_dim].

        chunk_size=None: bidirectional over all frames (Wan2.1). chunk_size=c: block-causal over chunks of c latent
        frames (bidirectional inside a chunk, causal across chunks); DecMem models need it. cond: per-latent
        conditioning [B, F, dim] from `embed_conditioning` (None: the null condition).
        """
        plan = None
        f, h, w = self._grid(latents)
        if chunk_size is not None:
            if chunk_size <= 0:
                raise ValueError(f"chunk_size must be a positive number of latent frames, got {chunk_size}")
            plan = mem.causal_plan(f, chunk_size)
        mixer = self._sequence_mixer(h * w, chunk_size, plan)
        return self._forward(latents, timesteps, context, cond, mixer)[0]

    def teacher_forcing(self, clean: jax.Array, noisy: jax.Array, timesteps: jax.Array, context: jax.Array, *,
                        chunk_size: int, actions: jax.Array | None = None, poses: jax.Array | None = None,
                        drop: jax.Array | None = None, clean_timesteps: jax.Array | None = None,
                        retrieval_target: jax.Array | None = None):
        """Velocity for the noisy frames of a teacher-forcing step (docs/method.md §11).

        clean, noisy: [B, F, H, W, C] (F a multiple of chunk_size); timesteps [B, F]: the noisy frames' timesteps
        (clean frames run at t = 0). One sequence [clean ; noisy] with shared RoPE positions: clean chunk c sees clean
        chunks <= c, noisy chunk c sees clean chunks < c and itself. actions int [B, 1+4(F-1), 8] / poses [B, T, 5]
        condition both copies; drop bool [B] zeroes the noisy copy's condition only (CFG dropout). Returns
        [B, F, H, W, C] float32. clean_timesteps [B, F]: run the history copy at these timesteps instead of 0 (context
        noise augmentation: `clean` is then a lightly noised history, see train/objective.py).
        retrieval_target bool [B, F, F] (DecMem models): latent i should retrieve latent j; then returns (velocity,
        {"retrieval_ce", "retrieval_top1"}), `memory.retrieval_loss` averaged over the memory layers."""
        if clean.shape != noisy.shape:
            raise ValueError(f"clean {clean.shape} and noisy {noisy.shape} latents must have one shape")
        b, f = clean.shape[:2]
        timesteps = jnp.asarray(timesteps)
        if timesteps.shape != (b, f):
            raise ValueError(f"timesteps must be [B, F] = {(b, f)} (the noisy frames'), got {timesteps.shape}")
        cond = None
        if actions is not None:
            cond_clean = self.embed_conditioning(actions, poses)
            cond_noisy = cond_clean if drop is None else jnp.where(jnp.asarray(drop, bool)[:, None, None], 0.0,
                                                                   cond_clean)
            cond = jnp.concatenate([cond_clean, cond_noisy], axis=1)
        elif drop is not None:
            raise ValueError("drop needs actions")
        plan = mem.teacher_forcing_plan(f, chunk_size)
        _, h, w = self._grid(clean)
        if retrieval_target is not None and jnp.shape(retrieval_target) != (b, f, f):
            raise ValueError(f"retrieval_target must be [B, F, F] = {(b, f, f)}, got {jnp.shape(retrieval_target)}")
        mixer = self._sequence_mixer(h * w, chunk_size, plan, retrieval_target)
        seq = jnp.concatenate([clean, noisy], axis=1)
        t_clean = jnp.zeros_like(timesteps) if clean_timesteps is None else jnp.asarray(clean_timesteps,
                                                                                         timesteps.dtype)
        t = jnp.concatenate([t_clean, timesteps], axis=1)
        out, layer_out = self._forward(seq, t, context, cond, mixer, positions=plan.positions)
        if retrieval_target is None:
            return out[:, f:]
        layers = max(sum(self.cfg.memory_layer_mask()), 1)
        ce, top1 = (x.sum() / layers for x in layer_out)
        return out[:, f:], {"retrieval_ce": ce, "retrieval_top1": top1}

    # ----- KV-cache inference -----
    def init_cache(self, batch: int, capacity: int, latent_hw: tuple[int, int]) -> KVCache | BlockKVCache:
        """An empty cache for `capacity` latent frames of size latent_hw = (H, W) (latent pixels, not patches).

        Token-major `KVCache` for a dense model, block-major `BlockKVCache` (with pooled keys) for a DecMem model.
        batch may be 1 while the chunk forwards run a batch of 2 (cond/uncond CFG branches share the history)."""
        cfg = self.cfg
        ph, pw = cfg.patch_size[1:]
        if latent_hw[0] % ph or latent_hw[1] % pw:
            raise ValueError(f"latent size {latent_hw} is not divisible by the patch size {cfg.patch_size[1:]}")
        if capacity > cfg.rope_max_len:
            raise ValueError(f"cache capacity {capacity} exceeds the RoPE table length {cfg.rope_max_len}")
        tpf = (latent_hw[0] // ph) * (latent_hw[1] // pw)
        common = dict(num_layers=cfg.num_layers, batch=batch, capacity=capacity, tokens_per_frame=tpf,
                      num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=cfg.compute_dtype)
        if cfg.memory is None:
            return KVCache.create(**common)
        layout = self._layout(tpf)
        return BlockKVCache.create(blocks=layout.blocks, slots=layout.slots, **common)

    def _chunk(self, latents, timesteps, context, cache, cond, text_kv=None):
        cfg = self.cfg
        f, h, w = self._grid(latents)
        if h * w != cache.tokens_per_frame:
            raise ValueError(f"chunk has {h * w} tokens per frame but the cache was made for {cache.tokens_per_frame}")
        if cache.batch not in (1, latents.shape[0]):
            raise ValueError(f"cache batch {cache.batch} must be 1 (shared history) or the chunk batch "
                             f"{latents.shape[0]}")
        fits = cache.check_room(f)
        length = cache.length
        if cfg.memory is None:
            mixer = self._cached_dense_mixer(length * cache.tokens_per_frame)
        else:
            mixer = self._cached_decmem_mixer(self._layout(h * w), length)
        out, new = self._forward(latents, timesteps, context, cond, mixer, layer_in=cache.layers(),
                                 frame_offset=length, text_kv=text_kv)
        # Inside jit an overflowing chunk cannot raise; poison its output instead of silently clamping the write.
        return jnp.where(fits, out, jnp.nan), new, fits

    def _cached_dense_mixer(self, offset):
        """A chunk against a token-major cache slice (k, v) of which the first `offset` tokens are committed; the
        layer hands back its own (k, v) for `commit`."""
        backend = self.cfg.attention

        def cached_dense(q, k, v, memory, layer_in, use_memory):
            hk, hv = layer_in
            o = attn_lib.attention_with_history(q, k, v, hk.astype(q.dtype), hv.astype(q.dtype), offset,
                                                backend=backend)
            return o, ((k, v), None)

        return cached_dense

    def _cached_decmem_mixer(self, layout: mem.BlockLayout, length):
        """A chunk against a block-major cache slice (keys, values, pooled keys) of `length` committed frames; the
        layer hands back its new cache entries and its SGM selection (diagnostics)."""
        cfg = self.cfg

        def cached_decmem(q, k, v, memory, layer_in, use_memory):
            gate, score = memory
            hk, hv, hp = layer_in
            o, new, selection = mem.chunk_decmem_attention(q, k, v, gate, layout, cfg.memory,
                                                           (hk.astype(q.dtype), hv.astype(q.dtype), hp), length,
                                                           use_memory=use_memory, score=score,
                                                           attention_backend=cfg.attention)
            return o, (new, selection)

        return cached_decmem

    def forward_chunk(self, latents: jax.Array, timesteps: jax.Array, context: jax.Array | None, cache,
                      cond: jax.Array | None = None, *, text_kv=None) -> jax.Array:
        """Velocity for one chunk [B, c, H, W, C] that follows the cache's committed frames (RoPE frames offset by
        `cache.length`); attends to the committed frames and, bidirectionally, to itself. The cache is unchanged.
        cond: the chunk's per-latent conditioning [B, c, dim] (None: null). text_kv: `text_kv(context)` for this
        batch, computed once for many forwards (then context may be None)."""
        return self._chunk(latents, timesteps, context, cache, cond, text_kv)[0]  # history outputs DCE'd

    def commit(self, latents: jax.Array, timesteps: jax.Array, context: jax.Array, cache,
               cond: jax.Array | None = None, *, with_selection: bool = False):
        """Runs the chunk (normally the clean x0 at t=0) and writes its keys/values (and pooled keys) into the cache.

        Returns (velocity, new cache with length + c), plus, with_selection=True on a DecMem model, the SGM retrieval
        of every layer (global block ids [L, B, H, c*M, K], counts [L, B, H, c*M]) for diagnostics. The chunk batch
        must equal the cache batch."""
        if latents.shape[0] != cache.batch:
            raise ValueError(f"commit batch {latents.shape[0]} must equal the cache batch {cache.batch}")
        if with_selection and self.cfg.memory is None:
            raise ValueError("with_selection needs a DecMem model (DiTConfig.memory set)")
        out, (new, selection), fits = self._chunk(latents, timesteps, context, cache, cond)
        # An overflowing write would be clamped onto the last frames: keep the old cache instead. Donate the cache
        # to a jitted commit to make the write in place.
        cache = jax.lax.cond(fits, lambda: cache.write(new, latents.shape[1]), lambda: cache)
        return (out, cache, selection) if with_selection else (out, cache)
