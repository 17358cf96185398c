"""The converted-checkpoint directory shared by every model (`dit.py`, `vae.py`): writing it atomically, telling the
models apart, and restoring an NNX module's parameters from it.

A converted checkpoint is a directory:

    config.json       the model config (`to_json()`), param_dtype = the stored weight dtype
    conversion.json   {"model": "dit" | "vae", "format_version", source path and format, layout, counts, ...}
    params/           Orbax (StandardCheckpointer) checkpoint of the nested parameter dict of the module

Directories written before the "model" field existed hold a DiT and are read as one.
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

from decmem_jax.cli import output_problem
from decmem_jax.errors import DecMemError

CONFIG_FILE = "config.json"
CONVERSION_FILE = "conversion.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
_F32, _BF16 = (np.float32, "float32"), (ml_dtypes.bfloat16, "bfloat16")
# accepted spelling -> (numpy storage dtype, config param_dtype)
WEIGHT_DTYPES = {"f32": _F32, "float32": _F32, "bf16": _BF16, "bfloat16": _BF16}
# conversion.json "model" -> (name in messages, loader, CLI subcommand)
MODELS = {"dit": ("DiT", "decmem_jax.convert.dit.load_dit", "dit"),
          "vae": ("VAE", "decmem_jax.convert.vae.load_vae", "vae")}
LEGACY_MODEL = "dit"  # what a conversion.json without "model" (or a directory without one) holds


class ConvertError(DecMemError, ValueError):
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


# ----- writing -----

def weight_dtype(dtype: str) -> tuple[type, str]:
    """(numpy storage dtype, config param_dtype name) for an accepted spelling ("f32", "bf16", ...)."""
    if dtype not in WEIGHT_DTYPES:
        raise ConvertError(f"unknown weight dtype {dtype!r}; expected one of {sorted(WEIGHT_DTYPES)}")
    return WEIGHT_DTYPES[dtype]


def check_destination(dst: Path, overwrite: bool) -> None:
    """Refuses a destination that is occupied (unless `overwrite`) or cannot be written: below an existing file, on a
    read-only file system, without permission. Called before the source is opened, so a conversion that could
    never be saved fails before any tensor is read rather than after all of them."""
    dst = Path(dst)
    if dst.exists() and not overwrite and not (dst.is_dir() and not any(dst.iterdir())):
        raise ConvertError(f"{dst}: destination already exists and is not empty; pass overwrite=True (--overwrite) "
                           "to replace it")
    problem = output_problem(dst, inside=False)  # the checkpoint is staged next to dst, then renamed into place
    if problem:
        raise ConvertError(f"{dst}: cannot write the converted checkpoint here: {problem}")


def move_into_place(tmp: Path, dst: Path) -> None:
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


def save_params(path: Path, tree: dict) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()


def write_checkpoint(dst: Path, flat: dict[tuple[str, ...], np.ndarray], *, model: str, config_json: str,
                     record: dict) -> Path:
    """Writes flat params (consumed: entries are moved to host JAX arrays one at a time), config.json and
    conversion.json ({"model": model, "format_version": ..., **record}) into a hidden temporary directory next to
    `dst`, then renames it into place: on any failure nothing is left behind."""
    if model not in MODELS:
        raise ValueError(f"unknown model kind {model!r}; expected one of {sorted(MODELS)}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_params(tmp / PARAMS_DIR, nest(flat, to_device=True))
        (tmp / CONFIG_FILE).write_text(config_json + "\n")
        record = dict(model=model, format_version=FORMAT_VERSION, **record)
        (tmp / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        move_into_place(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


# ----- reading -----

def stored_model(path: Path) -> str:
    """The model kind recorded in a converted checkpoint's conversion.json (LEGACY_MODEL when not recorded)."""
    record_file = path / CONVERSION_FILE
    if not record_file.is_file():
        return LEGACY_MODEL
    try:
        record = json.loads(record_file.read_text())
        if not isinstance(record, dict):
            raise TypeError(f"expected a JSON object, found {type(record).__name__}")
    except (ValueError, TypeError) as e:
        raise ConvertError(f"{record_file}: unreadable conversion record ({e})") from None
    return str(record.get("model", LEGACY_MODEL))


def check_checkpoint_dir(path: str | os.PathLike, model: str) -> Path:
    """Checks that `path` is a converted checkpoint of `model` ("dit" | "vae"); raises ConvertError naming what it is
    instead (and the loader to use) otherwise. Returns the expanded path."""
    name, _, command = MODELS[model]
    path = Path(path).expanduser()
    if not path.exists():
        raise ConvertError(f"{path}: converted checkpoint directory does not exist")
    if not (path / CONFIG_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
        raise ConvertError(f"{path}: not a converted {name} checkpoint (expected {CONFIG_FILE} and {PARAMS_DIR}/ as "
                           f"written by `python -m decmem_jax.convert {command}`)")
    found = stored_model(path)
    if found != model:
        if found in MODELS:
            other, loader, _ = MODELS[found]
            raise ConvertError(f"{path}: this is a converted {other} checkpoint ({CONVERSION_FILE} says model="
                               f"{found!r}), not a {name} checkpoint; load it with {loader}")
        raise ConvertError(f"{path}: {CONVERSION_FILE} names an unknown model {found!r}; expected {model!r}")
    return path


def params_sha256(flat: dict) -> str:
    """SHA-256 of a parameter set: every array's path, dtype, shape and bytes, in sorted path order. Recorded by
    `decmem_jax.train.export` (conversion.json "params_sha256") and checked on every restore."""
    import hashlib

    digest = hashlib.sha256()
    items = {"/".join(k) if isinstance(k, tuple) else str(k): v for k, v in flat.items()}
    for name in sorted(items):
        a = np.ascontiguousarray(np.asarray(items[name]))
        digest.update(f"{name}|{a.dtype.name}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def recorded_sha256(path: Path) -> str | None:
    """The "params_sha256" of a converted checkpoint's conversion.json, if it has one."""
    try:
        return json.loads((Path(path) / CONVERSION_FILE).read_text()).get("params_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def restore_params(path: Path, abstract: nnx.Module) -> nnx.Module:
    """Fills the parameters of an abstract module (`nnx.eval_shape`) from `path`/params onto the default device.
    Where conversion.json records the parameters' SHA-256, the restored values must match it (a corrupt file is
    refused with one error naming it)."""
    import orbax.checkpoint as ocp

    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          nnx.to_pure_dict(params))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path / PARAMS_DIR, target)
    except Exception as e:
        raise ConvertError(f"{path}: cannot restore parameters for the stored config "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    expected = recorded_sha256(path)
    if expected is not None:
        found = params_sha256(flatten(jax.device_get(restored)))
        if found != expected:
            raise ConvertError(f"{path / PARAMS_DIR}: the weights are corrupt: their SHA-256 {found[:16]}... differs "
                               f"from the {expected[:16]}... recorded in {CONVERSION_FILE} (restore the files, e.g. "
                               "`git checkout -- <path>`)")
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)


def convert_source(source, dst: Path, *, model: str, cfg, layout: str, detect, assemble, dtype: str,
                   progress: bool) -> Path:
    """The conversion every model shares: resolve layout "auto" with `detect(keys)`, stream the source's tensors
    through `assemble(items, layout, np_dtype, source_description)` (with a progress bar) and write the checkpoint."""
    from tqdm.auto import tqdm

    np_dtype, dtype_name = weight_dtype(dtype)
    if layout == "auto":
        try:
            layout = detect(source.keys())
        except ValueError as e:
            raise ConvertError(f"{source.path}: {e}") from None
    items = tqdm(source, total=len(source), desc=f"converting {source.path.name}", unit="tensor",
                 disable=not progress)
    flat = assemble(items, layout, np_dtype, source.describe())
    record = dict(source=str(source.path), source_format=source.kind, layout=layout, subkey=source.subkey,
                  num_tensors=len(source), num_params=int(sum(a.size for a in flat.values())),
                  param_dtype=dtype_name)
    return write_checkpoint(dst, flat, model=model, config_json=cfg.replace(param_dtype=dtype_name).to_json(),
                            record=record)


def read_model_config(path: str | os.PathLike, model: str, config_cls):
    """The config (`config_cls.from_json`) stored in a converted checkpoint directory of `model`."""
    path = check_checkpoint_dir(path, model)
    try:
        return config_cls.from_json((path / CONFIG_FILE).read_text())
    except (ValueError, TypeError) as e:
        raise ConvertError(f"{path / CONFIG_FILE}: invalid {MODELS[model][0]} config ({e})") from None


def resolve_config(config, config_cls, presets):
    """A config object as given, or the named preset (`presets(name)`); unknown names raise ConvertError."""
    if isinstance(config, config_cls):
        return config
    try:
        return presets(config)
    except ValueError as e:
        raise ConvertError(str(e)) from None
