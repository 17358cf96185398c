"""Declarative checkpoint key maps for the Wan2.1 VAE (`decmem_jax.models.vae.WanVAE`).

Two tables:
- `DIFFUSERS`: one row per diffusers `AutoencoderKLWan` key pattern -> path pattern in `nnx.state(WanVAE, nnx.Param)`
  plus a layout transform. `{i}`/`{j}` stand for list indices and are carried over unchanged.
- `ORIGINAL_RENAMES`: original Wan `Wan2.1_VAE.pth` key pattern <-> diffusers key pattern (the 194 renames between the two published layouts). The
  decoder's flat `upsamples.{n}` index becomes (up block i, resnet j) with n = i * (num_res_blocks + 2) + j, the
  upsampler sitting last in each block, so that row needs the config.
The tables are expanded against the model's own parameter tree, so they fit any VAEConfig (tiny or full size), and the
same expansion drives both directions (torch -> JAX in `assemble_vae`, JAX -> torch in `iter_export_vae`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterator, Mapping

import numpy as np

from decmem_jax.convert.keymap import TRANSFORMS as _DIT_TRANSFORMS
from decmem_jax.convert.keymap import CheckpointMismatch
from decmem_jax.models.vae import VAEConfig

# Layout transforms: name -> (torch -> jax, jax -> torch). The DiT's (none, conv3d OIDHW<->DHWIO, ...) plus:
TRANSFORMS = {
    **_DIT_TRANSFORMS,
    "conv2d": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
    "gamma3d": (lambda a: a.reshape(-1), lambda a: a.reshape(-1, 1, 1, 1)),  # RMS_norm over video (C,1,1,1)
    "gamma2d": (lambda a: a.reshape(-1), lambda a: a.reshape(-1, 1, 1)),  # RMS_norm in attention (C,1,1)
}

LAYOUTS = ("diffusers", "original")
_INDEX = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "n": r"(?P<n>\d+)"}


def _regex(pattern: str) -> re.Pattern:
    out = re.escape(pattern)
    for name, group in _INDEX.items():
        out = out.replace(re.escape("{" + name + "}"), group)
    return re.compile("^" + out + "$")


@dataclasses.dataclass(frozen=True)
class VAEKeyRule:
    source: str  # diffusers key pattern
    target: str  # dotted path pattern in nnx.state(WanVAE, nnx.Param)
    transform: str = "none"


def _conv(src: str, dst: str, kind: str = "conv3d") -> list[VAEKeyRule]:
    return [VAEKeyRule(f"{src}.weight", f"{dst}.kernel", kind), VAEKeyRule(f"{src}.bias", f"{dst}.bias")]


def _residual(prefix: str) -> list[VAEKeyRule]:
    return [VAEKeyRule(f"{prefix}.norm1.gamma", f"{prefix}.norm1.gamma", "gamma3d"),
            *_conv(f"{prefix}.conv1", f"{prefix}.conv1"),
            VAEKeyRule(f"{prefix}.norm2.gamma", f"{prefix}.norm2.gamma", "gamma3d"),
            *_conv(f"{prefix}.conv2", f"{prefix}.conv2"),
            *_conv(f"{prefix}.conv_shortcut", f"{prefix}.conv_shortcut")]


def _resample(prefix: str) -> list[VAEKeyRule]:
    # diffusers keeps the spatial conv at index 1 of an nn.Sequential (after the pad / upsample op).
    return [*_conv(f"{prefix}.resample.1", f"{prefix}.resample", "conv2d"),
            *_conv(f"{prefix}.time_conv", f"{prefix}.time_conv")]


def _coder(m: str) -> list[VAEKeyRule]:
    att = f"{m}.mid_block.attentions.{{i}}"
    return [*_conv(f"{m}.conv_in", f"{m}.conv_in"),
            *_residual(f"{m}.mid_block.resnets.{{i}}"),
            VAEKeyRule(f"{att}.norm.gamma", f"{att}.norm.gamma", "gamma2d"),
            *_conv(f"{att}.to_qkv", f"{att}.to_qkv", "conv2d"),
            *_conv(f"{att}.proj", f"{att}.proj", "conv2d"),
            VAEKeyRule(f"{m}.norm_out.gamma", f"{m}.norm_out.gamma", "gamma3d"),
            *_conv(f"{m}.conv_out", f"{m}.conv_out")]


DIFFUSERS: tuple[VAEKeyRule, ...] = (
    *_conv("quant_conv", "quant_conv"),
    *_conv("post_quant_conv", "post_quant_conv"),
    *_coder("encoder"),
    *_residual("encoder.down_blocks.{i}"),
    *_resample("encoder.down_blocks.{i}"),
    *_coder("decoder"),
    *_residual("decoder.up_blocks.{i}.resnets.{j}"),
    *_resample("decoder.up_blocks.{i}.upsamplers.{j}"),
)


@dataclasses.dataclass(frozen=True)
class Rename:
    """original key pattern <-> diffusers key pattern. `index`: how the original `{n}` relates to diffusers' indices
    ("same": n = i; "up_resnet": n = i*(R+2) + j; "up_sampler": n = i*(R+2) + R + 1, R = num_res_blocks)."""

    original: str
    diffusers: str
    index: str = "same"


def _renames() -> tuple[Rename, ...]:
    leaf = ("weight", "bias")
    residual = [("residual.0.gamma", "norm1.gamma"), ("residual.3.gamma", "norm2.gamma")]
    residual += [(f"{o}.{w}", f"{d}.{w}") for o, d in (("residual.2", "conv1"), ("residual.6", "conv2"),
                                                        ("shortcut", "conv_shortcut")) for w in leaf]
    resample = [(f"{p}.{w}", f"{p}.{w}") for p in ("resample.1", "time_conv") for w in leaf]
    attention = ["norm.gamma"] + [f"{p}.{w}" for p in ("to_qkv", "proj") for w in leaf]
    rows = [Rename(f"conv1.{w}", f"quant_conv.{w}") for w in leaf]
    rows += [Rename(f"conv2.{w}", f"post_quant_conv.{w}") for w in leaf]
    for m in ("encoder", "decoder"):
        rows += [Rename(f"{m}.conv1.{w}", f"{m}.conv_in.{w}") for w in leaf]
        rows += [Rename(f"{m}.head.0.gamma", f"{m}.norm_out.gamma")]
        rows += [Rename(f"{m}.head.2.{w}", f"{m}.conv_out.{w}") for w in leaf]
        for k, r in ((0, 0), (2, 1)):  # middle = [resnet, attention, resnet]
            rows += [Rename(f"{m}.middle.{k}.{o}", f"{m}.mid_block.resnets.{r}.{d}") for o, d in residual]
        rows += [Rename(f"{m}.middle.1.{a}", f"{m}.mid_block.attentions.0.{a}") for a in attention]
    rows += [Rename(f"encoder.downsamples.{{n}}.{o}", f"encoder.down_blocks.{{i}}.{d}") for o, d in residual + resample]
    rows += [Rename(f"decoder.upsamples.{{n}}.{o}", f"decoder.up_blocks.{{i}}.resnets.{{j}}.{d}", "up_resnet")
             for o, d in residual]
    rows += [Rename(f"decoder.upsamples.{{n}}.{o}", f"decoder.up_blocks.{{i}}.upsamplers.0.{d}", "up_sampler")
             for o, d in resample]
    return tuple(rows)


ORIGINAL_RENAMES: tuple[Rename, ...] = _renames()


def original_key(diffusers_key: str, cfg: VAEConfig) -> str:
    """The original Wan `.pth` key for a diffusers key (ValueError when no rename row covers it)."""
    stride = cfg.num_res_blocks + 2
    for row in ORIGINAL_RENAMES:
        m = _regex(row.diffusers).match(diffusers_key)
        if m is None:
            continue
        g = {k: int(v) for k, v in m.groupdict().items()}
        n = {"same": lambda: g.get("i"), "up_resnet": lambda: g["i"] * stride + g["j"],
             "up_sampler": lambda: g["i"] * stride + stride - 1}[row.index]()
        return row.original.format(n=n)
    raise ValueError(f"no original-layout rename for diffusers VAE key {diffusers_key!r}")


@functools.lru_cache(maxsize=8)
def vae_param_shapes(cfg: VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shapes of the NNX parameter state of WanVAE(cfg), without allocating it."""
    from flax import nnx  # local: keeps this table importable without building models

    from decmem_jax.models.vae import WanVAE

    abstract = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
    return {tuple(str(p) for p in path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def expected_vae_keys(cfg: VAEConfig, layout: str) -> dict[str, tuple[VAEKeyRule, tuple[str, ...]]]:
    """Every torch key a complete checkpoint of this config has -> (rule, JAX param path)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown VAE checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    keys = {}
    for path in vae_param_shapes(cfg):
        dotted = ".".join(path)
        hits = [(rule, m) for rule in DIFFUSERS if (m := _regex(rule.target).match(dotted))]
        if len(hits) != 1:  # a table bug, not a checkpoint problem
            raise AssertionError(f"VAE param {dotted} matches {len(hits)} key-table rows; expected exactly one")
        rule, m = hits[0]
        key = rule.source.format(**m.groupdict())
        keys[original_key(key, cfg) if layout == "original" else key] = (rule, path)
    return keys


def detect_vae_layout(keys, cfg: VAEConfig) -> str:
    """'original' or 'diffusers' from the key names (after prefix stripping)."""
    keys = set(keys)
    votes = {layout: len(keys & set(expected_vae_keys(cfg, layout))) for layout in LAYOUTS}
    best = max(votes, key=votes.get)
    if votes[best] == 0:
        raise ValueError(f"no key matches a known Wan2.1 VAE layout {LAYOUTS}; first keys: {sorted(keys)[:5]}")
    return best


def _torch_shape(rule: VAEKeyRule, shape: tuple[int, ...]) -> tuple[int, ...]:
    return TRANSFORMS[rule.transform][1](np.empty(shape, np.int8)).shape


def assemble_vae(items, cfg: VAEConfig, layout: str, dtype=np.float32,
                 source: str = "checkpoint") -> dict[tuple[str, ...], np.ndarray]:
    """Builds flat JAX params {path: array} from (torch key, array) pairs, consumed one at a time.

    Same contract as `keymap.assemble`: every missing, unexpected and mis-shaped key is collected and raised together
    as `keymap.CheckpointMismatch`.
    """
    shapes = vae_param_shapes(cfg)
    expected = expected_vae_keys(cfg, layout)
    out, seen, unexpected, mismatched = {}, set(), [], {}
    for key, arr in items:
        if key not in expected:
            unexpected.append(key)
            continue
        rule, path = expected[key]
        want = _torch_shape(rule, shapes[path])
        if tuple(arr.shape) != want:
            mismatched[key] = f"{key}: checkpoint shape {tuple(arr.shape)}, expected {want}"
            continue
        out[path] = np.ascontiguousarray(TRANSFORMS[rule.transform][0](np.asarray(arr))).astype(dtype, copy=False)
        seen.add(key)
    missing = sorted(set(expected) - seen - set(mismatched))
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the {layout!r} Wan2.1 VAE layout for this config:"]
        lines += [f"  missing key: {k}" for k in missing]
        lines += [f"  unexpected key: {k}" for k in sorted(unexpected)]
        lines += [f"  shape mismatch: {m}" for m in mismatched.values()]
        raise CheckpointMismatch("\n".join(lines))
    return out


def iter_export_vae(params: Mapping[tuple[str, ...], np.ndarray], cfg: VAEConfig,
                    layout: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (torch key, array in torch layout) for flat JAX params {path: array} (inverse of `assemble_vae`)."""
    for key, (rule, path) in expected_vae_keys(cfg, layout).items():
        yield key, np.ascontiguousarray(TRANSFORMS[rule.transform][1](np.asarray(params[path])))
