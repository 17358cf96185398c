"""Wan2.1 DiT checkpoints: convert PyTorch weights to an Orbax checkpoint once, then `load_dit` it in one call.

A converted checkpoint is a directory:

    config.json       DiTConfig.to_json(), param_dtype = the stored weight dtype
    conversion.json   where it came from: source path and format, layout, subkey, tensor and parameter counts
    params/           Orbax (StandardCheckpointer) checkpoint of the nested parameter dict of WanDiT

Conversion streams the source tensor by tensor into preallocated arrays (`keymap.assemble`), writes everything into a
hidden temporary directory next to `dst` and renames it into place only when complete: a failed conversion leaves
no output behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from decmem_jax.convert import keymap
from decmem_jax.convert.sources import SourceError, open_source
from decmem_jax.models.config import DiTConfig, get_config
from decmem_jax.models.dit import WanDiT

CONFIG_FILE = "config.json"
CONVERSION_FILE = "conversion.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
_F32, _BF16 = (np.float32, "float32"), (ml_dtypes.bfloat16, "bfloat16")
# accepted spelling -> (numpy storage dtype, DiTConfig.param_dtype)
WEIGHT_DTYPES = {"f32": _F32, "float32": _F32, "bf16": _BF16, "bfloat16": _BF16}


class ConvertError(ValueError):
    """Bad conversion arguments, an occupied destination, or a directory that is not a converted checkpoint."""


# ----- flat params {path tuple: array} <-> nested dict -----

def nest(flat: dict[tuple[str, ...], np.ndarray], *, to_device: bool = False) -> dict:
    """{('a', 'b'): x} -> {'a': {'b': x}}. With to_device, entries become host (CPU) JAX arrays one at a time and are
    removed from `flat`: Orbax deep-copies numpy leaves before writing but not JAX arrays, so this keeps the save at
    about one copy of the weights."""
    cpu = jax.local_devices(backend="cpu")[0] if to_device else None
    tree: dict = {}
    for path in list(flat):
        value = flat.pop(path) if to_device else flat[path]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jax.device_put(value, cpu) if to_device else value
    return tree


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """{'a': {'b': x}} -> {('a', 'b'): x}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


# ----- conversion -----

def _resolve_config(config: str | DiTConfig) -> DiTConfig:
    if isinstance(config, DiTConfig):
        return config
    try:
        return get_config(config)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def _check_destination(dst: Path, overwrite: bool) -> None:
    if not dst.exists() or overwrite:
        return
    if dst.is_dir() and not any(dst.iterdir()):
        return
    raise ConvertError(f"{dst}: destination already exists and is not empty; pass overwrite=True (--overwrite) to "
                       "replace it")


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Renames tmp -> dst; an existing dst (allowed by the caller) is moved aside first and removed afterwards."""
    old = None
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
    elif dst.is_dir():
        dst.rmdir()
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def convert_dit(src: str | os.PathLike, dst: str | os.PathLike, *, layout: str = "auto", dtype: str = "f32",
                config: str | DiTConfig = "wan2.1-t2v-1.3b", subkey: str = "auto", overwrite: bool = False,
                progress: bool = True) -> Path:
    """Converts a PyTorch Wan2.1 DiT checkpoint (see `sources.open_source` for the accepted inputs) into a
    converted-checkpoint directory at `dst` and returns its path.

    layout: "auto" (from the key names), "original" (Wan / CausVid / Self-Forcing) or "diffusers".
    dtype: storage dtype of the converted weights, "f32" or "bf16".
    config: preset name or DiTConfig; its architecture must match the checkpoint (every mismatch is reported at once
    as keymap.CheckpointMismatch).
    subkey: which nested state dict of a training checkpoint to use ("auto": generator_ema > generator > model >
    state_dict > the file itself).
    """
    from tqdm.auto import tqdm

    if dtype not in WEIGHT_DTYPES:
        raise ConvertError(f"unknown weight dtype {dtype!r}; expected one of {sorted(WEIGHT_DTYPES)}")
    if layout != "auto" and layout not in keymap.TABLES:
        raise ConvertError(f"unknown layout {layout!r}; expected 'auto' or one of {sorted(keymap.TABLES)}")
    np_dtype, dtype_name = WEIGHT_DTYPES[dtype]
    cfg = _resolve_config(config).replace(param_dtype=dtype_name)
    dst = Path(dst).expanduser().absolute()
    _check_destination(dst, overwrite)

    source = open_source(src, subkey=subkey)
    if layout == "auto":
        try:
            layout = keymap.detect_layout(source.keys())
        except ValueError as e:
            raise ConvertError(f"{source.path}: {e}") from None
    items = tqdm(source, total=len(source), desc=f"converting {source.path.name}", unit="tensor",
                 disable=not progress)
    flat = keymap.assemble(items, cfg, layout, dtype=np_dtype, source=source.describe())
    num_params = int(sum(a.size for a in flat.values()))

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _save_params(tmp / PARAMS_DIR, nest(flat, to_device=True))
        (tmp / CONFIG_FILE).write_text(cfg.to_json() + "\n")
        record = dict(format_version=FORMAT_VERSION, source=str(source.path), source_format=source.kind,
                      layout=layout, subkey=source.subkey, num_tensors=len(source), num_params=num_params,
                      param_dtype=dtype_name)
        (tmp / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _move_into_place(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _save_params(path: Path, tree: dict) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()


# ----- loading -----

def read_config(path: str | os.PathLike) -> DiTConfig:
    """The DiTConfig stored in a converted checkpoint directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConvertError(f"{path}: converted checkpoint directory does not exist")
    if not (path / CONFIG_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
        raise ConvertError(f"{path}: not a converted DiT checkpoint (expected {CONFIG_FILE} and {PARAMS_DIR}/ as "
                           "written by `python -m decmem_jax.convert dit`)")
    try:
        return DiTConfig.from_json((path / CONFIG_FILE).read_text())
    except (ValueError, TypeError) as e:
        raise ConvertError(f"{path / CONFIG_FILE}: invalid DiT config ({e})") from None


def load_dit(path: str | os.PathLike, *, dtype: str | None = None, attention: str | None = None,
             remat: str | None = None) -> WanDiT:
    """Builds a WanDiT from a converted checkpoint directory, with optional runtime overrides of the compute dtype,
    attention backend and remat policy (weights stay in their stored dtype)."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().absolute()
    overrides = {k: v for k, v in dict(dtype=dtype, attention=attention, remat=remat).items() if v is not None}
    cfg = read_config(path).replace(**overrides)
    abstract = nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          nnx.to_pure_dict(params))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path / PARAMS_DIR, target)
    except Exception as e:
        raise ConvertError(f"{path}: cannot restore parameters for the stored config "
                           f"({type(e).__name__}: {e})") from e
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)


__all__ = ["ConvertError", "SourceError", "convert_dit", "load_dit", "read_config", "nest", "flatten"]
