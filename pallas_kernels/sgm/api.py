"""`sgm_attention`: Sparse Global Memory block-sparse attention behind one backend switch, with a small registry.

Backends:
- `reference`: pure XLA gather + masked fp32 softmax (`reference.py`); any platform; the oracle.
- `mosaic_gpu`: Pallas Mosaic GPU kernels (`pallas_kernels/sgm/mosaic_gpu.py`), NVIDIA compute capability 9.x;
  bfloat16/float16, head dim 64 or 128, block_q and block_kv multiples of 64.
- `tpu`: Pallas Mosaic TPU kernel (`pallas_kernels/sgm/tpu.py`); float32/bfloat16.
- `auto`: mosaic_gpu on a 9.x GPU, tpu on TPU, reference on CPU. On a GPU/TPU without a registered kernel `auto`
  raises instead of silently running the reference; `backend="reference"` is the explicit opt-in. The backend that
  runs is logged once per backend.

Kernel modules plug in by calling `register_backend` at import time; api.py imports `mosaic_gpu`/`tpu` lazily when
they are asked for. Backend functions (all keyword arguments static Python values):

    fwd(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, *, block_q, block_kv, scale) -> (out, lse)
    bwd(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, out, lse, dout, *, block_q, block_kv, scale[, q_rows])
        -> (dq, dk, dv)

`q_rows` reaches bwd only when a caller passes it (a static int < block_q): the rows of a query block past it are
padding, whose cotangent the backend must take as zero (`reference.mask_padding_rows`) and may skip. It reaches fwd
only in the forward-only form (return_lse=True) and only for a backend registered with fwd_q_rows=True, which may
then skip those rows (returning out 0 and LSE −inf for them) or compute them as usual.

`lse` is a residual passed back unchanged to the same backend's bwd; report it as the natural-log LSE fp32
[B, H, Tq] (−inf for rows without a valid key) so it can be checked against `sgm_reference`. Indices reach the
backends as int32, clipped into range (counts to [0, K], lengths to [0, block_kv], ids to [0, Nk)).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.sgm.reference import check_q_rows, sgm_reference, sgm_reference_bwd

log = logging.getLogger(__name__)
_announced: set[str] = set()
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Built-in kernels loaded on demand: backend name -> (module, platform it needs).
_BUILTIN = {"mosaic_gpu": ("pallas_kernels.sgm.mosaic_gpu", "gpu"), "tpu": ("pallas_kernels.sgm.tpu", "tpu")}


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    fwd: Callable
    bwd: Callable | None  # None: forward only (differentiating raises)
    tile: tuple[int, int] = (1, 1)  # block_q and block_kv must be multiples of these
    head_dims: tuple[int, ...] | None = None  # supported head dims (None: any)
    dtypes: tuple = _DTYPES
    platforms: tuple[str, ...] | None = None  # JAX platforms it runs on (None: any)
    fwd_q_rows: bool = False  # fwd takes q_rows (forward-only calls; see the module docstring)


_REGISTRY: dict[str, Backend] = {}
_import_errors: dict[str, str] = {}


def register_backend(name: str, fwd: Callable, bwd: Callable | None, *, tile: tuple[int, int] = (1, 1),
                     head_dims: tuple[int, ...] | None = None, dtypes=_DTYPES,
                     platforms: tuple[str, ...] | None = None, fwd_q_rows: bool = False) -> Backend:
    """Registers (or replaces) a backend under `name`; see the module docstring for the fwd/bwd signatures."""
    if name == "auto":
        raise ValueError("backend name 'auto' is reserved")
    tile = tuple(int(t) for t in tile)
    if len(tile) != 2 or min(tile) < 1:
        raise ValueError(f"tile must be two positive ints (block_q, block_kv multiples), got {tile}")
    entry = Backend(name, fwd, bwd, tile, None if head_dims is None else tuple(head_dims),
                    tuple(jnp.dtype(d) for d in dtypes), None if platforms is None else tuple(platforms),
                    bool(fwd_q_rows))
    if name in _REGISTRY:
        log.info("sgm backend %r re-registered", name)
    _REGISTRY[name] = entry
    return entry


def _reference_fwd(q, k, v, idx, cnt, lens, *, block_q, block_kv, scale):
    return sgm_reference(q, k, v, idx, cnt, lens, block_q=block_q, block_kv=block_kv, scale=scale)


register_backend("reference", _reference_fwd, sgm_reference_bwd)


def _load_builtin(name: str) -> None:
    """Imports a built-in kernel module (which registers itself); remembers why it failed, if it did."""
    if name in _REGISTRY or name not in _BUILTIN:
        return
    module = _BUILTIN[name][0]
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- reported in the error that names the missing kernel
        _import_errors[name] = f"{type(e).__name__}: {e}"
        log.debug("sgm backend %r unavailable: %s", name, _import_errors[name])


def _missing(name: str) -> str:
    why = _import_errors.get(name, f"{_BUILTIN[name][0]} imported but did not call register_backend({name!r}, ...)")
    return f"the SGM kernel {name!r} ({_BUILTIN[name][0]}) is not registered ({why})"


def _gpu_is_sm90() -> tuple[bool, str]:
    cc = str(getattr(jax.devices()[0], "compute_capability", "unknown"))
    return cc.startswith("9."), cc


def resolve_sgm_backend(name: str) -> Backend:
    """Maps `auto` to the kernel for the default JAX platform and checks that a named backend can run here."""
    platform = jax.default_backend()
    if name == "auto":
        if platform == "gpu":
            ok, cc = _gpu_is_sm90()
            if not ok:
                raise RuntimeError(f"sgm_attention backend 'auto': no SGM kernel for a GPU of compute capability {cc} "
                                   "(mosaic_gpu needs 9.x); pass backend='reference' to run the XLA oracle explicitly")
            name = "mosaic_gpu"
        elif platform == "tpu":
            name = "tpu"
        else:
            name = "reference"
        _load_builtin(name)
        if name not in _REGISTRY:
            raise RuntimeError(f"sgm_attention backend 'auto' on platform {platform!r}: {_missing(name)}; pass "
                               "backend='reference' to run the XLA oracle explicitly")
        return _REGISTRY[name]
    if name in _BUILTIN:
        needs = _BUILTIN[name][1]
        if platform != needs:
            raise ValueError(f"sgm_attention backend {name!r} needs JAX platform {needs!r}; the default platform is "
                             f"{platform!r}. Use backend='reference' (or 'auto').")
        if name == "mosaic_gpu" and not _gpu_is_sm90()[0]:
            raise ValueError(f"sgm_attention backend 'mosaic_gpu' needs compute capability 9.x, "
                             f"got {_gpu_is_sm90()[1]}; use backend='reference'")
        _load_builtin(name)
        if name not in _REGISTRY:
            raise ValueError(f"sgm_attention backend {name!r}: {_missing(name)}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown sgm_attention backend {name!r}; expected 'auto' or one of {sorted(_REGISTRY)} "
                         f"(built-in kernels: {sorted(_BUILTIN)})")
    entry = _REGISTRY[name]
    if entry.platforms is not None and platform not in entry.platforms:
        raise ValueError(f"sgm_attention backend {name!r} runs on {entry.platforms}, the default platform is "
                         f"{platform!r}")
    return entry


def available_backends() -> tuple[str, ...]:
    """Backends that can run on the default platform (built-in kernels for it are imported first)."""
    names = []
    for name in list(_BUILTIN) + [n for n in _REGISTRY if n not in _BUILTIN]:
        try:
            resolve_sgm_backend(name)
            names.append(name)
        except (ValueError, RuntimeError):
            pass
    return tuple(names)


def _concrete(x):
    """numpy value of x, or None when it is traced."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _validate(q, k, v, idx, cnt, lens, block_q, block_kv, entry: Backend):
    for nm, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"sgm_attention: {nm} must be [B, T, H, D], got shape {x.shape}")
        if jnp.dtype(x.dtype) not in _DTYPES:
            raise ValueError(f"sgm_attention: {nm} dtype must be float32, bfloat16 or float16, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"sgm_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"sgm_attention: k and v shapes differ: {k.shape} vs {v.shape}")
    b, tq, h, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, h, d):
        raise ValueError(f"sgm_attention: k [B, Tk, H, D] = {k.shape} does not match q [B, Tq, H, D] = {q.shape}")
    for nm, blk in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(blk, (int, np.integer)) or isinstance(blk, bool) or blk < 1:
            raise ValueError(f"sgm_attention: {nm} must be a positive int, got {blk!r}")
    if tq % block_q:
        raise ValueError(f"sgm_attention: Tq = {tq} is not a multiple of block_q = {block_q}")
    if k.shape[1] % block_kv:
        raise ValueError(f"sgm_attention: Tk = {k.shape[1]} is not a multiple of block_kv = {block_kv}")
    if entry.head_dims is not None and d not in entry.head_dims:
        raise ValueError(f"sgm_attention: head dim {d} not supported by backend {entry.name!r} "
                         f"(supports {entry.head_dims})")
    if jnp.dtype(q.dtype) not in entry.dtypes:
        raise ValueError(f"sgm_attention: dtype {q.dtype} not supported by backend {entry.name!r} (supports "
                         f"{', '.join(jnp.dtype(d).name for d in entry.dtypes)})")
    tq_tile, tkv_tile = entry.tile
    if block_q % tq_tile or block_kv % tkv_tile:
        raise ValueError(f"sgm_attention: block_q = {block_q} and block_kv = {block_kv} must be multiples of backend "
                         f"{entry.name!r}'s tile {entry.tile}")
    nq, nk = tq // block_q, k.shape[1] // block_kv
    for nm, x in (("kv_block_idx", idx), ("kv_block_cnt", cnt), ("kv_block_len", lens)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"sgm_attention: {nm} must have an integer dtype, got {x.dtype}")
    if idx.ndim != 4 or idx.shape[:3] != (b, h, nq) or idx.shape[3] < 1:
        raise ValueError(f"sgm_attention: kv_block_idx must be [B, H, Nq, K] = [{b}, {h}, {nq}, K >= 1], "
                         f"got {idx.shape}")
    kk = idx.shape[3]
    if cnt.shape != (b, h, nq):
        raise ValueError(f"sgm_attention: kv_block_cnt must be [B, H, Nq] = {(b, h, nq)}, got {cnt.shape}")
    if lens.shape != (b, nk):
        raise ValueError(f"sgm_attention: kv_block_len must be [B, Nk] = {(b, nk)}, got {lens.shape}")
    c, ln, ix = _concrete(cnt), _concrete(lens), _concrete(idx)
    if c is not None and (c.min() < 0 or c.max() > kk):
        raise ValueError(f"sgm_attention: kv_block_cnt values must lie in [0, K = {kk}], got [{c.min()}, {c.max()}]")
    if ln is not None and (ln.min() < 0 or ln.max() > block_kv):
        raise ValueError(f"sgm_attention: kv_block_len values must lie in [0, block_kv = {block_kv}], "
                         f"got [{ln.min()}, {ln.max()}]")
    if ix is not None and c is not None:
        listed = np.arange(kk) < c[..., None]
        if np.any(listed & ((ix < 0) | (ix >= nk))):
            raise ValueError(f"sgm_attention: kv_block_idx entries below the count must lie in [0, Nk = {nk})")
        if np.any(listed[..., 1:] & (np.diff(ix, axis=-1) <= 0)):
            raise ValueError("sgm_attention: kv_block_idx lists must be strictly ascending below the count")


def sgm_attention(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, *, block_q: int, block_kv: int,
                  scale: float | None = None, backend: str = "auto", return_lse: bool = False,
                  q_rows: int | None = None):
    """Softmax attention of each query block's tokens over the valid tokens of its selected key blocks.

    q [B, Tq, H, D], k/v [B, Tk, H, D] (block-major, padded), kv_block_idx int [B, H, Nq, K] ascending (entries at
    positions >= count ignored), kv_block_cnt int [B, H, Nq] in [0, K], kv_block_len int [B, Nk] in [0, block_kv].
    Returns [B, Tq, H, D] in q.dtype; a query block with count 0 gets zeros. `scale` (static float) defaults to
    1/sqrt(D). Differentiable in q, k, v (custom VJP, every backend); indices get no gradient.

    return_lse=True returns (out, lse) with lse the natural-log log-sum-exp fp32 [B, H, Tq] (-inf for rows without
    keys), for merging partial attentions exactly (inference over a cache plus the current chunk). That form is
    forward-only: differentiating it raises.

    q_rows (static int, optional): only the first q_rows rows of every query block are queries, the rest padding (a
    block-major layout whose blocks hold fewer tokens than block_q). Differentiable form: their outputs are computed
    as usual, but the backward takes their cotangent as zero: they get dq = 0 and add nothing to dk, dv, so kernels
    may skip them (the Mosaic GPU dk/dv kernel streams 160 of DecMem's 192 rows). return_lse=True: they get out
    0 and LSE −inf from a backend that skips them in the forward (the Mosaic GPU forward can pack the partial q
    tiles, `mosaic_gpu.forward_packed`), or are computed as usual. Exact when the caller drops those rows.

    Index values are checked when concrete. Traced indices are not checked: ids are clamped into [0, Nk), counts
    clipped to [0, K] and lengths to [0, block_kv], so bad values give wrong results rather than errors.
    """
    entry = resolve_sgm_backend(backend)
    for nm, x in (("q", q), ("k", k), ("v", v), ("kv_block_idx", kv_block_idx), ("kv_block_cnt", kv_block_cnt),
                  ("kv_block_len", kv_block_len)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"sgm_attention: {nm} must be an array, got {type(x).__name__}")
    _validate(q, k, v, kv_block_idx, kv_block_cnt, kv_block_len, block_q, block_kv, entry)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, jax.core.Tracer):
        raise ValueError("sgm_attention: scale must be a static Python float, got a traced value")
    q_rows = check_q_rows(q_rows, block_q)
    if entry.name not in _announced:
        log.info("sgm_attention: running backend %r (requested %r, platform %r)", entry.name, backend,
                 jax.default_backend())
        _announced.add(entry.name)
    kk, nk = kv_block_idx.shape[3], kv_block_len.shape[1]
    idx = jnp.clip(jnp.asarray(kv_block_idx, jnp.int32), 0, nk - 1)
    cnt = jnp.clip(jnp.asarray(kv_block_cnt, jnp.int32), 0, kk)
    lens = jnp.clip(jnp.asarray(kv_block_len, jnp.int32), 0, block_kv)
    if return_lse:
        return _sgm_with_lse(q, k, v, idx, cnt, lens, int(block_q), int(block_kv), float(scale), entry.name, q_rows)
    return _sgm(q, k, v, idx, cnt, lens, int(block_q), int(block_kv), float(scale), entry.name, q_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _sgm_with_lse(q, k, v, idx, cnt, lens, block_q, block_kv, scale, name, q_rows):
    entry = _REGISTRY[name]
    rows = {"q_rows": q_rows} if q_rows is not None and entry.fwd_q_rows else {}
    return entry.fwd(q, k, v, idx, cnt, lens, block_q=block_q, block_kv=block_kv, scale=scale, **rows)


def _sgm_with_lse_fwd(q, k, v, idx, cnt, lens, block_q, block_kv, scale, name, q_rows):
    return _sgm_with_lse(q, k, v, idx, cnt, lens, block_q, block_kv, scale, name, q_rows), None


def _sgm_with_lse_bwd(block_q, block_kv, scale, name, q_rows, res, cotangents):
    raise NotImplementedError("sgm_attention(return_lse=True) is forward-only (inference merges); differentiate "
                              "sgm_attention with return_lse=False")


_sgm_with_lse.defvjp(_sgm_with_lse_fwd, _sgm_with_lse_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _sgm(q, k, v, idx, cnt, lens, block_q, block_kv, scale, name, q_rows):
    return _sgm_fwd(q, k, v, idx, cnt, lens, block_q, block_kv, scale, name, q_rows)[0]


def _sgm_fwd(q, k, v, idx, cnt, lens, block_q, block_kv, scale, name, q_rows):
    out, lse = _REGISTRY[name].fwd(q, k, v, idx, cnt, lens, block_q=block_q, block_kv=block_kv, scale=scale)
    # Named for remat policies (the DiT's remat="save_sgm" saves both): a rematerialised layer then skips the forward
    # kernel in its backward pass, for O(Tq·H·D) memory per layer.
    # The barrier keeps XLA from recomputing the kernel in the backward loop instead of storing its outputs (seen on
    # an H200: without it the compiled step ran the forward kernel twice per layer although both names were saved).
    out, lse = jax.lax.optimization_barrier((out, lse))
    out, lse = checkpoint_name(out, "sgm_out"), checkpoint_name(lse, "sgm_lse")
    return out, (q, k, v, idx, cnt, lens, out, lse)


def _sgm_bwd(block_q, block_kv, scale, name, q_rows, res, dout):
    q, k, v, idx, cnt, lens, out, lse = res
    bwd = _REGISTRY[name].bwd
    if bwd is None:
        raise NotImplementedError(f"sgm_attention backend {name!r} is forward-only (registered with bwd=None); "
                                  "use backend='reference' to differentiate")
    rows = {} if q_rows is None else {"q_rows": q_rows}  # backends registered without q_rows still work without it
    dq, dk, dv = bwd(q, k, v, idx, cnt, lens, out, lse, dout, block_q=block_q, block_kv=block_kv, scale=scale, **rows)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_sgm.defvjp(_sgm_fwd, _sgm_bwd)
