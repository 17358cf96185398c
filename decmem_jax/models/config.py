"""Typed configuration of the Wan2.1 diffusion transformer.

A config is an immutable value: architecture fields (which must match a checkpoint) and runtime policy fields
(compute dtype, attention backend, remat) that can change without touching weights. Presets: `wan2.1-t2v-1.3b`
(the released 1.3B model) and `tiny` (same structure and the real RoPE split, small widths, for tests).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from decmem_jax.format import (
    CAMERA_NOOP_BIN, CAMERA_PITCH, CAMERA_YAW, FORWARD_BACK, FRAMES_PER_LATENT, FUNCTIONAL, JUMP_SNEAK_SPRINT, STRAFE)
from pallas_kernels.gelu import BACKENDS as GELU_BACKENDS

ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "mosaic")
REMAT_POLICIES = ("none", "full", "save_sgm", "save_attention", "save_qkv", "offload_qkv", "offload_ffn", "dots",
                  "dots_no_batch")
LINEAR_LAYOUTS = ("auto", "xla", "row_major")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class JsonConfig:
    """`replace` and a strict JSON round trip for the frozen config dataclasses (DiTConfig, VAEConfig)."""

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """DecMem memory settings (models/memory.py); defaults are the paper's and docs/method.md §5-§7's choices."""

    blocks_per_frame: int = 6  # M
    block_slots: int = 192  # P: slots per block, a multiple of 64 (kernel tiles)
    top_k: int = 80  # SGM key blocks per query block
    window: int = 8  # ALM window in latent frames, counting the current chunk (must be >= the chunk)
    candidates: str = "all"  # "all" committed + current-chunk blocks, or "outside_window" (exclude the ALM window)
    layers: tuple[int, ...] | None = None  # transformer blocks with DecMem attention; None = all (others: dense)
    backend: str = "auto"  # sgm_attention backend
    # Inference switch, no parameters: False drops SGM (and so the gate) and leaves o = o_alm, the ALM window alone.
    # The memory benchmark's `alm_only` and `dense_window` variants run this way (decmem_jax/eval/variants.py).
    sgm: bool = True
    # What SGM pools and scores: "rope" = the q/k fed to attention, after RoPE (the method's recommended default, as
    # VSA); "content" = q/k before RoPE. RoPE rotates each token by its frame and patch position, so pooled rotated
    # vectors partly cancel within a frame and their dot products depend on the time distance between frames;
    # "content" scores what blocks show, wherever and whenever they are (architecture: fixed at training).
    score_on: str = "rope"

    def __post_init__(self):
        if self.block_slots % 64:
            raise ValueError(f"MemoryConfig.block_slots={self.block_slots} must be a multiple of 64")
        if self.candidates not in ("all", "outside_window"):
            raise ValueError(f"MemoryConfig.candidates={self.candidates!r}; expected 'all' or 'outside_window'")
        if self.top_k < 1 or self.window < 1 or self.blocks_per_frame < 1:
            raise ValueError("MemoryConfig.top_k, window and blocks_per_frame must be positive")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))
        if self.score_on not in ("rope", "content"):
            raise ValueError(f"MemoryConfig.score_on={self.score_on!r}; expected 'rope' or 'content'")
        if not isinstance(self.sgm, (bool, np.bool_)):
            raise ValueError(f"MemoryConfig.sgm={self.sgm!r} must be True or False")
        object.__setattr__(self, "sgm", bool(self.sgm))


# name -> (action slot, kind, value): kind "eq" gives float(slot == value), "signed" gives slot - value.
ACTION_FEATURES: dict[str, tuple[int, str, int]] = {
    "forward": (FORWARD_BACK, "eq", 1),
    "back": (FORWARD_BACK, "eq", 2),
    "left": (STRAFE, "eq", 1),
    "right": (STRAFE, "eq", 2),
    "jump": (JUMP_SNEAK_SPRINT, "eq", 1),
    "sneak": (JUMP_SNEAK_SPRINT, "eq", 2),
    "sprint": (JUMP_SNEAK_SPRINT, "eq", 3),
    "camera_pitch": (CAMERA_PITCH, "signed", CAMERA_NOOP_BIN),
    "camera_yaw": (CAMERA_YAW, "signed", CAMERA_NOOP_BIN),
    "use": (FUNCTIONAL, "eq", 1),
    "attack": (FUNCTIONAL, "eq", 3),
    "place": (FUNCTIONAL, "eq", 6),
}
DEFAULT_ACTION_FEATURES = tuple(ACTION_FEATURES)
POSE_FEATURE_DIM = 7  # x, y, z scaled; sin/cos pitch; sin/cos yaw
POSE_MODES = ("off", "added")


@dataclasses.dataclass(frozen=True)
class ConditioningConfig:
    """Conditioning module shape and policy. `dim` must equal the DiT width (DiTConfig.dim)."""

    dim: int = 1536
    hidden: int = 256
    frames_per_latent: int = FRAMES_PER_LATENT
    pose: str = "off"  # "off" | "added"
    action_features: tuple[str, ...] = DEFAULT_ACTION_FEATURES
    pose_scale: float = 16.0  # blocks per unit of the position features
    dtype: str = "auto"  # compute dtype of the MLP matmuls (as DiTConfig.dtype)
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "action_features", tuple(self.action_features))
        unknown = [f for f in self.action_features if f not in ACTION_FEATURES]
        if unknown or not self.action_features:
            raise ValueError(f"ConditioningConfig.action_features={self.action_features}: unknown {unknown}; "
                             f"choose a non-empty subset of {DEFAULT_ACTION_FEATURES}")
        if self.pose not in POSE_MODES:
            raise ValueError(f"ConditioningConfig.pose={self.pose!r}; expected one of {POSE_MODES}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"ConditioningConfig.dtype={self.dtype!r}; expected 'auto' or one of {sorted(DTYPES)}")
        if self.param_dtype not in DTYPES:
            raise ValueError(f"ConditioningConfig.param_dtype={self.param_dtype!r}; expected one of {sorted(DTYPES)}")
        if min(self.dim, self.hidden, self.frames_per_latent) < 1:
            raise ValueError(f"ConditioningConfig dim/hidden/frames_per_latent must be positive: {self}")

    @classmethod
    def from_dit(cls, dit_cfg, **overrides) -> "ConditioningConfig":
        """Width and dtype policy taken from a DiTConfig; other fields from `overrides` or the defaults."""
        kw = dict(dim=dit_cfg.dim, dtype=dit_cfg.dtype, param_dtype=dit_cfg.param_dtype)
        return cls(**{**kw, **overrides})

    @property
    def action_dim(self) -> int:
        return len(self.action_features)

    @property
    def compute_dtype(self) -> jnp.dtype:
        if self.dtype == "auto":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return DTYPES[self.dtype]

    def replace(self, **changes) -> "ConditioningConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class DiTConfig(JsonConfig):
    """Wan2.1 DiT architecture plus runtime policy. Field names follow Wan's own configs (`docs/method.md` §2)."""

    # --- architecture (must match the checkpoint) ---
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    text_len: int = 512  # contexts are zero-padded to this many rows before the text MLP (Wan does; it matters)
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_len: int = 1024  # rows of each per-axis RoPE table; frame/row/column positions must stay below it

    # --- runtime policy (free to change for a given checkpoint) ---
    dtype: str = "auto"  # compute dtype of matmuls/attention: auto = bfloat16 on GPU/TPU, float32 on CPU
    param_dtype: str = "float32"  # storage dtype of the weights
    attention: str = "auto"  # auto = cudnn on GPU, xla elsewhere (logged); see models/attention.py
    remat: str = "none"  # activation checkpointing policy for each transformer block
    gelu: str = "xla"  # the FFN's tanh-GELU: xla, triton (Pallas kernel, NVIDIA GPUs) or auto; pallas_kernels/gelu.py
    # Blocks per iteration of the layer scan (lax.scan's unroll): 1 = a loop over layers, num_layers = straight-line
    # code. Same arithmetic either way. Unrolling was meant to let XLA take each layer's weights out of the stacked
    # parameters once instead of copying them per layer and step; on an H100 it does not (the copies stay, the
    # rollout chunk takes the same time, compiles 5-8x longer and holds 4.5 GB more: docs/benchmarks.md, Rollout,
    # session 14), so 1 stays the default.
    layer_unroll: int = 1
    # Output layout of the DiT's Linear layers: "xla" lets XLA choose, "row_major" pins it (layers.Linear), "auto" =
    # row_major on GPU, xla elsewhere (TPU layouts are tiled; on CPU nothing was measured to gain). Same values.
    # Why: XLA made the training step's q/k and FFN GEMM outputs column-major and ran the norm backward on transposed
    # copies; pinned, the stage-3 step on an H100 takes 0.953-0.957x the time (docs/benchmarks.md, Training step).
    # A forward alone has no such backward: `for_inference` resolves "auto" to xla (the pinned rollout chunk took
    # 1.003-1.006x as long, H100, docs/benchmarks.md, Rollout, session 17).
    linear_layout: str = "auto"
    # Residual stream between blocks: float32 as in original Wan (autocast promotes it after the first gated add), or
    # the compute dtype as in diffusers (saves memory traffic; ~1e-2 relative drift in bf16).
    residual_dtype: str = "float32"

    # --- DecMem additions (None: plain Wan2.1 / dense block-causal) ---
    memory: MemoryConfig | None = None  # SGM + ALM + gate in place of dense self-attention
    conditioning: Any = None  # ConditioningConfig (above): actions/poses added to tokens

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"DiTConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"DiTConfig head_dim={self.head_dim} must be even for RoPE")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"DiTConfig.dtype={self.dtype!r}; expected 'auto' or one of {sorted(DTYPES)}")
        if self.param_dtype not in DTYPES:
            raise ValueError(f"DiTConfig.param_dtype={self.param_dtype!r}; expected one of {sorted(DTYPES)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"DiTConfig.attention={self.attention!r}; expected one of {ATTENTION_BACKENDS}")
        if self.gelu not in GELU_BACKENDS:
            raise ValueError(f"DiTConfig.gelu={self.gelu!r}; expected one of {GELU_BACKENDS}")
        if type(self.layer_unroll) is not int or not 1 <= self.layer_unroll <= self.num_layers:
            raise ValueError(f"DiTConfig.layer_unroll={self.layer_unroll!r}; expected an int from 1 (a loop over the "
                             f"layers) to num_layers={self.num_layers} (straight-line code)")
        if self.linear_layout not in LINEAR_LAYOUTS:
            raise ValueError(f"DiTConfig.linear_layout={self.linear_layout!r}; expected one of {LINEAR_LAYOUTS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"DiTConfig.remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.residual_dtype not in ("float32", "compute"):
            raise ValueError(f"DiTConfig.residual_dtype={self.residual_dtype!r}; expected 'float32' or 'compute'")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        # Nested configs arrive as dicts from JSON / ml_collections.
        if isinstance(self.memory, dict):
            object.__setattr__(self, "memory", MemoryConfig(**self.memory))
        if self.memory is not None and not isinstance(self.memory, MemoryConfig):
            raise ValueError(f"DiTConfig.memory must be a MemoryConfig, a dict or None, got {type(self.memory)}")
        if self.memory is not None and self.memory.layers is not None:
            bad = [i for i in self.memory.layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"DiTConfig.memory.layers has {bad}, outside 0..{self.num_layers - 1}")
        if self.conditioning is not None:
            if isinstance(self.conditioning, dict):
                object.__setattr__(self, "conditioning", ConditioningConfig(**self.conditioning))
            if not isinstance(self.conditioning, ConditioningConfig):
                raise ValueError(f"DiTConfig.conditioning must be a ConditioningConfig, a dict or None, "
                                 f"got {type(self.conditioning)}")
            if self.conditioning.dim != self.dim:
                raise ValueError(f"DiTConfig.conditioning.dim={self.conditioning.dim} must equal DiTConfig.dim="
                                 f"{self.dim} (use ConditioningConfig.from_dit)")

    def memory_layer_mask(self) -> tuple[bool, ...]:
        """Per transformer block: True where DecMem attention replaces dense self-attention."""
        if self.memory is None:
            return (False,) * self.num_layers
        layers = self.memory.layers
        return tuple(layers is None or i in layers for i in range(self.num_layers))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of the (t, h, w) RoPE axes: t gets d - 4*(d//6), h and w 2*(d//6) each (44/42/42 at d=128)."""
        d = self.head_dim
        hw = 2 * (d // 6)
        return (d - 2 * hw, hw, hw)

    @property
    def compute_dtype(self) -> jnp.dtype:
        if self.dtype == "auto":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return DTYPES[self.dtype]

    def for_inference(self) -> "DiTConfig":
        """What a rollout runs: remat "none" (nothing is differentiated) and, under "auto", XLA's own Linear output
        layouts (the row-major pin pays in the training step's backward only; see `linear_layout`)."""
        return self.replace(remat="none", linear_layout="xla" if self.linear_layout == "auto" else self.linear_layout)

    @property
    def row_major_linear(self) -> bool:
        """Whether the DiT's Linear outputs are pinned row-major (`linear_layout`, "auto" resolved here)."""
        if self.linear_layout == "auto":
            return jax.default_backend() == "gpu"
        return self.linear_layout == "row_major"

    @property
    def residual(self) -> jnp.dtype:
        return jnp.float32 if self.residual_dtype == "float32" else self.compute_dtype

    @property
    def weight_dtype(self) -> jnp.dtype:
        return DTYPES[self.param_dtype]



PRESETS: dict[str, DiTConfig] = {
    "wan2.1-t2v-1.3b": DiTConfig(),
    # Keeps head_dim 128 and hence the real 44/42/42 RoPE split; everything else is small.
    "tiny": DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64),
    # The world model shipped in weights/world_tiny (configs/world_tiny.py): 8.1M parameters, trained from scratch on
    # 64x64 clips of the procedural world. The text context is fixed (zeros), so it keeps 8 narrow rows only.
    "world-tiny": DiTConfig(dim=256, ffn_dim=768, num_heads=4, num_layers=8, text_dim=32, text_len=8),
}


def get_config(name: str, **overrides: Any) -> DiTConfig:
    """Returns the named preset with `overrides` applied, e.g. `get_config("tiny", dtype="float32")`."""
    if name not in PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
