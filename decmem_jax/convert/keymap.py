"""Declarative checkpoint key maps for the Wan2.1 DiT: one row per key pattern, shared by the converter and the tests.

Each row maps a PyTorch key pattern (with `{i}` standing for the transformer block index) to a path in the NNX
parameter state of `decmem_jax.models.dit.WanDiT` and names the layout transform. Rows with `{i}` target the stacked
block parameters (leading layer axis). The same table drives both directions (torch -> JAX and JAX -> torch).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping

import numpy as np

from decmem_jax.errors import DecMemError
from decmem_jax.models.config import DiTConfig

# Layout transforms: name -> (torch -> jax, jax -> torch).
TRANSFORMS = {
    "none": (lambda a: a, lambda a: a),
    "linear": (lambda a: a.T, lambda a: a.T),  # torch Linear [out, in] <-> kernel [in, out]
    "conv3d": (lambda a: a.transpose(2, 3, 4, 1, 0), lambda a: a.transpose(4, 3, 0, 1, 2)),  # OIDHW <-> DHWIO
    "squeeze0": (lambda a: a[0], lambda a: a[None]),  # modulation tables [1, n, D] <-> [n, D]
}


@dataclasses.dataclass(frozen=True)
class KeyRule:
    source: str  # torch key, `{i}` = block index
    target: tuple[str, ...]  # path in nnx.state(model, nnx.Param)
    transform: str = "none"

    @property
    def per_block(self) -> bool:
        return "{i}" in self.source

    @property
    def regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.source).replace(r"\{i\}", r"(\d+)") + "$")


def _linear(src: str, dst: tuple[str, ...]) -> tuple[KeyRule, KeyRule]:
    return KeyRule(f"{src}.weight", dst + ("kernel",), "linear"), KeyRule(f"{src}.bias", dst + ("bias",))


def _attention(src: str, dst: str, proj: dict[str, str]) -> list[KeyRule]:
    rules = []
    for ours, theirs in proj.items():
        rules += _linear(f"blocks.{{i}}.{src}.{theirs}", ("blocks", dst, ours))
    rules += [KeyRule(f"blocks.{{i}}.{src}.norm_q.weight", ("blocks", dst, "norm_q", "scale")),
              KeyRule(f"blocks.{{i}}.{src}.norm_k.weight", ("blocks", dst, "norm_k", "scale"))]
    return rules


def _table(names: dict[str, str], qkvo: dict[str, str]) -> tuple[KeyRule, ...]:
    n = names
    return (
        KeyRule("patch_embedding.weight", ("patch_embedding", "kernel"), "conv3d"),
        KeyRule("patch_embedding.bias", ("patch_embedding", "bias")),
        *_linear(n["text_1"], ("text_embedding", "linear_1")),
        *_linear(n["text_2"], ("text_embedding", "linear_2")),
        *_linear(n["time_1"], ("time_embedding", "linear_1")),
        *_linear(n["time_2"], ("time_embedding", "linear_2")),
        *_linear(n["time_proj"], ("time_projection",)),
        KeyRule(n["head_mod"], ("head", "modulation"), "squeeze0"),
        *_linear(n["head"], ("head", "linear")),
        KeyRule(f"blocks.{{i}}.{n['block_mod']}", ("blocks", "modulation"), "squeeze0"),
        *_attention(n["self_attn"], "self_attn", qkvo),
        KeyRule(f"blocks.{{i}}.{n['cross_norm']}.weight", ("blocks", "norm3", "scale")),
        KeyRule(f"blocks.{{i}}.{n['cross_norm']}.bias", ("blocks", "norm3", "bias")),
        *_attention(n["cross_attn"], "cross_attn", qkvo),
        *_linear(f"blocks.{{i}}.{n['ffn_1']}", ("blocks", "ffn", "fc1")),
        *_linear(f"blocks.{{i}}.{n['ffn_2']}", ("blocks", "ffn", "fc2")),
    )


# Original Wan2.1 (`WanModel`, diffusion_pytorch_model.safetensors; also CausVid/Self-Forcing after prefix stripping).
ORIGINAL = _table(
    dict(text_1="text_embedding.0", text_2="text_embedding.2", time_1="time_embedding.0",
         time_2="time_embedding.2", time_proj="time_projection.1", head_mod="head.modulation", head="head.head",
         block_mod="modulation", self_attn="self_attn", cross_norm="norm3", cross_attn="cross_attn",
         ffn_1="ffn.0", ffn_2="ffn.2"),
    dict(q="q", k="k", v="v", o="o"),
)

# diffusers `WanTransformer3DModel` (original norm3 is diffusers norm2; diffusers norm3 has no parameters).
DIFFUSERS = _table(
    dict(text_1="condition_embedder.text_embedder.linear_1", text_2="condition_embedder.text_embedder.linear_2",
         time_1="condition_embedder.time_embedder.linear_1", time_2="condition_embedder.time_embedder.linear_2",
         time_proj="condition_embedder.time_proj", head_mod="scale_shift_table", head="proj_out",
         block_mod="scale_shift_table", self_attn="attn1", cross_norm="norm2", cross_attn="attn2",
         ffn_1="ffn.net.0.proj", ffn_2="ffn.net.2"),
    dict(q="to_q", k="to_k", v="to_v", o="to_out.0"),
)

TABLES: dict[str, tuple[KeyRule, ...]] = {"original": ORIGINAL, "diffusers": DIFFUSERS}


def expected_keys(cfg: DiTConfig, layout: str) -> dict[str, KeyRule]:
    """Every torch key a complete checkpoint of this config has, with its rule."""
    keys = {}
    for rule in TABLES[layout]:
        indices = range(cfg.num_layers) if rule.per_block else [None]
        for i in indices:
            keys[rule.source.format(i=i) if i is not None else rule.source] = rule
    return keys


def match(key: str, layout: str) -> tuple[KeyRule, int | None] | None:
    """The rule and block index for a torch key, or None when the layout has no such key."""
    for rule in TABLES[layout]:
        m = rule.regex.match(key)
        if m:
            return rule, (int(m.group(1)) if rule.per_block else None)
    return None


def detect_layout(keys) -> str:
    """'original' or 'diffusers' from the key names (after prefix stripping)."""
    keys = list(keys)
    votes = {name: sum(match(k, name) is not None for k in keys) for name in TABLES}
    best = max(votes, key=votes.get)
    if votes[best] == 0:
        raise ValueError(f"no key matches a known Wan2.1 DiT layout ({sorted(TABLES)}); first keys: {keys[:5]}")
    return best


def target_shape(rule: KeyRule, param_shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> tuple[int, ...]:
    """The torch-side shape expected for one key (per block for stacked targets)."""
    shape = param_shapes[rule.target]
    if rule.per_block:
        shape = shape[1:]
    dummy = np.empty(shape, dtype=np.int8)
    return TRANSFORMS[rule.transform][1](dummy).shape


def iter_export(params: Mapping[tuple[str, ...], np.ndarray], cfg: DiTConfig,
                layout: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (torch key, array in torch layout) for flat JAX params {path: array} (inverse of the converter)."""
    for key, rule in expected_keys(cfg, layout).items():
        arr = np.asarray(params[rule.target])
        if rule.per_block:
            arr = arr[int(rule.regex.match(key).group(1))]
        yield key, np.ascontiguousarray(TRANSFORMS[rule.transform][1](arr))


class CheckpointMismatch(DecMemError, ValueError):
    """A checkpoint does not fit the config: lists every missing key, unexpected key and shape mismatch at once."""


def param_shapes(cfg: DiTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shapes of the NNX parameter state of WanDiT(cfg), without allocating it."""
    from flax import nnx  # local: keeps this table importable without building models

    from decmem_jax.models.dit import WanDiT

    abstract = nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))
    return {tuple(str(p) for p in path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def assemble(items, cfg: DiTConfig, layout: str, dtype=np.float32,
             source: str = "checkpoint") -> dict[tuple[str, ...], np.ndarray]:
    """Builds flat JAX params {path: array} from (torch key, array) pairs, consumed one at a time.

    Stacked block parameters are preallocated and filled in place, so peak memory is the output plus one tensor.
    Every problem (missing, unexpected, mis-shaped keys) is collected and raised together as CheckpointMismatch.
    """
    shapes = param_shapes(cfg)
    expected = expected_keys(cfg, layout)
    out = {path: np.empty(shape, dtype) for path, shape in shapes.items()}
    seen, unexpected, mismatched = set(), [], []
    for key, arr in items:
        rule = expected.get(key)
        if rule is None:
            unexpected.append(key)
            continue
        want = target_shape(rule, shapes)
        if tuple(arr.shape) != want:
            mismatched.append(f"{key}: checkpoint shape {tuple(arr.shape)}, expected {want}")
            continue
        value = TRANSFORMS[rule.transform][0](np.asarray(arr)).astype(dtype, copy=False)
        if rule.per_block:
            out[rule.target][int(rule.regex.match(key).group(1))] = value
        else:
            out[rule.target][...] = value
        seen.add(key)
    missing = sorted(set(expected) - seen - {m.split(":")[0] for m in mismatched})
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the {layout!r} Wan2.1 DiT layout for this config:"]
        lines += [f"  missing key: {k}" for k in missing]
        lines += [f"  unexpected key: {k}" for k in sorted(unexpected)]
        lines += [f"  shape mismatch: {m}" for m in mismatched]
        raise CheckpointMismatch("\n".join(lines))
    return out
