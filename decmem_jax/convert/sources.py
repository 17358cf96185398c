"""Streaming checkpoint readers: every source yields (key, numpy array) one tensor at a time.

Accepted inputs (see `open_source`):
- a single `.safetensors` file (fp32, fp16 or bf16; bf16 arrives as an `ml_dtypes.bfloat16` array);
- a sharded `*.safetensors.index.json` (its `weight_map` names the shards; each shard is opened once);
- a directory holding `diffusion_pytorch_model.safetensors[.index.json]` (or exactly one safetensors file/index),
  or a diffusers repository root with such a subfolder (`subfolder`: `transformer/` for the DiT, `vae/` for the VAE);
- a PyTorch pickle (`.pt`, `.pth`, `.bin`, `.ckpt`), loaded with `weights_only=True` and memory-mapped where the file
  format allows. Training checkpoints that nest several state dicts (Self-Forcing / CausVid:
  `{"generator": ..., "generator_ema": ..., "critic": ...}`) are resolved with `subkey` (see `SUBKEY_PREFERENCE`).
  A single safetensors file whose keys carry such groups (`generator_ema.*`, `generator.*`, `critic.*`) is resolved
  the same way, on the first key component.

Keys are normalised the same way for every format: wrapper prefixes (`model.`, `generator.`, `generator_ema.`,
`module.`) are stripped from the front and wrapper infixes (`_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`,
`_orig_mod.`) are removed anywhere, repeatedly, until nothing changes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from decmem_jax.errors import DecMemError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DIFFUSERS_NAME = "diffusion_pytorch_model.safetensors"
SUBKEY_PREFERENCE = ("generator_ema", "generator", "model", "state_dict")  # what subkey="auto" looks for, in order
STRIP_PREFIXES = ("model.", "generator_ema.", "generator.", "module.")
STRIP_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class SourceError(DecMemError, ValueError):
    """A checkpoint source cannot be read: the message names the path and the problem."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """A checkpoint path (or a shard named by an index) does not exist."""


def normalize_key(key: str) -> str:
    """Strips training-wrapper prefixes and infixes until the key stops changing."""
    while True:
        old = key
        for infix in STRIP_INFIXES:
            key = key.replace(infix, "")
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key == old:
            return key


class Source:
    """A checkpoint opened for streaming. `keys()` is cheap (headers only); iterating yields (key, array)."""

    path: Path
    kind: str  # human-readable format name
    subkey: str | None = None  # the nested state dict (or key group of a flat file) that was picked

    def __init__(self, path: Path, kind: str, raw_keys: list[str]):
        self.path, self.kind = path, kind
        self._raw_keys = raw_keys
        self._keys = [normalize_key(k) for k in raw_keys]
        seen: dict[str, str] = {}
        for raw, key in zip(raw_keys, self._keys):
            if key in seen:
                raise SourceError(f"{path}: keys {seen[key]!r} and {raw!r} both become {key!r} after stripping "
                                  "wrapper prefixes; pick one copy with subkey (--subkey)")
            seen[key] = raw

    def keys(self) -> list[str]:
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        try:
            for key, (_, arr) in zip(self._keys, self._read()):
                yield key, arr
        except SourceError:
            raise
        except Exception as e:  # truncated data, I/O errors: report them against the file
            raise SourceError(f"{self.path}: failed while reading tensors ({type(e).__name__}: {e})") from e

    def _read(self) -> Iterator[tuple[str, np.ndarray]]:
        raise NotImplementedError

    def describe(self) -> str:
        sub = f", state dict {self.subkey!r}" if self.subkey else ""
        return f"{self.path} ({self.kind}, {len(self)} tensors{sub})"


def _safe_open(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise SourceNotFoundError(f"{path}: safetensors file does not exist")
    try:
        return safe_open(str(path), framework="np")
    except Exception as e:
        raise SourceError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def _pick_prefix(path: Path, keys: list[str], subkey: str) -> tuple[str | None, list[str]]:
    """Flat files may hold a training checkpoint as `generator_ema.*`, `generator.*`, `critic.*` keys: the first
    key component plays the role of the pickle's top-level dict for `subkey`."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.split(".", 1)[0], []).append(k)
    if subkey != "auto":
        if subkey not in groups:
            raise SourceError(f"{path}: has no keys under {subkey + '.'!r}; first key components are: "
                              + ", ".join(repr(g) for g in list(groups)[:12]))
        return subkey, groups[subkey]
    for name in ("generator_ema", "generator"):  # "model." here is a wrapper prefix, not a choice between copies
        if name in groups and len(groups) > 1:
            return name, groups[name]  # e.g. generator_ema.* next to generator.* and critic.*
    return None, keys


class SafetensorsSource(Source):
    """One `.safetensors` file."""

    def __init__(self, path: Path, subkey: str = "auto"):
        with _safe_open(path) as f:
            keys = list(f.keys())
        self.subkey, keys = _pick_prefix(path, keys, subkey)
        super().__init__(path, "safetensors", keys)

    def _read(self):
        with _safe_open(self.path) as f:
            for key in self._raw_keys:
                yield key, f.get_tensor(key)


class ShardedSafetensorsSource(Source):
    """A `*.safetensors.index.json` and its shards; every shard is checked up front and opened once."""

    def __init__(self, index: Path):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except Exception as e:
            raise SourceError(f"{index}: not a safetensors index with a 'weight_map' ({type(e).__name__}: {e})") \
                from e
        self._shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            self._shards.setdefault(shard, []).append(key)
        missing = sorted(s for s in self._shards if not (index.parent / s).is_file())
        if missing:
            raise SourceNotFoundError(f"{index}: names shard(s) that do not exist next to it: {', '.join(missing)}")
        for shard, keys in self._shards.items():  # headers only: catches corrupt shards and wrong weight maps early
            with _safe_open(index.parent / shard) as f:
                absent = sorted(set(keys) - set(f.keys()))
            if absent:
                raise SourceError(f"{index}: shard {shard} lacks {len(absent)} key(s) the index assigns to it, "
                                  f"e.g. {absent[:3]}")
        super().__init__(index, f"sharded safetensors, {len(self._shards)} shards",
                         [k for keys in self._shards.values() for k in keys])

    def _read(self):
        for shard, keys in self._shards.items():
            with _safe_open(self.path.parent / shard) as f:
                for key in keys:
                    yield key, f.get_tensor(key)


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits as ml_dtypes.bfloat16 (no upcast copy)
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class TorchSource(Source):
    """A PyTorch pickle holding a state dict, possibly nested in a training checkpoint."""

    def __init__(self, path: Path, subkey: str = "auto"):
        import torch

        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) pickles cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SourceError(f"{path}: cannot load as a PyTorch checkpoint with weights_only=True "
                              f"({type(e).__name__}: {e})") from e
        if not isinstance(obj, dict):
            raise SourceError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        self.subkey, state = self._pick(path, obj, subkey)
        self._tensors = {}
        self._flatten(state, "")
        if not self._tensors:
            raise SourceError(f"{path}: {('state dict ' + repr(self.subkey)) if self.subkey else 'the file'} "
                              "holds no tensors")
        super().__init__(path, "torch pickle", list(self._tensors))

    @staticmethod
    def _pick(path: Path, obj: dict, subkey: str) -> tuple[str | None, dict]:
        top = ", ".join(repr(k) for k in obj) or "(none)"
        if subkey != "auto":
            if subkey not in obj or not isinstance(obj[subkey], dict):
                raise SourceError(f"{path}: has no state dict {subkey!r}; top-level keys are: {top}")
            return subkey, obj[subkey]
        for name in SUBKEY_PREFERENCE:
            if isinstance(obj.get(name), dict):
                return name, obj[name]
        return None, obj

    def _flatten(self, d: dict, prefix: str) -> None:
        import torch

        for k, v in d.items():
            if isinstance(v, torch.Tensor):
                self._tensors[prefix + str(k)] = v
            elif isinstance(v, dict):
                self._flatten(v, f"{prefix}{k}.")
            # other leaves (step counters, metadata) are not weights

    def _read(self):
        for key in self._raw_keys:
            yield key, _torch_to_numpy(self._tensors[key])


def _resolve_dir(path: Path, subfolder: str = "transformer") -> Path:
    """The weights file inside a diffusers/Wan directory (or its `subfolder`, e.g. a repository's `transformer/`)."""
    for d in (path, path / subfolder):
        for name in (DIFFUSERS_NAME + ".index.json", DIFFUSERS_NAME):
            if (d / name).is_file():
                return d / name
    candidates = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    listing = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "(empty)"
    why = "several candidates" if candidates else "no weights"
    raise SourceError(f"{path}: directory has {why}: expected {DIFFUSERS_NAME}[.index.json] here or under "
                      f"{subfolder}/, or exactly one *.safetensors file; contents: {listing}")


def open_source(path: str | os.PathLike, *, subkey: str = "auto", subfolder: str = "transformer") -> Source:
    """Opens a checkpoint file or directory for streaming; raises SourceError (or SourceNotFoundError).

    subfolder: where a diffusers repository root keeps this model's weights ("transformer" for the DiT, "vae")."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SourceNotFoundError(f"{path}: checkpoint path does not exist")
    if path.is_dir():
        path = _resolve_dir(path, subfolder)
    name = path.name.lower()
    if name.endswith(".safetensors.index.json"):
        if subkey != "auto":
            raise SourceError(f"{path}: subkey={subkey!r} is not supported for sharded checkpoints")
        return ShardedSafetensorsSource(path)
    if name.endswith(".safetensors"):
        return SafetensorsSource(path, subkey)
    if name.endswith(TORCH_SUFFIXES):
        return TorchSource(path, subkey)
    raise SourceError(f"{path}: unknown checkpoint type; expected .safetensors, .safetensors.index.json, "
                      f"a diffusers directory, or a PyTorch file ({', '.join(TORCH_SUFFIXES)})")
